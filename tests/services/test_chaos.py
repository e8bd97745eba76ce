"""Many requests at once, each left alone, cancelled by its client or aborted by an Abort
RPC at a random moment (waiting for a reservation, in prefill, during the KV transfer,
while decoding), against real processes over tcp. Some prompts share a prefix that
decode holds, some are long enough to go to prefill before their blocks are reserved,
some are prefilled on decode. Whatever happens to a request:
  - it ends: no stream hangs;
  - what its client got is a prefix of the offline engine's greedy output, all of it
    when nothing stopped it;
and after each round both services' block pools are whole and pass the integrity
check. Seeded: a failure names its seed and replays."""

import random
import signal
import threading

import grpc
import pytest

from protos import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from tests.services.helpers import Service, generate_request, params, pools_whole

N = 12  # tokens a request generates
REQUESTS = 20  # at once, per round
EARLY = 96  # decode's --early-prefill-tokens here: longer prompts go to prefill before their blocks


@pytest.fixture(scope="module")
def mixed(tiny_llama4_dir, stack):
    p, _, _ = stack
    d = Service("decode_service", tiny_llama4_dir, "--early-prefill-tokens", str(EARLY))
    ch = grpc.insecure_channel(d.address)
    yield p, decode_pb2_grpc.DecodeServiceStub(ch)
    ch.close()
    d.kill(signal.SIGTERM)


def _run(stub, prompt, prefill_address, rid, fate, delay, timers):
    """(token ids the client got, how the stream ended: a finish_reason or a gRPC code)."""
    call = stub.Generate(generate_request(prompt, prefill_address, N, rid=rid, packed=len(prompt) % 2 == 0),
                         timeout=120)
    if fate == "cancel":
        timers.append(threading.Timer(delay, call.cancel))
    elif fate == "abort":
        timers.append(threading.Timer(delay, lambda: stub.Abort(common_pb2.AbortRequest(request_id=rid), timeout=30)))
    if fate != "none":
        timers[-1].start()
    tokens, end, how = [], None, ""
    try:
        for r in call:
            tokens.extend(r.token_ids)
            how = f"{r.num_cached_tokens} cached on decode, {r.num_transferred_tokens} transferred"
            if r.finished:
                end = r.finish_reason
    except grpc.RpcError as e:
        end = e.code()
    return tokens, end, how


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_requests_cancelled_and_aborted_at_random_leave_both_pools_whole(mixed, offline, seed):
    p, stub = mixed
    rng = random.Random(seed)
    prefixes = [[rng.randrange(202048) for _ in range(48)] for _ in range(3)]  # decode caches these
    prompts, fates, delays, addresses = [], [], [], []
    for _ in range(REQUESTS):
        head = rng.choice(prefixes) if rng.random() < 0.5 else []
        prompts.append(head + [rng.randrange(202048) for _ in range(rng.randrange(10, 180))])
        fates.append(rng.choice(["none", "cancel", "abort"]))
        delays.append(rng.uniform(0.0, 0.6))
        addresses.append("" if rng.random() < 0.15 else p.address)
    want = [o.token_ids for o in offline.generate(prompts, params(N))]
    timers: list[threading.Timer] = []
    got = [None] * REQUESTS

    def one(i):
        got[i] = _run(stub, prompts[i], addresses[i], f"chaos-{seed}-{i}", fates[i], delays[i], timers)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(REQUESTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), f"seed {seed}: a request hung"
    for t in list(timers):
        t.join()
    for i, (tokens, end, how) in enumerate(got):
        what = (f"seed {seed}, request {i} ({fates[i]} after {delays[i]:.2f} s, {len(prompts[i])} tokens, "
                f"prefill {'here' if not addresses[i] else 'there'}; {how})")
        assert tokens == want[i][:len(tokens)], f"{what}: tokens differ from offline"
        if end == "length":
            assert tokens == want[i], what
        else:
            allowed = {"cancel": grpc.StatusCode.CANCELLED, "abort": "abort"}.get(fates[i])
            assert end == allowed, f"{what}: ended {end}"
    pools_whole(stub, timeout=30)
    pools_whole(prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(p.address)), timeout=30)
    stopped = [end for end, f in zip((g[1] for g in got), fates) if f != "none" and end != "length"]
    assert stopped, f"seed {seed}: every cancel and abort came after its request had finished"
