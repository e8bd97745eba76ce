"""Prefill and decode as real processes talking gRPC over TCP, KV over the tcp
transport: greedy output equals the offline engine; only what decode lacks moves;
aborts, cancels and a dead prefill leave both block pools whole."""

import random
import signal
import threading
import time
from array import array

import grpc
import pytest

from protos import common_pb2, decode_pb2, prefill_pb2, prefill_pb2_grpc
from protos.convert import pack_token_ids, sampling_to_pb
from tests.services.helpers import Service, concurrently, generate, params, pools_whole, prefix_hit_moves_only_the_rest


def test_16_concurrent_requests_match_offline(stack, offline):
    p, d, stub = stack
    rng = random.Random(11)
    prompts = [[rng.randrange(202048) for _ in range(n)] for n in
               [5, 20, 33, 40, 47, 64, 65, 70, 90, 100, 120, 130, 31, 150, 48, 81]]
    ref = [o.token_ids for o in offline.generate(prompts, params())]
    # both forms of a prompt: a repeated field and packed bytes
    results = concurrently(lambda i: generate(stub, prompts[i], p.address, packed=i % 2 == 1), len(prompts))
    assert [r[0] for r in results] == ref
    moved = [r[1].num_transferred_tokens for r in results]
    assert sum(1 for m in moved if m > 0) >= 10  # long uncached prompts went through prefill
    pools_whole(stub)
    pools_whole(prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(p.address)))


def test_decode_prefix_hit_transfers_only_the_rest(stack, offline):
    p, d, stub = stack
    prefix_hit_moves_only_the_rest(stub, p.address, offline, seed=12)


def test_cancel_during_decode_and_abort_free_blocks(stack):
    p, d, stub = stack
    prompt = list(range(3000, 3100))
    req = decode_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sampling_to_pb(params(300)),
                                     prefill_address=p.address)
    call = stub.Generate(req)
    for i, _ in enumerate(call):
        if i == 3:
            call.cancel()
            break
    pools_whole(stub)
    # Abort by id while the prompt is still being prefilled/transferred.
    rid = "abort-me"
    req = decode_pb2.GenerateRequest(request_id=rid, prompt_token_ids=list(range(4000, 4200)),
                                     sampling=sampling_to_pb(params(300)), prefill_address=p.address)
    call = stub.Generate(req)
    time.sleep(0.05)
    stub.Abort(common_pb2.AbortRequest(request_id=rid))
    with pytest.raises(grpc.RpcError):
        for r in call:
            if r.finished:
                assert r.finish_reason == "abort"
                raise grpc.RpcError()
    pools_whole(stub)
    pools_whole(prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(p.address)))


def test_dead_prefill_means_recompute_not_hang(tiny_llama4_dir, stack, offline):
    _, d, stub = stack
    victim = Service("prefill_service", tiny_llama4_dir)
    prompt = list(range(5000, 5150))
    out = {}
    t = threading.Thread(target=lambda: out.update(r=generate(stub, prompt, victim.address)))
    t.start()
    time.sleep(0.3)
    victim.kill()
    t.join(timeout=120)
    assert not t.is_alive()
    assert out["r"][0] == offline.generate(prompt, params())[0].token_ids
    tokens, last = generate(stub, prompt[::-1], victim.address)  # dead from the start
    assert tokens == offline.generate(prompt[::-1], params())[0].token_ids and last.num_transferred_tokens == 0
    pools_whole(stub)


def test_layout_mismatch_refused_at_handshake(tiny_maverick_dir, stack):
    _, d, stub = stack
    other = Service("prefill_service", tiny_maverick_dir)
    try:
        kv_address = stub.Info(common_pb2.InfoRequest()).kv_address
        pstub = prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(other.address))
        req = prefill_pb2.PrefillRequest(request_id="x", packed_prompt_token_ids=pack_token_ids(array("I", range(40))),
                                         sampling=sampling_to_pb(params()))
        req.destination.address = kv_address
        req.destination.transfer_id = "x/1"
        req.destination.blocks["global"].ids.extend([0, 1, 2])
        with pytest.raises(grpc.RpcError) as e:
            pstub.Prefill(req, timeout=60)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "layout" in e.value.details()
    finally:
        other.kill(signal.SIGTERM)


def test_bad_requests_get_invalid_argument(stack):
    p, d, stub = stack
    good = sampling_to_pb(params())
    bad_temperature = sampling_to_pb(params())
    bad_temperature.temperature = -1.0
    cases = [  # (prompt_token_ids, packed_prompt_token_ids, sampling, the field the error names)
        ([], b"", good, "prompt_token_ids"),
        ([1, 10**7], b"", good, "prompt_token_ids"),
        ([1, 2], b"", bad_temperature, "temperature"),
        ([], pack_token_ids(array("I", [1, 202048])), good, "prompt_token_ids"),  # outside the vocabulary
        ([], b"\x01\x00\x00", good, "packed_prompt_token_ids"),  # not whole ids
        ([1, 2], pack_token_ids(array("I", [1, 2])), good, "prompt_token_ids"),  # both forms
    ]
    for prompt, packed, sp, field in cases:
        for address in (p.address, ""):
            req = decode_pb2.GenerateRequest(prompt_token_ids=prompt, packed_prompt_token_ids=packed, sampling=sp,
                                             prefill_address=address)
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(req, timeout=30))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
    pools_whole(stub)
