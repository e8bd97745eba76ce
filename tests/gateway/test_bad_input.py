"""Bad requests get the right 4xx with OpenAI-shaped JSON naming the field, never a 5xx;
a flood of them leaves the gateway serving; a client that goes away aborts its request
everywhere; /metrics counts what happened."""

import json
import random
import socket
import time

import httpx
import pytest

from protos import common_pb2, decode_pb2_grpc, prefill_pb2_grpc

from .conftest import API_KEY

H = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def post(stack, path, body, headers=H):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(stack.base_url + path, content=data, headers=headers, timeout=30)


def assert_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


CASES = [
    # (path, body, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, -1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [999999999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "word " * 600}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 600}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**9]}, 400, "stop_token_ids"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400,
     "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404, "model"),
]


@pytest.mark.parametrize("path, body, status, param", CASES)
def test_bad_request(stack, path, body, status, param):
    assert_error(post(stack, path, body), status, param)


def test_unknown_route_and_method(stack):
    assert_error(httpx.get(stack.base_url + "/v1/nothing", headers=H), 404)
    assert_error(httpx.get(stack.base_url + "/v1/completions", headers=H), 405)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_api_key(stack, model_name, headers):
    err = assert_error(post(stack, "/v1/completions", {"model": model_name, "prompt": "hi"},
                            {"Content-Type": "application/json", **headers}), 401)
    assert err["code"] == "invalid_api_key"
    assert httpx.get(stack.base_url + "/health").status_code == 200  # health and metrics need no key


def test_flood_of_malformed_requests_leaves_it_serving(stack, model_name):
    rng = random.Random(0)
    junk = [b"", b"{", b"null", b"\xff\xfe", b'{"prompt": {}}', b'{"messages": [1]}', b"{" * 2000,
            json.dumps({"prompt": "x", "max_tokens": 1e30}).encode(), json.dumps({"prompt": [[1], "a"]}).encode(),
            json.dumps({"prompt": "x", "stop": 7}).encode(), json.dumps({"prompt": "x", "logit_bias": {"1": 5}}).encode()]
    statuses = []
    with httpx.Client(base_url=stack.base_url, headers=H, timeout=30) as c:
        for i in range(200):
            body = rng.choice(junk)
            if i % 3 == 0:  # and random bytes
                body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
            path = rng.choice(["/v1/completions", "/v1/chat/completions"])
            r = c.post(path, content=body)
            statuses.append(r.status_code)
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
            assert "error" in r.json()
        ok = c.post("/v1/completions", json={"model": model_name, "prompt": "still there?", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def pools_whole(stack, role: str = "decode"):
    """Every instance of `role` idle, with all its blocks free and its integrity check passing."""
    import grpc

    stub = decode_pb2_grpc.DecodeServiceStub if role == "decode" else prefill_pb2_grpc.PrefillServiceStub
    for d in stack.services(role):
        with grpc.insecure_channel(d.address) as ch:
            info = stub(ch).Info(common_pb2.InfoRequest(), timeout=10)
        assert info.integrity_error == ""
        if info.running or info.waiting or info.free_blocks["global"] != info.total_blocks["global"]:
            return False
    return True


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_everywhere(stack, model_name, stream):
    """A client that hangs up mid-request: decode stops generating and frees its blocks."""
    body = json.dumps({"model": model_name, "prompt": "tell me everything " * 3, "max_tokens": 480,
                       "ignore_eos": True, "stream": stream}).encode()
    host, port = stack.base_url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    if stream:
        assert s.recv(4096).startswith(b"HTTP/1.1 200")  # tokens are flowing
    else:
        time.sleep(1.5)  # admitted and generating
    s.close()
    deadline = time.monotonic() + 20
    while not pools_whole(stack):
        assert time.monotonic() < deadline, "decode kept the request after its client left"
        time.sleep(0.3)
    text = httpx.get(stack.base_url + "/metrics").text
    assert 'tandem_requests_total{outcome="cancelled"}' in text


def test_metrics(stack, model_name):
    httpx.post(stack.base_url + "/v1/completions", headers=H, timeout=60,
               json={"model": model_name, "prompt": "metrics " * 60, "max_tokens": 4, "ignore_eos": True})
    text = httpx.get(stack.base_url + "/metrics").text
    for name in ["tandem_time_to_first_token_seconds_count", "tandem_time_per_output_token_seconds_count",
                 "tandem_inter_token_latency_seconds_count", "tandem_e2e_request_latency_seconds_count",
                 "tandem_kv_transfer_bytes_total", 'tandem_requests_total{outcome="finished"}',
                 'tandem_instances{role="decode"} 2.0', "tandem_instance_kv_blocks_free{instance=\"decode-0\"}",
                 "tandem_queued_requests", "tandem_instance_queued_prefill_tokens"]:
        assert name in text, name
    transfer = next(l for l in text.splitlines() if l.startswith("tandem_kv_transfer_bytes_total"))
    assert float(transfer.split()[-1]) > 0, "a 60-token prompt is prefilled remotely: its KV moved"
