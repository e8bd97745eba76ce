"""TCP backend, sender and receiver in one process (threads), real sockets on loopback."""

import socket
import threading

import pytest
import torch

from kv_transfer import TcpReceiver, TcpSender, TransferStatus as S, wire
from tests.kv_transfer.helpers import check_written, dst_of, eventually, layout_of, make_caches, make_plan


@pytest.fixture
def pair(request):
    """(sender, receiver, src_caches, dst_caches, dst_before) for the dtype in request.param."""
    dtype = getattr(request, "param", torch.float32)
    src, dst = make_caches(dtype, seed=1), make_caches(dtype, seed=None)
    layout = layout_of(src)
    rx, tx = TcpReceiver(layout, dst), TcpSender(layout, src)
    yield tx, rx, src, dst, [c.clone() for c in dst]
    tx.close()
    rx.close()


def send_all(tx, address, tid, plan, finish=True):
    for layer, (s, d) in plan.items():
        tx.send_layer(address, tid, layer, s, d)
    if finish:
        tx.finish(address, tid, len(plan))


@pytest.mark.parametrize("pair", [torch.float32, torch.bfloat16], indirect=True, ids=["fp32", "bf16"])
def test_round_trip_two_interleaved_transfers(pair):
    tx, rx, src, dst, before = pair
    a = make_plan(seed=10)
    b = make_plan(seed=11, exclude={l: set(d) for l, (_, d) in a.items()})  # disjoint destinations
    rx.expect("a", dst_of(a))
    rx.expect("b", dst_of(b))
    assert rx.poll("a") == S.WAITING
    for layer in a:  # a0 b0 a1 b1 ... on one connection
        tx.send_layer(rx.address, "a", layer, *a[layer])
        tx.send_layer(rx.address, "b", layer, *b[layer])
    assert tx.poll("a") == S.TRANSFERRING  # no finish yet: the sender cannot be DONE
    tx.finish(rx.address, "b", 4)
    tx.finish(rx.address, "a", 4)
    for tid in "ab":
        assert tx.wait(tid, 10) == S.DONE, tx.reason(tid)
        assert rx.wait(tid, 10) == S.DONE, rx.reason(tid)
    check_written(dst, before, src, [a, b])
    layer_bytes = 2 * 5 * 4 * 2 * 8 * src[0].element_size()
    assert rx.stats()["bytes_received"] == 8 * layer_bytes
    assert rx.stats()["layers_received"] == 8 and rx.stats()["transfers_done"] == 2
    assert tx.stats()["transfers_done"] == 2 and tx.stats()["layers_acked"] == 8
    assert tx.stats()["bytes_sent"] > 8 * layer_bytes  # payload plus framing
    rx.release("a")
    with pytest.raises(KeyError):
        rx.poll("a")


def test_receiver_transferring_then_done_on_last_layer(pair):
    tx, rx, src, dst, before = pair
    plan = make_plan(seed=3)
    rx.expect("t", dst_of(plan))
    tx.send_layer(rx.address, "t", 0, *plan[0])
    eventually(lambda: rx.poll("t") == S.TRANSFERRING, what="TRANSFERRING")
    send_all(tx, rx.address, "t", {l: plan[l] for l in (1, 2, 3)}, finish=False)
    assert rx.wait("t", 10) == S.DONE  # the receiver knows from expect(); no finish needed
    with pytest.raises(ValueError, match="num_layers"):
        tx.finish(rx.address, "t", 3)  # 4 were sent
    tx.finish(rx.address, "t", 4)
    assert tx.wait("t", 10) == S.DONE


def test_abort_before_transfer_discards_late_data(pair):
    tx, rx, src, dst, before = pair
    plan = make_plan(seed=4)
    rx.expect("t", dst_of(plan))
    rx.abort("t")
    assert rx.poll("t") == S.FAILED
    send_all(tx, rx.address, "t", plan)
    assert tx.wait("t", 10) == S.FAILED
    assert "aborted by the receiver" in tx.reason("t")
    eventually(lambda: rx.stats()["layers_discarded"] >= 1, what="discard")
    check_written(dst, before, src, [])
    assert rx.stats()["layers_received"] == 0


def test_receiver_abort_during_transfer(pair):
    tx, rx, src, dst, before = pair
    plan = make_plan(seed=5)
    rx.expect("t", dst_of(plan))
    send_all(tx, rx.address, "t", {0: plan[0], 1: plan[1]}, finish=False)
    eventually(lambda: rx.stats()["layers_received"] == 2, what="two layers")
    rx.abort("t")
    send_all(tx, rx.address, "t", {2: plan[2], 3: plan[3]}, finish=False)
    tx.finish(rx.address, "t", 4)
    assert tx.wait("t", 10) == S.FAILED and rx.poll("t") == S.FAILED
    check_written(dst, before, src, [plan], layers_written={0, 1})  # 2 and 3 never landed
    assert rx.stats()["layers_received"] == 2


def test_sender_abort_during_transfer(pair):
    tx, rx, src, dst, before = pair
    plan = make_plan(seed=6)
    rx.expect("t", dst_of(plan))
    send_all(tx, rx.address, "t", {0: plan[0]}, finish=False)
    eventually(lambda: rx.stats()["layers_received"] == 1, what="one layer")
    tx.abort("t")
    assert tx.poll("t") == S.FAILED
    assert rx.wait("t", 10) == S.FAILED
    assert "aborted by the sender" in rx.reason("t")
    send_all(tx, rx.address, "t", {l: plan[l] for l in (1, 2, 3)}, finish=False)  # no-ops now
    tx.finish(rx.address, "t", 4)
    check_written(dst, before, src, [plan], layers_written={0})
    assert tx.stats()["layers_sent"] == 1


def test_unknown_transfer_is_discarded_and_sender_fails(pair):
    tx, rx, src, dst, before = pair
    plan = make_plan(seed=7)
    send_all(tx, rx.address, "nobody-expects-this", plan)
    assert tx.wait("nobody-expects-this", 10) == S.FAILED
    assert "unknown transfer" in tx.reason("nobody-expects-this")
    check_written(dst, before, src, [])
    # the connection stays healthy for the next transfer
    rx.expect("ok", dst_of(plan))
    send_all(tx, rx.address, "ok", plan)
    assert tx.wait("ok", 10) == S.DONE and rx.poll("ok") == S.DONE
    check_written(dst, before, src, [plan])


def test_missing_layers_at_finish_fail_both_sides(pair):
    tx, rx, src, dst, before = pair
    plan = make_plan(seed=8)
    rx.expect("t", dst_of(plan))
    send_all(tx, rx.address, "t", {0: plan[0], 1: plan[1]})
    assert tx.wait("t", 10) == S.FAILED and rx.wait("t", 10) == S.FAILED
    assert "of 4 layers complete" in rx.reason("t")


def test_wrong_destination_blocks_fail(pair):
    tx, rx, src, dst, before = pair
    plan = make_plan(seed=9)
    rx.expect("t", dst_of(plan))
    s, d = plan[0]
    stray = next(b for b in range(dst[0].shape[1]) if b not in d)  # a block nobody expected
    tx.send_layer(rx.address, "t", 0, s, d[:-1] + [stray])
    assert rx.wait("t", 10) == S.FAILED and "not expected" in rx.reason("t")
    check_written(dst, before, src, [])


def test_a_layer_may_arrive_in_several_messages(pair):
    """Chunked prefill sends a layer's blocks as they complete, over several steps."""
    tx, rx, src, dst, before = pair
    plan = make_plan(seed=10)
    rx.expect("t", dst_of(plan))
    n = 0
    for layer, (s, d) in plan.items():
        half = len(s) // 2
        for lo, hi in ((0, half), (half, len(s))):
            if hi > lo:
                tx.send_layer(rx.address, "t", layer, s[lo:hi], d[lo:hi])
                n += 1
    tx.finish(rx.address, "t", n)
    assert tx.wait("t", 10) == S.DONE and rx.wait("t", 10) == S.DONE
    check_written(dst, before, src, [plan])


def test_connection_reuse_many_transfers_one_peer(pair):
    tx, rx, src, dst, before = pair
    plans = {f"t{i}": make_plan(seed=100 + i, layers=(0, 2), n=2) for i in range(20)}
    for tid, plan in plans.items():
        rx.expect(tid, dst_of(plan))
    threads = [threading.Thread(target=send_all, args=(tx, rx.address, tid, plan)) for tid, plan in plans.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for tid in plans:
        assert tx.wait(tid, 10) == S.DONE, tx.reason(tid)
    assert tx.stats()["connections_opened"] == 1
    assert rx.stats()["connections_accepted"] == 1
    assert tx.stats()["transfers_done"] == 20


def test_many_peers_one_connection_each():
    src = make_caches(torch.float32, seed=2)
    layout = layout_of(src)
    rxs = [TcpReceiver(layout, make_caches(torch.float32, seed=None)) for _ in range(3)]
    try:
        with TcpSender(layout, src) as tx:
            plan = make_plan(seed=12, layers=(1,), n=3)
            for round_ in range(2):
                for i, rx in enumerate(rxs):  # a transfer id belongs to one receiver
                    rx.expect(f"r{round_}-{i}", dst_of(plan))
                    send_all(tx, rx.address, f"r{round_}-{i}", plan)
                for i, rx in enumerate(rxs):
                    assert rx.wait(f"r{round_}-{i}", 10) == S.DONE
                    assert tx.wait(f"r{round_}-{i}", 10) == S.DONE
                    rx.release(f"r{round_}-{i}")
                    tx.release(f"r{round_}-{i}")
            assert tx.stats()["connections_opened"] == 3
            for rx in rxs:
                assert torch.equal(rx.kv_caches[1][:, plan[1][1]], src[1][:, plan[1][0]])
    finally:
        for rx in rxs:
            rx.close()


def test_sender_dies_mid_message_never_partial_write(pair):
    """A raw sender: valid handshake and header, half the payload, then gone."""
    tx, rx, src, dst, before = pair
    plan = make_plan(seed=13)
    rx.expect("t", dst_of(plan))
    host, port = wire.parse_address(rx.address)
    with socket.create_connection((host, port)) as s:
        wire.send_frame(s, {"op": "hello", "proto": wire.PROTO_VERSION, "data_plane": "tcp",
                            "layout": rx.layout.to_dict()})
        assert wire.Reader(s).frame()[0] == "hello_ok"
        s_blocks, d_blocks = plan[0]
        data = src[0][:, s_blocks].contiguous()
        payload = wire.tensor_bytes(data)
        head = wire.pack_parts(0, [("t", 0, 0, ())], [len(d_blocks)])
        ids = wire.block_ids(d_blocks, "dst")
        s.sendall(wire._PREFIX.pack(len(head), len(ids) + payload.nbytes) + head + ids
                  + bytes(payload[: payload.nbytes // 2]))
        eventually(lambda: rx.poll("t") == S.TRANSFERRING, what="header seen")
    assert rx.wait("t", 10) == S.FAILED
    assert "disconnected" in rx.reason("t")
    check_written(dst, before, src, [])


def test_wait_times_out_with_current_status(pair):
    tx, rx, *_ = pair
    rx.expect("t", {0: [1]})
    assert rx.wait("t", 0.05) == S.WAITING
    with pytest.raises(KeyError):
        rx.wait("never", 0.01)


def test_bad_arguments_are_value_errors(pair):
    tx, rx, *_ = pair
    with pytest.raises(ValueError, match="out of range"):
        rx.expect("t", {0: [999]})
    with pytest.raises(ValueError, match="layer"):
        rx.expect("t", {9: [1]})
    with pytest.raises(ValueError, match="twice"):
        rx.expect("t", {0: [1, 1]})
    rx.expect("t", {0: [1]})
    with pytest.raises(ValueError, match="already expected"):
        rx.expect("t", {0: [2]})
    with pytest.raises(ValueError, match="dst_blocks"):
        tx.send_layer(rx.address, "t", 0, [1, 2], [3])
    with pytest.raises(ValueError, match="address"):
        tx.connect("no-port-here")
