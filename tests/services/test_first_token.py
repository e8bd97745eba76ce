"""The first token leaves decode before the prompt's KV has arrived (decode_service's
lifecycle, steps 3-5), with real processes over TCP. Two extra decode services widen
that window with their test-only knobs (decode_service/faults.py): `late` sees every
transfer DONE only DELAY seconds after setting it up, `failing` sees each one FAILED."""

import random
import re
import signal
import time

import grpc
import pytest

from protos import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from tests.services.helpers import Service, concurrently, generate, generate_request, params, pools_whole

DELAY = 2.0  # s: decode holds each transfer's DONE back this long after expect()
N = 8  # tokens a request generates


def _decode(tiny_llama4_dir, *flags):
    d = Service("decode_service", tiny_llama4_dir, *flags)
    ch = grpc.insecure_channel(d.address)
    yield d, decode_pb2_grpc.DecodeServiceStub(ch)
    ch.close()
    d.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def late(tiny_llama4_dir):
    yield from _decode(tiny_llama4_dir, "--test-kv-delay", str(DELAY), "--log-level", "INFO")


@pytest.fixture(scope="module")
def failing(tiny_llama4_dir):
    yield from _decode(tiny_llama4_dir, "--test-kv-delay", "0.2", "--test-kv-fail")


def _prompts(seed, lengths):
    rng = random.Random(seed)
    return [[rng.randrange(202048) for _ in range(n)] for n in lengths]


def _timed(stub, req):
    """[(seconds since the call, token ids)] of each response, and the last response."""
    t0, got, last = time.perf_counter(), [], None
    for r in stub.Generate(req, timeout=300):
        got.append((time.perf_counter() - t0, list(r.token_ids)))
        last = r
    return got, last


def test_first_token_goes_out_while_the_kv_is_arriving(stack, late, offline):
    p, _, _ = stack
    d, stub = late
    prompt = _prompts(21, [100])[0]
    want = offline.generate(prompt, params(N))[0].token_ids
    t0 = time.perf_counter()
    call = stub.Generate(generate_request(prompt, p.address, N, rid="ft-window"), timeout=300)
    first = next(call)
    t_first = time.perf_counter() - t0
    info = stub.Info(common_pb2.InfoRequest())
    # The client holds the first token while decode still waits for the KV: the request
    # is transferring (counted as waiting), not in the batch.
    assert list(first.token_ids) == want[:1] and not first.finished
    assert (info.waiting, info.running) == (1, 0) and t_first < DELAY
    rest = [tok for r in call for tok in r.token_ids]
    t_rest = time.perf_counter() - t0
    assert list(first.token_ids) + rest == want and t_rest >= DELAY
    # Decode's INFO line: the phrases bench/disagg.py parses, then the KV's wait.
    line = next(x for x in reversed(d.log) if "request ft-window:" in x)
    assert re.search(r"reserve \+ request [\d.]+ ms, Prefill RPC [\d.]+ ms, transfer close [\d.]+ ms, "
                     r"first token out [\d.]+ ms", line), line
    kv_wait = float(re.search(r"KV DONE ([\d.]+) ms after the first token", line).group(1))
    assert kv_wait > 1e3 * (DELAY - t_first) - 100, line


def test_concurrent_requests_match_offline_with_late_kv(stack, late, offline):
    p, _, _ = stack
    _, stub = late
    prompts = _prompts(22, [40, 77, 100, 150])
    want = [o.token_ids for o in offline.generate(prompts, params(N))]
    got = concurrently(lambda i: _timed(stub, generate_request(prompts[i], p.address, N, packed=i % 2 == 1)),
                        len(prompts))
    for (stamps, last), ref in zip(got, want):
        assert [t for _, ids in stamps for t in ids] == ref and last.finish_reason == "length"
        assert stamps[0][1] == ref[:1] and stamps[1][0] - stamps[0][0] > DELAY / 2  # the KV came well after
    pools_whole(stub)
    pools_whole(prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(p.address)))


def test_transfer_failing_after_the_first_token_recomputes(stack, failing, offline):
    p, _, _ = stack
    d, stub = failing
    prompts = _prompts(23, [50, 90, 140])
    want = [o.token_ids for o in offline.generate(prompts, params(N))]
    got = concurrently(lambda i: _timed(stub, generate_request(prompts[i], p.address, N)), len(prompts))
    for (stamps, last), ref in zip(got, want):
        # The first token once, then the recomputed rest: the offline greedy tokens exactly.
        assert stamps[0][1] == ref[:1] and [t for _, ids in stamps for t in ids] == ref
        assert last.num_transferred_tokens > 0
    assert sum("recomputing here" in x for x in d.log) >= len(prompts)
    pools_whole(stub)
    pools_whole(prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(p.address)))


@pytest.fixture(scope="module")
def failing_fail(tiny_llama4_dir):
    yield from _decode(tiny_llama4_dir, "--test-kv-delay", "0.2", "--test-kv-fail", "--on-transfer-failure", "fail")


def test_transfer_failing_after_the_first_token_with_fail_ends_the_rpc(stack, failing_fail, offline):
    """--on-transfer-failure fail: the client has the first token, then the RPC ends
    UNAVAILABLE naming prefill (no recompute, no second copy of that token), and every
    block is back on both sides."""
    p, _, _ = stack
    _, stub = failing_fail
    prompt = _prompts(24, [80])[0]
    ref = offline.generate([prompt], params(N))[0].token_ids
    got = []
    with pytest.raises(grpc.RpcError) as e:
        for r in stub.Generate(generate_request(prompt, p.address, N), timeout=300):
            got.extend(r.token_ids)
    assert got == ref[:1]
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and p.address in e.value.details()
    pools_whole(stub)
    pools_whole(prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(p.address)))


def test_a_first_token_that_ends_the_request(stack, late, offline):
    """It ends the RPC at once, with no wait for the KV (which is aborted), and the
    blocks go back on both sides."""
    p, _, _ = stack
    _, stub = late
    prompt = _prompts(24, [90])[0]
    first = offline.generate(prompt, params(N))[0].token_ids[0]
    for sampling, reason in [(params(N, stop_token_ids=(first,)), "stop"), (params(1), "length")]:
        t0 = time.perf_counter()
        tokens, last = generate(stub, prompt, p.address, sampling=sampling)
        assert tokens == [first] and last.finish_reason == reason
        assert time.perf_counter() - t0 < DELAY
    pools_whole(stub)
    pools_whole(prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(p.address)))


def test_abort_and_cancel_between_the_first_token_and_the_kv(stack, late):
    p, _, _ = stack
    _, stub = late
    prompt = _prompts(25, [110])[0]
    call = stub.Generate(generate_request(prompt, p.address, 300, rid="ft-abort"), timeout=300)
    assert next(call).token_ids
    assert stub.Abort(common_pb2.AbortRequest(request_id="ft-abort")).found
    last = list(call)[-1]
    assert last.finished and last.finish_reason == "abort"
    pools_whole(stub)
    call = stub.Generate(generate_request(prompt[::-1], p.address, 300), timeout=300)
    assert next(call).token_ids
    call.cancel()
    pools_whole(stub)
    pools_whole(prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(p.address)))
