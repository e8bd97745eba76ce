"""Routing: the policies on hand-made registry views (a unit test of one class), the
registry's heartbeat and TTL on a real Redis, and on real processes: a killed decode
instance leaves routing within its TTL while requests keep succeeding; a second
gateway replica on the same Redis serves, aborts the first one's requests, and
refuses with 429 + Retry-After when full."""

import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import redis

from gateway.router import KVAware, LeastLoaded, RoundRobin, RouteRequest, make_policy
from launcher.serve import Proc, Stack, free_port
from registry import Heartbeat, Instance, list_instances

from .conftest import API_KEY, SERVICE_ARGS

H = {"Authorization": f"Bearer {API_KEY}"}


def inst(iid, role="decode", free=100, running=0, waiting=0, queued=0):
    return Instance(id=iid, role=role, model="m", address=f"{iid}:1", block_size=16, max_model_len=512,
                    total_blocks=100, free_blocks=free, running=running, waiting=waiting,
                    queued_prefill_tokens=queued)


def test_policies():
    a, b, c = inst("a", running=3), inst("b", running=1), inst("c", running=1, free=50)
    load = {i.id: i.running for i in (a, b, c)}
    req = RouteRequest(100)
    assert LeastLoaded().pick_decode([a, b, c], req, load) == (b, "load")  # tie on load: more free blocks
    kv = KVAware(affinity_slack=2)
    assert kv.pick_decode([a, b, c], RouteRequest(100, session_decode="a"), load) == (a, "session")
    assert kv.pick_decode([a, b, c], RouteRequest(100, prefix_holders=((64, "c"),)), load) == (c, "prefix")
    # the holder is too busy: balance wins over affinity
    assert KVAware(affinity_slack=1).pick_decode([a, b, c], RouteRequest(100, session_decode="a"),
                                                 load) == (b, "load")
    # a session whose instance is gone falls back to load
    assert kv.pick_decode([b, c], RouteRequest(100, session_decode="a"), load) == (b, "load")
    p1, p2 = inst("p1", "prefill", queued=500), inst("p2", "prefill", queued=100)
    assert kv.pick_prefill([p1, p2], req, {}) == p2
    assert kv.pick_prefill([p1, p2], req, {"p2": 1000}) == p1  # what this gateway just sent counts too
    rr = RoundRobin()
    picks = []
    for _ in range(4):  # with a prefill pick in between, as every request makes
        picks.append(rr.pick_decode([a, b], req, load)[0].id)
        rr.pick_prefill([p1, p2], req, {})
    assert picks == ["a", "b", "a", "b"]
    with pytest.raises(ValueError, match="routing"):
        make_policy("random", 1)


def test_heartbeat_and_ttl(stack):
    client = redis.Redis.from_url(stack.redis_url)
    n = 0

    def snap():
        nonlocal n
        n += 1
        return inst("hb-test", free=n)

    hb = Heartbeat(stack.redis_url, snap, ttl=0.6).start()
    try:
        time.sleep(0.5)
        found = {i.id: i for i in list_instances(client)}
        assert "hb-test" in found and found["hb-test"].free_blocks >= 2  # refreshed, not just written once
    finally:
        hb._stop.set()  # die without deregistering, as a killed process would
        hb._thread.join()
    time.sleep(0.8)
    assert "hb-test" not in {i.id for i in list_instances(client)}  # expired and pruned
    assert b"hb-test" not in client.smembers("tandem:instances")
    client.close()


def completion(base_url, model, prompt="hello there", n=4, timeout=60):
    return httpx.post(base_url + "/v1/completions", headers=H, timeout=timeout, json={
        "model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True})


@pytest.mark.slow
def test_killed_decode_leaves_routing(tiny_llama4_dir, tmp_path):
    ttl = 1.5
    with Stack(model=str(tiny_llama4_dir), prefill=0, decode=2, api_keys=(API_KEY,), heartbeat_ttl=ttl,
               service_args=SERVICE_ARGS, log_dir=tmp_path) as st:
        model = tiny_llama4_dir.name
        victim = st.services("decode")[1]
        errors, served = [], []
        stop = threading.Event()

        def load():  # requests all along, before, during and after the kill
            while not stop.is_set():
                r = completion(st.base_url, model, n=3)
                (served if r.status_code == 200 else errors).append(r.status_code)

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        victim.popen.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        while httpx.get(st.base_url + "/health").json()["decode"] != 1:
            assert time.monotonic() - killed < ttl + 2.0, "the dead instance is still routed to"
            time.sleep(0.1)
        gone_after = time.monotonic() - killed
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(60)
        # A request already streaming from the victim when it died may fail (resuming it is
        # later work); new ones are retried elsewhere, so at most those in flight fail.
        assert len(errors) <= 2, errors
        assert len(served) > 4
        for _ in range(4):
            assert completion(st.base_url, model).status_code == 200
        assert gone_after <= ttl + 2.0


@pytest.mark.slow
def test_second_gateway_replica(stack, model_name, tmp_path):
    """A replica with one slot and no queue: the second concurrent request gets 429 with
    Retry-After. It also aborts a request the first gateway is serving (state in Redis)."""
    port = free_port()
    p = Proc("gateway-2", [sys.executable, "-m", "gateway", "--model", stack.model, "--redis-url", stack.redis_url,
                           "--port", str(port), "--grpc-port", "0", "--max-concurrent", "1", "--max-queue", "0",
                           "--api-key", API_KEY], tmp_path / "gw2.log")
    p.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert p.alive() and time.monotonic() < deadline, p.tail()
            time.sleep(0.2)
        long = {"model": model_name, "prompt": "go on", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60, headers=H) as c, c.stream("POST", base + "/v1/completions", json=long) as r1:
            rid = r1.headers["x-request-id"]
            assert r1.status_code == 200
            r2 = completion(base, model_name)
            assert r2.status_code == 429 and int(r2.headers["retry-after"]) >= 1
            assert r2.json()["error"]["code"] == "rate_limit_exceeded"
            # abort it through the FIRST gateway's gRPC API: it finds the request in Redis
            import grpc

            from protos import api_pb2_grpc, common_pb2

            with grpc.insecure_channel(stack.grpc_address) as ch:
                found = api_pb2_grpc.TandemStub(ch).Abort(common_pb2.AbortRequest(request_id=rid),
                                                          metadata=(("authorization", f"Bearer {API_KEY}"),))
            assert found.found
            body = "".join(r1.iter_text())
        assert '"finish_reason":"abort"' in body and body.rstrip().endswith("data: [DONE]")
        assert completion(base, model_name).status_code == 200  # the slot is free again
    finally:
        p.stop()
    assert p.popen.returncode == 0, p.tail()  # SIGTERM: a clean drain, not a kill


def test_gateway_without_decode_says_so(stack, tmp_path):
    """No decode instance for its model: REST /health 503 and gRPC health NOT_SERVING,
    and a request gets 503 with Retry-After, not a hang."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port, gport = free_port(), free_port()
    p = Proc("gateway-x", [sys.executable, "-m", "gateway", "--model", stack.model, "--served-model-name", "nobody",
                           "--redis-url", stack.redis_url, "--port", str(port), "--grpc-port", str(gport)],
             tmp_path / "gwx.log")
    p.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health")
                break
            except httpx.HTTPError:
                assert p.alive() and time.monotonic() < deadline, p.tail()
                time.sleep(0.2)
        assert r.status_code == 503 and r.json()["decode"] == 0
        with grpc.insecure_channel(f"127.0.0.1:{gport}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "no_instance"
    finally:
        p.stop()
