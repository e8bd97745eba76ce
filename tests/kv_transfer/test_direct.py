"""Direct runs: blocks whose src and dst ids are both consecutive travel as cache views
and land straight in the receiver's cache. Over TCP (recv_into the cache), the NCCL
control flow on gloo, and that flow with grouped ops (gloo emulating NCCL's grouping).

Plans here are made of consecutive segments (helpers.run_plan) so that parts mix long
runs, which go direct (min_direct_blocks=2 here), and single blocks, which are staged."""

import contextlib
import random
import socket
import threading
import time

import pytest
import torch

from kv_transfer import TcpReceiver, TransferStatus as S, wire
from kv_transfer.base import direct_runs
from tests.kv_transfer.helpers import (DIRECT_BACKENDS, check_written, count_blocks, dst_of, eventually, gated,
                                       layout_of, make_caches, run_plan, send_plan)

MIN = 2  # min_direct_blocks in these tests: runs of 2+ go direct


def reference_runs(src, dst, min_blocks):
    """direct_runs, one id at a time."""
    runs, start = [], 0
    for i in range(1, len(src) + 1):
        if i == len(src) or src[i] != src[i - 1] + 1 or dst[i] != dst[i - 1] + 1:
            if i - start >= min_blocks:
                runs.append((start, i - start))
            start = i
    return runs


def test_direct_runs_match_a_plain_loop():
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(1, 40)
        # ids that step by one often, so runs of every length show up, on either side alone too
        src, dst = [rng.randint(0, 99)], [rng.randint(0, 99)]
        for _ in range(n - 1):
            src.append(src[-1] + 1 if rng.random() < 0.7 else rng.randint(0, 99))
            dst.append(dst[-1] + 1 if rng.random() < 0.7 else rng.randint(0, 99))
        m = rng.randint(1, 6)
        assert direct_runs(torch.tensor(src), torch.tensor(dst), m) == reference_runs(src, dst, m), (src, dst, m)
    assert direct_runs(torch.tensor([5]), torch.tensor([9]), 1) == [(0, 1)]
    assert direct_runs(torch.tensor([1, 2, 3]), torch.tensor([7, 8, 9]), 4) == []
    assert direct_runs(torch.tensor([1, 2, 3, 9]), torch.tensor([7, 8, 9, 10]), 2) == [(0, 3)]  # src breaks
    assert direct_runs(torch.tensor([1, 2, 3, 4]), torch.tensor([7, 8, 0, 1]), 2) == [(0, 2), (2, 2)]  # dst breaks


@pytest.fixture(params=list(DIRECT_BACKENDS))
def backend(request):
    return request.param


@pytest.fixture
def gated_pair(backend):
    """(sender, receiver, src_caches, dst_caches, dst_before), writer and completer gated shut."""
    sender_cls, receiver_cls = gated(*DIRECT_BACKENDS[backend])
    src, dst = make_caches(torch.float32, seed=71), make_caches(torch.float32, seed=None)
    layout = layout_of(src)
    rx, tx = receiver_cls(layout, dst), sender_cls(layout, src, min_direct_blocks=MIN)
    yield tx, rx, src, dst, [c.clone() for c in dst]
    tx.gate.set()
    rx.gate.set()
    tx.close()
    rx.close()


def two_run_plans(seed):
    """Disjoint destinations: a in the low half of each pool, b in the high half."""
    lengths = (3, 1, 2, 1)
    return (run_plan(seed, lengths, dst_range=(0.0, 0.5)), run_plan(seed + 1, lengths, dst_range=(0.5, 1.0)))


def test_mixed_runs_give_exactly_the_staged_bytes(backend):
    """a0 b0 a1 b1 ... in one message, b's layers in two parts each (the partial-write
    path with runs). The cache ends up exactly as the all-staged path leaves it, and
    the counters split the blocks by path on both sides."""
    a, b = two_run_plans(72)
    sender_cls, receiver_cls = gated(*DIRECT_BACKENDS[backend])
    src = make_caches(torch.float32, seed=72)
    results = {}
    for min_blocks in (MIN, 10 ** 6):  # direct where it can, then never
        dst = make_caches(torch.float32, seed=None)
        before = [c.clone() for c in dst]
        with receiver_cls(layout_of(src), dst) as rx, sender_cls(layout_of(src), src,
                                                                 min_direct_blocks=min_blocks) as tx:
            rx.expect("a", dst_of(a))
            rx.expect("b", dst_of(b))
            tx.connect(rx.address)
            for layer in a:
                tx.send_layer(rx.address, "a", layer, *a[layer])
                s, d = b[layer]
                tx.send_layer(rx.address, "b", layer, s[:4], d[:4])
                tx.send_layer(rx.address, "b", layer, s[4:], d[4:])
            tx.finish(rx.address, "a", 4)
            tx.finish(rx.address, "b", 8)
            rx.gate.set()
            tx.gate.set()
            for tid in "ab":
                assert tx.wait(tid, 20) == S.DONE, tx.reason(tid)
                assert rx.wait(tid, 20) == S.DONE, rx.reason(tid)
            check_written(dst, before, src, [a, b])
            ts, rs = tx.stats(), rx.stats()
        b_parts = [{layer: (s[:4], d[:4]) for layer, (s, d) in b.items()},
                   {layer: (s[4:], d[4:]) for layer, (s, d) in b.items()}]
        direct, staged = count_blocks([a, *b_parts], min_blocks)
        assert (ts["blocks_direct"], ts["blocks_staged"]) == (direct, staged)
        assert (rs["blocks_direct"], rs["blocks_staged"]) == (direct, staged)
        assert ts["messages_sent"] == 1 and rs["layers_received"] == 12
        assert rs["bytes_received"] == (direct + staged) * 2 * 4 * 2 * 8 * 4
        results[min_blocks] = dst
    assert count_blocks([a, *b_parts], MIN)[0] >= 20  # the plans really have runs
    for mine, staged_path in zip(results[MIN], results[10 ** 6]):
        assert torch.equal(mine, staged_path)


def test_bf16_runs_round_trip(backend):
    src, dst = make_caches(torch.bfloat16, seed=73), make_caches(torch.bfloat16, seed=None)
    before = [c.clone() for c in dst]
    plan = run_plan(73, lengths=(6, 1, 5))
    sender_cls, receiver_cls = DIRECT_BACKENDS[backend]
    with receiver_cls(layout_of(src), dst) as rx, sender_cls(layout_of(src), src, min_direct_blocks=MIN) as tx:
        send_plan(tx, rx, plan)
        tx.finish(rx.address, "t", 4)
        assert tx.wait("t", 20) == S.DONE, tx.reason("t")
        check_written(dst, before, src, [plan])
        assert rx.stats()["blocks_direct"] == count_blocks([plan], MIN)[0] >= 4 * 11


def test_fp8_caches_travel_as_bytes(backend):
    """fp8 caches (the engine's --kv-cache-dtype fp8): index_copy_ has no fp8 kernel on
    CPU and gloo no fp8 type, so the data plane copies and sends bits; runs and staged
    blocks both land byte for byte."""
    fp8 = torch.float8_e4m3fn
    src = [c.to(fp8) for c in make_caches(torch.float32, seed=79)]
    dst = [c.to(fp8) for c in make_caches(torch.float32, seed=None)]
    before = [c.clone() for c in dst]
    plan = run_plan(79, lengths=(5, 1, 2, 1))
    sender_cls, receiver_cls = DIRECT_BACKENDS[backend]
    with receiver_cls(layout_of(src), dst) as rx, sender_cls(layout_of(src), src, min_direct_blocks=MIN) as tx:
        send_plan(tx, rx, plan)
        tx.finish(rx.address, "t", 4)
        assert tx.wait("t", 20) == S.DONE, tx.reason("t")
        stats = rx.stats()
    as_bytes = lambda caches: [c.view(torch.uint8) for c in caches]  # fp8 has no == on CPU
    check_written(as_bytes(dst), as_bytes(before), as_bytes(src), [plan])
    assert stats["blocks_direct"] == 4 * 7 and stats["blocks_staged"] == 4 * 2


@pytest.mark.parametrize("how", ["abort", "release"])
def test_abort_and_release_wait_for_a_landing_direct_recv(gated_pair, how):
    """The message's recvs are posted and its runs claimed, but the completer (gated)
    has not seen them complete: abort() / release() must not return until it has, and
    no byte of the transfer lands after."""
    tx, rx, src, dst, before = gated_pair
    plan = run_plan(74, lengths=(5, 1, 4))
    send_plan(tx, rx, plan)
    tx.gate.set()
    eventually(lambda: rx.poll("t") == S.TRANSFERRING, what="header read")
    returned = threading.Event()
    waiter = threading.Thread(target=lambda: (getattr(rx, how)("t"), returned.set()))
    waiter.start()
    time.sleep(0.3)
    assert not returned.is_set(), f"{how}() returned while direct recvs were landing"
    rx.gate.set()
    waiter.join(10)
    assert returned.is_set()
    landed = [c.clone() for c in dst]
    tx.finish(rx.address, "t", 4)
    assert tx.wait("t", 20) == S.FAILED  # the parts were discarded (aborted or unknown)
    for now, then in zip(dst, landed):
        assert torch.equal(now, then), "a byte landed after abort/release returned"
    assert rx.stats()["layers_received"] == 0


def raw_sender(rx: TcpReceiver) -> socket.socket:
    s = socket.create_connection(wire.parse_address(rx.address))
    wire.send_frame(s, {"op": "hello", "proto": wire.PROTO_VERSION, "data_plane": "tcp", "layout": rx.layout.to_dict()})
    assert wire.Reader(s).frame()[0] == "hello_ok"  # the only frame on the wire: a reader of its own is safe
    return s


def send_run_header(s: socket.socket, tid: str, dst_blocks: list[int], runs, payload_bytes: int) -> None:
    """A parts header for one part of layer 0, its ids, and nothing of its data yet."""
    head = wire.pack_parts(0, [(tid, 0, 0, runs)], [len(dst_blocks)])
    ids = wire.block_ids(dst_blocks, "dst")
    s.sendall(wire._PREFIX.pack(len(head), len(ids) + payload_bytes) + head + ids)


BLOCK_BYTES = 2 * 4 * 2 * 8 * 4  # K and V of one block, fp32


@pytest.mark.parametrize("fate", ["stalls", "dies"])
def test_a_stalled_or_dead_sender_cannot_hold_abort_or_write_after_it(fate):
    """A raw sender announces a direct run of 6 blocks and sends half its K bytes. If it
    stalls, abort() waits abort_wait, then tears the connection down; if it dies, the
    connection is dropped at once. Either way abort() returns, the transfer is FAILED,
    and nothing lands after."""
    dst = make_caches(torch.float32, seed=None)
    with TcpReceiver(layout_of(dst), dst) as rx, raw_sender(rx) as s:
        rx.abort_wait = 0.3
        rx.expect("t", {0: [10, 11, 12, 13, 14, 15]})
        send_run_header(s, "t", [10, 11, 12, 13, 14, 15], ((0, 6),), 6 * BLOCK_BYTES)
        s.sendall(torch.ones(3 * BLOCK_BYTES // 8, dtype=torch.float32).numpy().tobytes())  # K of blocks 10..12
        eventually(lambda: torch.equal(dst[0][0, 12], torch.ones(4, 2, 8)), what="the first bytes landing")
        if fate == "dies":
            s.close()
            assert rx.wait("t", 10) == S.FAILED and "disconnected" in rx.reason("t")
        t0 = time.monotonic()
        rx.abort("t")
        waited = time.monotonic() - t0
        if fate == "stalls":
            assert 0.25 < waited < 10, waited
            assert rx.poll("t") == S.FAILED
        else:
            assert waited < 0.25, waited
        landed = [c.clone() for c in dst]
        if fate == "stalls":
            with contextlib.suppress(OSError):  # the receiver may have closed the connection already
                s.sendall(torch.full((9 * BLOCK_BYTES // 4,), 5.0).numpy().tobytes())
            eventually(lambda: rx.stats()["connections"] == 0, what="connection dropped")
        rx.release("t")
        assert all(torch.equal(a, b) for a, b in zip(dst, landed))
        assert not (dst[0] == 5.0).any()


@pytest.mark.parametrize("runs, why", [
    (((0, 3),), "not consecutive"),  # ids 10, 11, 13
    (((1, 3),), "malformed"),  # past the end of a 3-id list
    (((0, 2), (1, 2)), "malformed"),  # overlapping
    (((0, 0),), "malformed"),  # empty
])
def test_bad_runs_drop_the_connection(runs, why):
    """A run whose destination ids are not consecutive would write blocks nobody named:
    the stream cannot be trusted, the connection goes, and with it the transfer it fed
    (here after a first, good part). Nothing of the bad part lands."""
    dst = make_caches(torch.float32, seed=None)
    with TcpReceiver(layout_of(dst), dst) as rx, raw_sender(rx) as s:
        rx.expect("t", {0: [10, 11, 13], 1: [3]})
        wire.send_frame(s, wire.pack_parts(0, [("t", 1, 0, ())], [1]),
                        [memoryview(wire.block_ids([3], "dst")), wire.tensor_bytes(torch.ones(2, 1, 4, 2, 8))])
        assert wire.Reader(s).frame() == ("ack", wire.Ack(0, []))
        before = [c.clone() for c in dst]
        send_run_header(s, "t", [10, 11, 13], runs, 3 * BLOCK_BYTES)
        with contextlib.suppress(OSError):  # the receiver may be gone already
            s.sendall(torch.full((3 * BLOCK_BYTES // 4,), 7.0).numpy().tobytes())
        assert rx.wait("t", 10) == S.FAILED and why in rx.reason("t")
        assert all(torch.equal(a, b) for a, b in zip(dst, before))


def test_runs_that_may_not_land_are_dropped_and_the_stream_stays_in_step(backend):
    """Direct parts for an unknown transfer, an aborted one and blocks nobody expected
    are received aside and dropped; the next transfer on the same connection is exact."""
    sender_cls, receiver_cls = DIRECT_BACKENDS[backend]
    src, dst = make_caches(torch.float32, seed=75), make_caches(torch.float32, seed=None)
    before = [c.clone() for c in dst]
    plan = run_plan(75, lengths=(4, 1, 3))
    with receiver_cls(layout_of(src), dst) as rx, sender_cls(layout_of(src), src, min_direct_blocks=MIN) as tx:
        rx.expect("aborted", dst_of(plan))
        rx.abort("aborted")
        s, d = plan[0]
        rx.expect("elsewhere", {0: [x for x in range(24) if x not in d][:len(d)]})
        for tid in ("ghost", "aborted", "elsewhere"):
            tx.send_layer(rx.address, tid, 0, s, d)
            assert tx.wait(tid, 20) == S.FAILED, tid
        assert all(torch.equal(a, b) for a, b in zip(dst, before))
        assert rx.stats()["layers_discarded"] == 3 and rx.stats()["blocks_direct"] == 0
        rx.expect("ok", dst_of(plan))
        for layer, (s, d) in plan.items():
            tx.send_layer(rx.address, "ok", layer, s, d)
        tx.finish(rx.address, "ok", 4)
        assert tx.wait("ok", 20) == S.DONE, tx.reason("ok")
        check_written(dst, before, src, [plan])
        assert tx.stats()["connections_opened"] == 1


def test_fence_copies_queued_runs_before_their_blocks_are_reused(gated_pair):
    """Parts queued behind the gate hold cache views. fence() copies them; the caller
    then overwrites its source blocks (a freed block reused), and the receiver still
    gets what the blocks held at send_layer."""
    tx, rx, src, dst, before = gated_pair
    plan = run_plan(76, lengths=(4, 1, 3))
    original = [c.clone() for c in src]
    send_plan(tx, rx, plan)
    tx.finish(rx.address, "t", 4)
    tx.fence()
    assert tx.stats()["parts_fenced"] == 4
    for c in src:
        c.fill_(123.0)
    rx.gate.set()
    tx.gate.set()
    assert tx.wait("t", 20) == S.DONE, tx.reason("t")
    check_written(dst, before, original, [plan])
    tx.fence()  # nothing pending: returns at once
    assert tx.stats()["parts_fenced"] == 4


def test_fence_waits_for_runs_already_sent(gated_pair):
    """On CPU caches a message's runs are read until the receiver has them: fence()
    returns only once the message is acked."""
    tx, rx, src, dst, before = gated_pair
    plan = run_plan(77, lengths=(4, 1, 3))
    send_plan(tx, rx, plan)
    tx.gate.set()
    eventually(lambda: tx.stats()["messages_sent"] == 1, what="message sent")
    returned = threading.Event()
    fencer = threading.Thread(target=lambda: (tx.fence(), returned.set()))
    fencer.start()
    time.sleep(0.3)
    assert not returned.is_set(), "fence() returned before the runs were acked"
    rx.gate.set()
    fencer.join(10)
    assert returned.is_set() and tx.stats()["layers_acked"] == 4 and tx.stats()["parts_fenced"] == 0
    tx.finish(rx.address, "t", 4)
    assert tx.wait("t", 20) == S.DONE


def test_sender_abort_drops_queued_direct_parts(gated_pair):
    tx, rx, src, dst, before = gated_pair
    plan = run_plan(78, lengths=(4, 1, 3))
    send_plan(tx, rx, plan)
    tx.abort("t")
    tx.gate.set()
    rx.gate.set()
    assert rx.wait("t", 20) == S.FAILED and "aborted by the sender" in rx.reason("t")
    eventually(lambda: tx.stats()["layers_dropped"] == 4, what="parts dropped")
    tx.fence()  # the dropped parts no longer count as queued
    assert tx.stats()["parts_fenced"] == 0 and tx.stats()["blocks_direct"] == 0
    assert all(torch.equal(a, b) for a, b in zip(dst, before))


def test_bad_min_direct_blocks_is_a_value_error():
    src = make_caches(torch.float32, seed=0)
    sender_cls, _ = DIRECT_BACKENDS["tcp"]
    for bad in (0, -3, 2.5, "4"):
        with pytest.raises(ValueError, match="min_direct_blocks"):
            sender_cls(layout_of(src), src, min_direct_blocks=bad)
    # the default: 2 MiB of K per run; a block of these caches has 4 x 2 x 8 x 4 = 256 B of K
    assert sender_cls(layout_of(src), src).min_direct_blocks == (2 << 20) // 256
