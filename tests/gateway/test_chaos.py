"""Many streamed completions at once through the REST shim, each read to its end or
dropped by its client after a random number of chunks; and many requests through the
public gRPC API, some aborted by its Abort at random moments. Afterwards:
  - every completed one gave the offline engine's greedy text, and every dropped one a
    prefix of it;
  - both decode instances and the prefill instance are idle with their pools whole;
  - each REST request's record in Redis is final, and says which way it ended.
Seeded: a failure names its seed and replays its requests (not their timing)."""

import json
import random
import threading
import time

import grpc
import httpx
import pytest
import redis

from engine.sampling import SamplingParams

from .conftest import API_KEY
from .test_bad_input import pools_whole
from .test_sessions import record

H = {"Authorization": f"Bearer {API_KEY}"}
AUTH = (("authorization", f"Bearer {API_KEY}"),)  # the gRPC API's
N = 16  # tokens a request generates
REQUESTS = 16  # at once


def _stream(base_url: str, model: str, ids: list[int], drop_after: int | None):
    """(request id, text received, finish_reason or "dropped")."""
    body = {"model": model, "prompt": ids, "max_tokens": N, "temperature": 0, "ignore_eos": True, "stream": True}
    rid, text, finish, chunks = None, "", None, 0
    with httpx.Client(timeout=120) as c, c.stream("POST", base_url + "/v1/completions", headers=H, json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            rid = chunk["id"]
            if chunk["choices"]:
                text += chunk["choices"][0]["text"]
                finish = chunk["choices"][0]["finish_reason"] or finish
            chunks += 1
            if drop_after is not None and chunks >= drop_after:
                return rid, text, "dropped"  # leaving the block closes the connection
    return rid, text, finish


def _until_idle(stack, failure: str, timeout: float = 30.0) -> None:
    """Wait until every decode and prefill instance is idle with its pools whole."""
    deadline = time.monotonic() + timeout
    while not (pools_whole(stack, "decode") and pools_whole(stack, "prefill")):
        assert time.monotonic() < deadline, failure
        time.sleep(0.3)


@pytest.mark.parametrize("seed", [1, 2])
def test_streams_dropped_at_random_are_aborted_everywhere(stack, model_name, offline, seed):
    rng = random.Random(seed)
    prompts = [[rng.randrange(1000, 200000) for _ in range(rng.randrange(10, 150))] for _ in range(REQUESTS)]
    drops = [None if rng.random() < 0.4 else rng.randrange(1, 8) for _ in range(REQUESTS)]
    want = [o.text for o in offline.generate(prompts, SamplingParams(max_tokens=N, temperature=0, ignore_eos=True))]
    got = [None] * REQUESTS

    def one(i):
        got[i] = _stream(stack.base_url, model_name, prompts[i], drops[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(REQUESTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), f"seed {seed}: a stream hung"
    for i, (rid, text, end) in enumerate(got):
        what = f"seed {seed}, request {i} ({len(prompts[i])} tokens, dropped after {drops[i]} chunks)"
        assert want[i].startswith(text), f"{what}: text differs from offline"
        if end != "dropped":
            assert end == "length" and text == want[i], f"{what}: {end}"
    _until_idle(stack, f"seed {seed}: an instance kept a dropped request's blocks")
    cancelled = 0
    with redis.Redis.from_url(stack.redis_url, decode_responses=True) as rds:
        for i, (rid, _, end) in enumerate(got):
            status = record(rds, rid, timeout=10).get("status")
            # a dropped stream may have finished before its client left
            assert status in (("cancelled", "finished") if end == "dropped" else ("finished",)), \
                f"seed {seed}, request {i} ({end}): record says {status}"
            cancelled += status == "cancelled"
    assert cancelled, f"seed {seed}: every dropped stream had finished before its client left"


def _generate(stub, model: str, ids: list[int], rid: str, abort_after: float | None, timers: list):
    """Through the public gRPC API: (token ids received, finish_reason or the gRPC code).
    With `abort_after`, an Abort for `rid` goes through the API that long after the call."""
    from protos import api_pb2, common_pb2

    if abort_after is not None:
        timers.append(threading.Timer(abort_after, lambda: stub.Abort(common_pb2.AbortRequest(request_id=rid),
                                                                      metadata=AUTH, timeout=30)))
        timers[-1].start()
    tokens, end = [], None
    try:
        for r in stub.Generate(api_pb2.GenerateRequest(model=model, request_id=rid, token_ids=api_pb2.TokenIds(ids=ids),
                                                       sampling=common_pb2.SamplingParams(
                                                           max_tokens=N, temperature=0, ignore_eos=True)),
                               metadata=AUTH, timeout=120):
            tokens.extend(r.token_ids)
            if r.finished:
                end = r.finish_reason
    except grpc.RpcError as e:
        end = e.code()
    return tokens, end


@pytest.mark.parametrize("seed", [3])
def test_requests_aborted_through_the_api_at_random(stack, model_name, offline, seed):
    """The public gRPC API's Abort, at random moments (queued at the gateway, routed, in
    prefill, mid-transfer, decoding): completed requests give offline greedy tokens,
    aborted ones a prefix of them, and every instance ends idle with its pools whole."""
    from protos import api_pb2_grpc

    rng = random.Random(seed)
    prompts = [[rng.randrange(1000, 200000) for _ in range(rng.randrange(10, 150))] for _ in range(REQUESTS)]
    aborts = [None if rng.random() < 0.4 else rng.uniform(0.0, 0.6) for _ in range(REQUESTS)]
    want = [o.token_ids for o in offline.generate(prompts, SamplingParams(max_tokens=N, temperature=0,
                                                                          ignore_eos=True))]
    timers: list[threading.Timer] = []
    got = [None] * REQUESTS
    with grpc.insecure_channel(stack.grpc_address) as ch:
        stub = api_pb2_grpc.TandemStub(ch)

        def one(i):
            got[i] = _generate(stub, model_name, prompts[i], f"api-chaos-{seed}-{i}", aborts[i], timers)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(REQUESTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        for t in list(timers):
            t.join()
    assert not any(t.is_alive() for t in threads), f"seed {seed}: a stream hung"
    for i, (tokens, end) in enumerate(got):
        what = f"seed {seed}, request {i} ({len(prompts[i])} tokens, aborted after {aborts[i]} s)"
        assert tokens == want[i][:len(tokens)], f"{what}: tokens differ from offline"
        if end == "length":
            assert tokens == want[i], what
        else:
            assert aborts[i] is not None and end in ("abort", grpc.StatusCode.CANCELLED), f"{what}: ended {end}"
    assert any(end != "length" for _, end in got), f"seed {seed}: every abort came after its request had finished"
    _until_idle(stack, f"seed {seed}: an instance kept an aborted request's blocks")


def test_a_session_turn_dropped_mid_stream_frees_the_session(stack, model_name):
    """A client that leaves during a streamed turn of its session: the session's turn
    lock goes at once, so its next turn is served, not refused 409 session_busy until
    the lock's TTL. (Found by a probe: the unlock ran in a task being cancelled, and the
    cancellation stopped it half the time.)"""
    sessions = [f"dropped-turn-{i}" for i in range(12)]

    def turn(sid, content, drop_after=None):
        body = {"model": model_name, "messages": [{"role": "user", "content": content}], "max_tokens": 16,
                "temperature": 0, "ignore_eos": True, "stream": drop_after is not None}
        headers = {**H, "X-Session-ID": sid}
        if drop_after is None:
            return httpx.post(stack.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=120)
        with httpx.Client(timeout=120) as c, c.stream("POST", stack.base_url + "/v1/chat/completions", json=body,
                                                      headers=headers) as r:
            for i, _ in enumerate(line for line in r.iter_lines() if line.startswith("data: ")):
                if i + 1 >= drop_after:
                    return r

    for sid in sessions:
        assert turn(sid, f"Hello from {sid}.").status_code == 200
    rng = random.Random(0)
    threads = [threading.Thread(target=turn, args=(sid, "And then?", rng.randrange(1, 6))) for sid in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for sid in sessions:
        deadline = time.monotonic() + 5  # a turn still finishing its cleanup may answer 409 for a moment
        while (r := turn(sid, "Thanks.")).status_code == 409 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.status_code == 200, f"{sid}: {r.status_code} {r.text}"
