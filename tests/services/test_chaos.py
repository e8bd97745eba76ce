"""Many requests at once against real processes over tcp, each left alone, cancelled by
its client or aborted by an Abort RPC at a random moment (waiting for a reservation, in
prefill, during the KV transfer, while decoding). Some prompts share a prefix that
decode holds, some go to prefill before their blocks are reserved, some are prefilled
on decode. Variants: prefill holding deferred layers; prefill or decode SIGKILLed, or
drained by SIGTERM, mid-round. Whatever happens to a request:
  - it ends: no stream hangs;
  - what its client got is a prefix of the offline engine's greedy output, all of it
    when nothing stopped it (a request whose prefill died is recomputed exactly);
and afterwards the block pools of the services still running are whole and pass the
integrity check. Seeded: a failure names its seed and replays its requests (not their
timing).

The first test found a real race (fixed in DecodeServicer.Abort): an Abort between a
reservation's blocks and its transfer's registration freed blocks that prefill's KV
then landed in, under other requests."""

import random
import signal
import threading
import time

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
    """(token ids the client got, how the stream ended: a finish_reason or a gRPC code,
    the last response or None). `fate` "cancel" or "abort" starts a timer (kept in
    `timers`) that does it after `delay` seconds."""
    call = stub.Generate(generate_request(prompt, prefill_address, N, rid=rid, packed=len(prompt) % 2 == 0),
                         timeout=120)
    if fate == "cancel":
        timers.append(threading.Timer(delay, call.cancel))
    elif fate == "abort":
        timers.append(threading.Timer(delay, lambda: stub.Abort(common_pb2.AbortRequest(request_id=rid), timeout=30)))
    if fate != "none":
        timers[-1].start()
    tokens, end, last = [], None, None
    try:
        for r in call:
            tokens.extend(r.token_ids)
            last = r
            if r.finished:
                end = r.finish_reason
    except grpc.RpcError as e:
        end = e.code()
    return tokens, end, last


def _round(stub, prefill_address: str, offline, seed: int, meanwhile=None) -> list[tuple[str, object, int]]:
    """One round of REQUESTS at once (see the module docstring); `meanwhile(rng)` runs
    beside them (e.g. kills prefill). Returns each request's (prefill address, end,
    prompt tokens transferred)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(202048) for _ in range(48)] for _ in range(3)]  # decode caches these
    prompts, fates, delays, addresses = [], [], [], []
    for _ in range(REQUESTS):
        head = rng.choice(prefixes) if rng.random() < 0.5 else []
        prompts.append(head + [rng.randrange(202048) for _ in range(rng.randrange(10, 180))])
        fates.append(rng.choice(["none", "cancel", "abort"]))
        delays.append(rng.uniform(0.0, 0.6))
        addresses.append("" if rng.random() < 0.15 else prefill_address)
    want = [o.token_ids for o in offline.generate(prompts, params(N))]
    timers: list[threading.Timer] = []
    got = [None] * REQUESTS

    def one(i):
        got[i] = _run(stub, prompts[i], addresses[i], f"chaos-{seed}-{i}", fates[i], delays[i], timers)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(REQUESTS)]
    for t in threads:
        t.start()
    if meanwhile is not None:
        meanwhile(rng)
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), f"seed {seed}: a request hung"
    for t in list(timers):
        t.join()
    for i, (tokens, end, last) in enumerate(got):
        how = "no response" if last is None else \
            f"{last.num_cached_tokens} cached on decode, {last.num_transferred_tokens} transferred"
        what = (f"seed {seed}, request {i} ({fates[i]} after {delays[i]:.2f} s, {len(prompts[i])} tokens, "
                f"prefill {'here' if not addresses[i] else 'there'}; {how})")
        assert tokens == want[i][:len(tokens)], f"{what}: tokens differ from offline"
        if end == "length":
            assert tokens == want[i], what
        else:
            allowed = {"cancel": grpc.StatusCode.CANCELLED, "abort": "abort"}.get(fates[i])
            assert end == allowed, f"{what}: ended {end}"
    pools_whole(stub, timeout=30)
    stopped = [end for end, f in zip((g[1] for g in got), fates) if f != "none" and end != "length"]
    assert stopped, f"seed {seed}: every cancel and abort came after its request had finished"
    return [(a, g[1], g[2].num_transferred_tokens if g[2] is not None else 0) for a, g in zip(addresses, got)]


@pytest.mark.parametrize("seed", [1, 2])
def test_requests_cancelled_and_aborted_at_random_leave_both_pools_whole(mixed, offline, seed):
    p, stub = mixed
    _round(stub, p.address, offline, seed)
    pools_whole(prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(p.address)), timeout=30)


@pytest.fixture(scope="module")
def late_blocks(tiny_llama4_dir, stack):
    """A decode that sends every prompt first and its blocks 50 ms after reserving them:
    prefill computes layers before their destination is known, defers them and pins
    their source blocks (prefill_service/push.py)."""
    p, _, _ = stack
    d = Service("decode_service", tiny_llama4_dir, "--early-prefill-tokens", "1", "--test-destination-delay", "0.05")
    ch = grpc.insecure_channel(d.address)
    yield p, decode_pb2_grpc.DecodeServiceStub(ch)
    ch.close()
    d.kill(signal.SIGTERM)


@pytest.mark.parametrize("seed", [8])
def test_cancels_and_aborts_while_prefill_holds_deferred_layers(late_blocks, offline, seed):
    """The same round while prefill holds layers whose blocks have not come: its pins are
    all released, whatever ended the requests."""
    p, stub = late_blocks
    _round(stub, p.address, offline, seed)
    pools_whole(prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(p.address)), timeout=30)


@pytest.mark.parametrize("seed", [4])
def test_prefill_killed_at_random_mid_round_means_recompute(mixed, offline, tiny_llama4_dir, seed):
    """The same round, with the prefill instance SIGKILLed at a random moment: requests
    it had (in prefill, mid-transfer, answered but not yet acknowledged) recompute on
    decode, exactly, and those sent to it afterwards are prefilled on decode."""
    _, stub = mixed
    victim = Service("prefill_service", tiny_llama4_dir)
    try:
        ends = _round(stub, victim.address, offline, seed,
                      meanwhile=lambda rng: (time.sleep(rng.uniform(0.05, 0.5)), victim.kill()))
    finally:
        victim.kill()
    recomputed = [e for a, e, sent in ends if a == victim.address and e == "length" and sent == 0]
    assert recomputed, f"seed {seed}: no request meant for the killed prefill was recomputed on decode"


def _decode_stopped_mid_round(prefill_address: str, offline, model, seed: int, sig: int):
    """REQUESTS requests, left alone, to a fresh decode instance that gets `sig` at a
    random moment of them. Returns (the prompts, offline's outputs, each request's _run
    result, seconds the instance took to exit after the signal)."""
    victim = Service("decode_service", model, "--early-prefill-tokens", str(EARLY))
    vstub = decode_pb2_grpc.DecodeServiceStub(grpc.insecure_channel(victim.address))
    rng = random.Random(seed)
    prompts = [[rng.randrange(202048) for _ in range(rng.randrange(40, 200))] for _ in range(REQUESTS)]
    want = [o.token_ids for o in offline.generate(prompts, params(N))]
    got = [None] * REQUESTS

    def one(i):
        got[i] = _run(vstub, prompts[i], prefill_address, f"stopped-{seed}-{i}", "none", 0.0, [])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(REQUESTS)]
    try:
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.05, 0.3))
        t0 = time.monotonic()
        victim.kill(sig)  # waits for the exit
        took = time.monotonic() - t0
    finally:
        victim.kill()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), f"seed {seed}: a client call hung on the stopped decode"
    return prompts, want, got, took


@pytest.mark.parametrize("seed", [6])
def test_decode_killed_at_random_mid_round_leaves_prefill_whole(mixed, offline, tiny_llama4_dir, seed):
    """A decode instance SIGKILLed while its requests are in prefill, mid-transfer or
    decoding: every client call ends (the rest of its output lost, never a hang),
    prefill's pool comes back whole (its transfers to the dead receiver fail), and
    prefill serves the next request exactly."""
    p, stub = mixed
    prompts, want, got, _ = _decode_stopped_mid_round(p.address, offline, tiny_llama4_dir, seed, signal.SIGKILL)
    for i, (tokens, end, _) in enumerate(got):
        assert tokens == want[i][:len(tokens)], f"seed {seed}, request {i}"
        assert end in ("length", grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), f"seed {seed}: {end}"
    assert any(end != "length" for _, end, _ in got), f"seed {seed}: decode died after every request had finished"
    pools_whole(prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(p.address)), timeout=60)
    tokens, end, last = _run(stub, prompts[0], p.address, f"after-{seed}", "none", 0.0, [])
    assert tokens == want[0] and last.num_transferred_tokens > 0


@pytest.mark.parametrize("seed", [10])
def test_prefill_drained_mid_round(mixed, offline, tiny_llama4_dir, seed):
    """SIGTERM to prefill mid-round: what it has runs to its end, what comes after is
    refused and recomputed on decode; every output exact, decode's pool whole, and
    prefill exits well within its 30 s grace."""
    _, stub = mixed
    victim = Service("prefill_service", tiny_llama4_dir)
    took = []

    def drain(rng):
        time.sleep(rng.uniform(0.05, 0.5))
        t0 = time.monotonic()
        victim.kill(signal.SIGTERM)  # waits for the exit
        took.append(time.monotonic() - t0)

    try:
        _round(stub, victim.address, offline, seed, meanwhile=drain)
    finally:
        victim.kill()
    assert took and took[0] < 20, f"seed {seed}: prefill took {took} s to drain"


@pytest.mark.parametrize("seed", [12])
def test_decode_drained_mid_round(mixed, offline, tiny_llama4_dir, seed):
    """SIGTERM to a decode instance mid-round: the requests it has generate to their end,
    exactly (any it refuses get UNAVAILABLE, nothing half-done), it exits well within
    its 30 s grace, and prefill's pool ends whole."""
    p, _ = mixed
    _, want, got, took = _decode_stopped_mid_round(p.address, offline, tiny_llama4_dir, seed, signal.SIGTERM)
    assert took < 20, f"seed {seed}: decode took {took:.1f} s to drain"
    for i, (tokens, end, _) in enumerate(got):
        assert (end == "length" and tokens == want[i]) or (end == grpc.StatusCode.UNAVAILABLE and not tokens), \
            f"seed {seed}, request {i}: ended {end} after {len(tokens)} tokens"
    assert sum(end == "length" for _, end, _ in got) > REQUESTS // 2, f"seed {seed}: most requests were refused"
    pools_whole(prefill_pb2_grpc.PrefillServiceStub(grpc.insecure_channel(p.address)), timeout=30)
