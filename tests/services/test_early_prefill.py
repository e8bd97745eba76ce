"""decode's --early-prefill-tokens: the prompt goes to prefill before decode reserves its
blocks, and the blocks follow in SetDestination. Real processes, KV over tcp: output
equals the offline engine, only what decode lacks moves, a cancel in the window
between the two calls leaves both pools whole, and prefill refuses a bad or late
SetDestination clearly."""

import random
import re
import signal
import threading
import time
from array import array

import grpc
import pytest

from protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from protos.convert import pack_token_ids, sampling_to_pb
from tests.services.helpers import (Service, concurrently, generate, params, pools_whole,
                                    prefix_hit_moves_only_the_rest)


@pytest.fixture(scope="module")
def early(tiny_llama4_dir, stack):
    """A second decode service that sends every prompt early, beside the session's prefill."""
    p, _, _ = stack
    d = Service("decode_service", tiny_llama4_dir, "--early-prefill-tokens", "1", "--log-level", "INFO")
    ch = grpc.insecure_channel(d.address)
    yield p, d, decode_pb2_grpc.DecodeServiceStub(ch)
    ch.close()
    d.kill(signal.SIGTERM)


def test_concurrent_early_requests_match_offline(early, offline):
    p, d, stub = early
    rng = random.Random(21)
    prompts = [[rng.randrange(202048) for _ in range(n)] for n in [40, 47, 64, 65, 70, 90, 100, 130, 150, 81]]
    ref = [o.token_ids for o in offline.generate(prompts, params())]
    results = concurrently(lambda i: generate(stub, prompts[i], p.address, packed=True), len(prompts))
    assert [r[0] for r in results] == ref
    assert all(r[1].num_transferred_tokens == len(q) for r, q in zip(results, prompts))
    assert any("blocks reserved and sent" in line for line in d.log)  # they took the early path
    pools_whole(stub)
    pools_whole(prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(p.address)))


def test_early_request_with_a_decode_prefix_hit_moves_only_the_rest(early, offline):
    p, _, stub = early
    prefix_hit_moves_only_the_rest(stub, p.address, offline, seed=22)


def test_cancel_between_prompt_and_blocks_frees_both_pools(early):
    p, _, stub = early
    for k, delay in enumerate((0.0, 0.002, 0.02)):
        req = decode_pb2.GenerateRequest(request_id=f"early-cancel-{k}", sampling=sampling_to_pb(params(200)),
                                         packed_prompt_token_ids=pack_token_ids(array("I", range(6000, 6160))),
                                         prefill_address=p.address)
        call = stub.Generate(req)
        time.sleep(delay)
        call.cancel()
    pools_whole(stub)
    pools_whole(prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(p.address)))


def _following_prefill(stub_d, rid, n=60):
    req = prefill_pb2.PrefillRequest(request_id=rid, packed_prompt_token_ids=pack_token_ids(array("I", range(n))),
                                     sampling=sampling_to_pb(params()), destination_follows=True)
    req.destination.address = stub_d.Info(common_pb2.InfoRequest()).kv_address
    req.destination.transfer_id = f"{rid}/t"
    return req


def test_prefill_refuses_a_bad_or_late_destination(early):
    p, _, stub = early
    pstub = prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(p.address))
    # No Prefill for it: found = false (after prefill waited a moment for one).
    nobody = prefill_pb2.SetDestinationRequest(request_id="nobody")
    nobody.destination.transfer_id = "nobody/t"
    assert not pstub.SetDestination(nobody, timeout=30).found
    # Blocks that do not cover the prompt: INVALID_ARGUMENT, and the Prefill fails too.
    future = pstub.Prefill.future(_following_prefill(stub, "short-blocks"), timeout=60)
    short = prefill_pb2.SetDestinationRequest(request_id="short-blocks")
    short.destination.transfer_id = "short-blocks/t"
    short.destination.blocks["global"].ids.extend([0, 1])
    with pytest.raises(grpc.RpcError) as e:
        pstub.SetDestination(short, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "do not cover" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        future.result()
    assert e.value.code() == grpc.StatusCode.INTERNAL and "bad destination" in e.value.details()
    # Blocks that never come: the prompt is computed without the engine waiting for them
    # (a request sent right after is served meanwhile, and done before this Prefill gives
    # up, DESTINATION_WAIT after its prompt); the Prefill fails, and its blocks come back.
    future = pstub.Prefill.future(_following_prefill(stub, "never"), timeout=60)
    done = {}
    other = threading.Thread(target=lambda: done.update(
        tokens=generate(stub, list(range(7000, 7100)), p.address)[0], at=time.monotonic()))
    other.start()
    with pytest.raises(grpc.RpcError) as e:
        future.result()
    failed_at = time.monotonic()
    other.join(60)
    assert e.value.code() == grpc.StatusCode.INTERNAL and "did not come" in e.value.details()
    assert done["at"] < failed_at
    pools_whole(pstub)


def test_a_prefix_hit_that_makes_decode_prefill_here_cancels_the_early_prefill(early, offline):
    """The reservation finds the prompt cached but for a few tokens (<= the local-prefill
    threshold): decode prefills here and cancels the Prefill it sent early; both pools
    come back whole."""
    p, _, stub = early
    rng = random.Random(23)
    a = [rng.randrange(202048) for _ in range(120)]
    generate(stub, a, p.address)
    b = a + [rng.randrange(202048) for _ in range(10)]
    tokens, last = generate(stub, b, p.address)
    assert tokens == offline.generate(b, params())[0].token_ids
    assert last.num_transferred_tokens == 0 and last.num_cached_tokens == 112
    pools_whole(stub)
    pools_whole(prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(p.address)))


def test_blocks_that_follow_the_whole_prompt_are_sent_by_the_handler(tiny_llama4_dir, stack, offline):
    """decode's --test-destination-delay holds SetDestination back until prefill has
    computed each prompt, last step included: every layer is deferred with its source
    blocks pinned, then sent by the Prefill handler, fenced and unpinned by a pool thread.
    Outputs equal offline; both pools come back whole (no pin left behind)."""
    p, _, _ = stack
    d = Service("decode_service", tiny_llama4_dir, "--early-prefill-tokens", "1", "--test-destination-delay", "0.5",
                "--log-level", "INFO")
    try:
        stub = decode_pb2_grpc.DecodeServiceStub(grpc.insecure_channel(d.address))
        rng = random.Random(24)
        prompts = [[rng.randrange(202048) for _ in range(n)] for n in (50, 77, 120)]
        ref = [o.token_ids for o in offline.generate(prompts, params())]
        results = concurrently(lambda i: generate(stub, prompts[i], p.address), len(prompts))
        assert [r[0] for r in results] == ref
        assert all(r[1].num_transferred_tokens == len(q) for r, q in zip(results, prompts))
        late = [float(m.group(1)) for m in (re.search(r"blocks reserved and sent ([\d.]+) ms after it", x)
                                            for x in d.log) if m]
        assert len(late) == len(prompts) and min(late) >= 500
        pools_whole(stub)
        pools_whole(prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(p.address)))
    finally:
        d.kill(signal.SIGTERM)
