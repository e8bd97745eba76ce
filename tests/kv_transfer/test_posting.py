"""send_layer posts each part's data itself (NCCL: its send), under the sender's data
lock: the order of posts is the order of parts in the headers, the writer thread makes
no data-plane call, acked sends are reaped without the caller's help when it is idle
(and by its next call when it is not), and a failed post ends the connection. Over TCP
(whose post is a no-op) and over the NCCL control flow (gloo on CPU)."""

import threading

import pytest
import torch

from kv_transfer import TransferStatus as S
from tests.kv_transfer.helpers import BACKENDS, check_written, dst_of, eventually, layout_of, make_caches, make_plan
from tests.kv_transfer.test_coalescing import GatedWriter


class Recording(GatedWriter):
    """Logs (tid, layer, thread) of every post and every part put in a header."""

    def __init__(self, *args, **kwargs):
        self.posted, self.headed, self.log_lock = [], [], threading.Lock()
        super().__init__(*args, **kwargs)

    def _post(self, peer, part):
        with self.log_lock:
            self.posted.append((part.tid, part.layer, threading.current_thread().name))
        super()._post(peer, part)

    def _transmit(self, peer, header, ids, parts, sent):
        with self.log_lock:
            self.headed.extend((tid, layer, threading.current_thread().name) for tid, layer, _ in header["parts"])
        return super()._transmit(peer, header, ids, parts, sent)


@pytest.fixture(params=list(BACKENDS))
def pair(request):
    sender_cls, receiver_cls = BACKENDS[request.param]
    src, dst = make_caches(torch.float32, seed=71), make_caches(torch.float32, seed=None)
    layout = layout_of(src)
    rx = receiver_cls(layout, dst)
    tx = type("RecordingSender", (Recording, sender_cls), {})(layout, src)
    yield tx, rx, src, dst, [c.clone() for c in dst]
    tx.gate.set()
    tx.close()
    rx.close()


def test_posting_order_is_header_order_with_concurrent_callers(pair):
    """Four caller threads, a transfer each, parts of different sizes (a mismatch between
    post order and header order would pair a send with the wrong recv): every byte lands
    where it should, posts happen on the callers' threads, headers on the writer's."""
    tx, rx, src, dst, before = pair
    tx.max_message_bytes = 5_000  # a few parts a message: several messages
    plans, used = {}, {layer: set() for layer in range(4)}
    for k in range(4):
        plans[f"t{k}"] = plan = make_plan(seed=72 + k, n=1 + k, exclude=used)
        for layer, (_, d) in plan.items():
            used[layer].update(d)
        rx.expect(f"t{k}", dst_of(plan))
    tx.connect(rx.address)
    start = threading.Barrier(4)

    def caller(tid):
        start.wait()
        for layer in (0, 1, 2, 3):
            tx.send_layer(rx.address, tid, layer, *plans[tid][layer])
        tx.finish(rx.address, tid, 4)

    callers = [threading.Thread(target=caller, args=(tid,), name=f"caller-{tid}") for tid in plans]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    tx.gate.set()
    for tid in plans:
        assert tx.wait(tid, 20) == S.DONE, tx.reason(tid)
        assert rx.wait(tid, 20) == S.DONE, rx.reason(tid)
    check_written(dst, before, src, list(plans.values()))
    assert [p[:2] for p in tx.posted] == [h[:2] for h in tx.headed] and len(tx.posted) == 16
    assert {name for *_, name in tx.posted} == {f"caller-{tid}" for tid in plans}
    assert {name for *_, name in tx.headed} == {f"kv-send-write-{rx.address}"}
    assert tx.stats()["messages_sent"] > 1


def test_acked_sends_are_reaped_by_the_reader_or_by_the_next_call(pair):
    """While a send_layer holds the data lock, the reader leaves acked messages to the
    caller; once the lock is free it reaps them itself (no further call needed)."""
    tx, rx, *_ = pair
    if not tx.posts_in_send_layer:
        pytest.skip("TCP frees a message's buffers at its ack")
    plan = make_plan(seed=76)
    for tid in ("held", "idle"):
        rx.expect(tid, dst_of(plan) if tid == "held" else {0: plan[0][1]})
    for layer, (s, d) in plan.items():
        tx.send_layer(rx.address, "held", layer, s, d)
    tx.finish(rx.address, "held", 4)
    with tx._data_lock:  # as if the caller were inside send_layer when the acks come
        tx.gate.set()
        assert tx.wait("held", 20) == S.DONE, tx.reason("held")
        assert len(tx._acked) == tx.stats()["messages_sent"] == 1
    rx.release("held")
    tx.send_layer(rx.address, "idle", 0, *plan[0])  # reaps before its gather
    assert not tx._acked
    # nobody calls anything now: only the reader can reap this message, at its ack
    eventually(lambda: tx.stats()["layers_acked"] == 5 and not tx._acked, what="the reader's reap")
    tx.finish(rx.address, "idle", 1)
    assert tx.wait("idle", 20) == S.DONE, tx.reason("idle")


def test_a_failed_post_fails_the_transfer_and_the_connection(pair):
    """The post is where the data plane can break; a later transfer reconnects."""
    tx, rx, src, dst, before = pair
    tx.gate.set()
    plan = make_plan(seed=77)
    rx.expect("broken", dst_of(plan))
    rx.expect("later", dst_of(plan))
    post = tx._post

    def failing_post(peer, part):
        if part.layer == 1:
            raise RuntimeError("injected")
        post(peer, part)

    tx._post = failing_post
    tx.send_layer(rx.address, "broken", 0, *plan[0])
    eventually(lambda: tx.stats()["layers_acked"] == 1, what="layer 0's ack")  # the receiver knows the connection
    tx.send_layer(rx.address, "broken", 1, *plan[1])
    assert tx.poll("broken") == S.FAILED and "posting layer 1 failed" in tx.reason("broken")
    assert rx.wait("broken", 20) == S.FAILED and "disconnected" in rx.reason("broken")
    tx._post = post
    for layer, (s, d) in plan.items():
        tx.send_layer(rx.address, "later", layer, s, d)
    tx.finish(rx.address, "later", 4)
    assert tx.wait("later", 20) == S.DONE, tx.reason("later")
    check_written(dst, before, src, [plan])
    assert tx.stats()["connections_opened"] == 2
