"""Coalesced parts messages, over TCP and over the NCCL control flow (gloo on CPU).

The sender's writer puts every part already queued into one message. To make that
deterministic here, GatedSender holds its writer until the test opens the gate, so all
parts queued before fill one message (up to max_message_bytes); GatedReceiver likewise
holds its completer, so a test can act while a message's data is in flight."""

import socket

import pytest
import torch

from kv_transfer import TransferStatus as S, wire
from tests.kv_transfer.helpers import (BACKENDS, DIRECT_BACKENDS, check_written, dst_of, eventually, gated, layout_of, make_caches,
                                       make_plan)

PART_BYTES = 2 * 5 * 4 * 2 * 8 * 4  # [2, n=5, bs=4, kvh=2, d=8] fp32: make_plan's default part


@pytest.fixture(params=list(BACKENDS))
def pair(request):
    """(sender, receiver, src_caches, dst_caches, dst_before); the sender's writer and the
    receiver's completer are gated shut."""
    sender_cls, receiver_cls = gated(*BACKENDS[request.param])
    src, dst = make_caches(torch.float32, seed=41), make_caches(torch.float32, seed=None)
    layout = layout_of(src)
    rx, tx = receiver_cls(layout, dst), sender_cls(layout, src)
    yield tx, rx, src, dst, [c.clone() for c in dst]
    tx.gate.set()
    rx.gate.set()
    tx.close()
    rx.close()


def two_plans(seed):
    a = make_plan(seed=seed)
    b = make_plan(seed=seed + 1, exclude={l: set(d) for l, (_, d) in a.items()})  # disjoint destinations
    return a, b


def queue_interleaved(tx, address, plans: dict):
    """a0 b0 a1 b1 ... then finish each: all queued behind the gate."""
    for layer in (0, 1, 2, 3):
        for tid, plan in plans.items():
            tx.send_layer(address, tid, layer, *plan[layer])
    for tid in plans:
        tx.finish(address, tid, 4)


def open_gates(tx, rx):
    rx.gate.set()
    tx.gate.set()


def test_parts_of_two_transfers_share_one_message(pair):
    tx, rx, src, dst, before = pair
    a, b = two_plans(50)
    rx.expect("a", dst_of(a))
    rx.expect("b", dst_of(b))
    tx.connect(rx.address)
    queue_interleaved(tx, rx.address, {"a": a, "b": b})
    open_gates(tx, rx)
    for tid in "ab":
        assert tx.wait(tid, 20) == S.DONE, tx.reason(tid)
        assert rx.wait(tid, 20) == S.DONE, rx.reason(tid)
    check_written(dst, before, src, [a, b])
    ts, rs = tx.stats(), rx.stats()
    assert (ts["messages_sent"], ts["layers_sent"], ts["layers_acked"], ts["transfers_done"]) == (1, 8, 8, 2)
    assert (rs["messages_received"], rs["layers_received"], rs["layers_discarded"]) == (1, 8, 0)
    assert rs["bytes_received"] == 8 * PART_BYTES


def test_message_size_is_capped(pair):
    tx, rx, src, dst, before = pair
    tx.max_message_bytes = 3 * PART_BYTES
    a, b = two_plans(51)
    rx.expect("a", dst_of(a))
    rx.expect("b", dst_of(b))
    tx.connect(rx.address)
    queue_interleaved(tx, rx.address, {"a": a, "b": b})
    open_gates(tx, rx)
    assert tx.wait("a", 20) == S.DONE and tx.wait("b", 20) == S.DONE
    check_written(dst, before, src, [a, b])
    assert tx.stats()["messages_sent"] == 3  # 3 + 3 + 2 parts
    assert rx.stats()["messages_received"] == 3


def test_receiver_abort_of_one_transfer_in_a_shared_message(pair):
    """The message's data is already on its way (parts posted) when a is aborted: a's
    parts are received and dropped, b's written, and the one ack fails a's parts only."""
    tx, rx, src, dst, before = pair
    a, b = two_plans(52)
    rx.expect("a", dst_of(a))
    rx.expect("b", dst_of(b))
    tx.connect(rx.address)
    queue_interleaved(tx, rx.address, {"a": a, "b": b})
    tx.gate.set()  # the message goes out; the receiver's completer is still held
    eventually(lambda: rx.poll("a") == S.TRANSFERRING and rx.poll("b") == S.TRANSFERRING, what="header read")
    rx.abort("a")
    rx.gate.set()
    assert tx.wait("a", 20) == S.FAILED and "aborted by the receiver" in tx.reason("a")
    assert tx.wait("b", 20) == S.DONE, tx.reason("b")
    assert rx.poll("a") == S.FAILED and rx.poll("b") == S.DONE
    check_written(dst, before, src, [b])
    assert (rx.stats()["layers_received"], rx.stats()["layers_discarded"]) == (4, 4)
    assert (tx.stats()["layers_acked"], tx.stats()["messages_sent"]) == (4, 1)


def test_sender_abort_drops_its_queued_parts_only(pair):
    tx, rx, src, dst, before = pair
    a, b = two_plans(53)
    rx.expect("a", dst_of(a))
    rx.expect("b", dst_of(b))
    tx.connect(rx.address)
    for layer in (0, 1, 2, 3):
        tx.send_layer(rx.address, "a", layer, *a[layer])
        tx.send_layer(rx.address, "b", layer, *b[layer])
    tx.abort("a")  # a's four parts are still queued: they never leave
    tx.finish(rx.address, "b", 4)
    open_gates(tx, rx)
    assert tx.wait("b", 20) == S.DONE, tx.reason("b")
    assert rx.wait("a", 20) == S.FAILED and "aborted by the sender" in rx.reason("a")
    check_written(dst, before, src, [b])
    ts = tx.stats()
    assert (ts["layers_dropped"], ts["layers_sent"], ts["messages_sent"]) == (4, 4, 1)
    assert rx.stats()["layers_discarded"] == 0


def test_one_bad_part_fails_its_transfer_not_its_neighbours(pair):
    """Message a0 b0 a1 b1' a2 b2 a3 b3 where b1' names a block b never expected: b0 is
    written, b1' and the b parts after it are discarded (b failed), all of a is written."""
    tx, rx, src, dst, before = pair
    a, b = two_plans(54)
    rx.expect("a", dst_of(a))
    rx.expect("b", dst_of(b))
    s1, d1 = b[1]
    stray = next(x for x in range(dst[1].shape[1]) if x not in d1 and x not in a[1][1])
    bad_b = {**b, 1: (s1, d1[:-1] + [stray])}
    tx.connect(rx.address)
    queue_interleaved(tx, rx.address, {"a": a, "b": bad_b})
    open_gates(tx, rx)
    assert tx.wait("a", 20) == S.DONE, tx.reason("a")
    assert tx.wait("b", 20) == S.FAILED
    assert "discarded layer 1" in tx.reason("b") and "not expected" in tx.reason("b")
    assert rx.poll("b") == S.FAILED and "not expected" in rx.reason("b")
    check_written(dst, before, src, [a, {0: b[0]}])
    assert (rx.stats()["layers_received"], rx.stats()["layers_discarded"]) == (5, 3)
    assert tx.stats()["layers_acked"] == 5


def test_a_layer_in_two_parts_of_one_message_and_a_repeat(pair):
    """Chunked prefill: a layer's blocks in two parts (the partial-write path); a part
    repeated for a layer already written is discarded and fails the transfer."""
    tx, rx, src, dst, before = pair
    plan = make_plan(seed=55)
    rx.expect("t", dst_of(plan))
    tx.connect(rx.address)
    for layer, (s, d) in plan.items():
        tx.send_layer(rx.address, "t", layer, s[:2], d[:2])
        tx.send_layer(rx.address, "t", layer, s[2:], d[2:])
    tx.finish(rx.address, "t", 8)
    open_gates(tx, rx)
    assert tx.wait("t", 20) == S.DONE and rx.poll("t") == S.DONE
    check_written(dst, before, src, [plan])
    assert tx.stats()["messages_sent"] == 1

    rx.expect("again", {0: plan[0][1], 1: plan[1][1]})
    for layer in (0, 0, 1):  # layer 0's blocks twice
        tx.send_layer(rx.address, "again", layer, *plan[layer])
    tx.finish(rx.address, "again", 3)
    assert tx.wait("again", 20) == S.FAILED and "already written" in tx.reason("again")
    assert rx.poll("again") == S.FAILED and "already written" in rx.reason("again")


def test_block_ids_are_checked_per_pool():
    """send_layer turns src ids into a device index once per transfer and list, keyed by
    the layer's pool size: a list valid in the 24-block pool is still refused for a
    layer of the 16-block pool, and dst ids must be int32 integers."""
    src = make_caches(torch.float32, seed=42)  # pools of 24, 16, 24, 16 blocks
    sender_cls, receiver_cls = BACKENDS["tcp"]
    with receiver_cls(layout_of(src), make_caches(torch.float32, seed=None)) as rx, \
            sender_cls(layout_of(src), src) as tx:
        rx.expect("t", {0: [0, 1], 2: [0, 1]})
        tx.send_layer(rx.address, "t", 0, [20, 21], [0, 1])
        tx.send_layer(rx.address, "t", 2, [20, 21], [0, 1])  # same pool size: the cached index
        with pytest.raises(ValueError, match=r"src_blocks: layer 1 block ids \[20, 21\] out of range"):
            tx.send_layer(rx.address, "t", 1, [20, 21], [0, 1])
        with pytest.raises(ValueError, match="dst_blocks"):
            tx.send_layer(rx.address, "t", 0, [1], [2 ** 40])
        with pytest.raises(ValueError, match="layer: 7"):
            tx.send_layer(rx.address, "t", 7, [1], [1])
        tx.finish(rx.address, "t", 2)
        assert tx.wait("t", 20) == S.DONE, tx.reason("t")
        assert torch.equal(rx.kv_caches[2][:, [0, 1]], src[2][:, [20, 21]])


def test_bad_parts_messages_from_a_raw_sender():
    """A payload of the wrong size fails the message's parts but keeps the connection in
    sync; a malformed header drops the connection, failing what it fed."""
    sender_cls, receiver_cls = BACKENDS["tcp"]
    dst = make_caches(torch.float32, seed=None)
    with receiver_cls(layout_of(dst), dst) as rx, socket.create_connection(wire.parse_address(rx.address)) as s:
        wire.send_frame(s, {"op": "hello", "proto": wire.PROTO_VERSION, "data_plane": "tcp",
                            "layout": rx.layout.to_dict()})
        r = wire.Reader(s)
        assert r.frame()[0] == "hello_ok"
        rx.expect("short", {0: [1, 2]})
        rx.expect("fine", {0: [3]})
        part = torch.ones(2, 1, 4, 2, 8)  # one block's worth, for a part that names two
        wire.send_frame(s, wire.pack_parts(0, [("short", 0, 0, ())], [2]),
                        [memoryview(wire.block_ids([1, 2], "dst")), wire.tensor_bytes(part)])
        op, ack = r.frame()
        assert op == "ack" and ack.seq == 0 and ack.failed[0][0] == 0 and "payload of" in ack.failed[0][1]
        assert rx.poll("short") == S.FAILED
        wire.send_frame(s, wire.pack_parts(1, [("fine", 0, 0, ())], [1]),
                        [memoryview(wire.block_ids([3], "dst")), wire.tensor_bytes(part)])
        assert r.frame() == ("ack", wire.Ack(1, []))
        assert rx.poll("fine") == S.DONE and torch.equal(dst[0][:, 3], part[:, 0])

        rx.expect("cut", {0: [5], 1: [5]})
        wire.send_frame(s, wire.pack_parts(2, [("cut", 0, 0, ())], [1]),
                        [memoryview(wire.block_ids([5], "dst")), wire.tensor_bytes(part)])
        assert r.frame() == ("ack", wire.Ack(2, []))
        wire.send_frame(s, wire.pack_parts(3, [("cut", 1, 7, ())], [1]))  # no list 7
        assert rx.wait("cut", 10) == S.FAILED and "disconnected" in rx.reason("cut")
        assert s.recv(1) == b""  # the receiver closed the connection


@pytest.mark.parametrize("backend", ["gloo", "gloo-grouped"])
def test_inline_writes_onto_an_idle_link_and_finish_flushes(backend):
    """The NCCL flow (gloo: a message is in flight until acked), the writer thread and the
    receiver's completer held: the first send_layer goes out on the caller's thread (the
    link is idle), the next ones queue behind it, and finish writes the queue inline as
    one message (nothing would follow to carry it out). Bytes land exactly, in queue
    order, with finish last."""
    sender_cls, receiver_cls = gated(*DIRECT_BACKENDS[backend])
    sender_cls = type("InlineGatedSender", (sender_cls,), {"write_inline": True})
    src, dst = make_caches(torch.float32, seed=45), make_caches(torch.float32, seed=None)
    before = [c.clone() for c in dst]
    layout = layout_of(src)
    a, b = two_plans(45)
    with receiver_cls(layout, dst) as rx, sender_cls(layout, src) as tx:
        assert tx.LINK_DEPTH == 1
        rx.expect("a", dst_of(a))
        rx.expect("b", dst_of(b))
        tx.connect(rx.address)
        tx.send_layer(rx.address, "a", 0, *a[0])  # written before the call returns
        assert tx.stats()["messages_inline"] == tx.stats()["messages_sent"] == 1
        for layer in (1, 2, 3):
            tx.send_layer(rx.address, "a", layer, *a[layer])
        for layer in (0, 1, 2, 3):
            tx.send_layer(rx.address, "b", layer, *b[layer])
        assert tx.stats()["messages_sent"] == 1  # one in flight (unacked): the rest queue
        tx.finish(rx.address, "a", 4)  # flushes the seven queued parts as one message, then itself
        tx.finish(rx.address, "b", 4)
        st = tx.stats()
        assert st["messages_inline"] == st["messages_sent"] == 2, st
        open_gates(tx, rx)
        for tid in "ab":
            assert tx.wait(tid, 20) == S.DONE, tx.reason(tid)
            assert rx.wait(tid, 20) == S.DONE, rx.reason(tid)
        check_written(dst, before, src, [a, b])
        assert tx.stats()["messages_sent"] == 2
