"""The sender's per-call path: block lists checked and converted once per transfer per
distinct (src, dst) pair and recognised by equality after that; acked messages handed to
the data plane's release hook outside the sender's lock. Over TCP and over the NCCL
control flow (gloo on CPU)."""

import pytest
import torch

from kv_transfer import TransferStatus as S
from tests.kv_transfer.helpers import BACKENDS, check_written, layout_of, make_caches, make_plan


@pytest.fixture(params=list(BACKENDS))
def pair(request):
    sender_cls, receiver_cls = BACKENDS[request.param]
    src, dst = make_caches(torch.float32, seed=61), make_caches(torch.float32, seed=None)
    layout = layout_of(src)
    rx, tx = receiver_cls(layout, dst), sender_cls(layout, src)
    yield tx, rx, src, dst, [c.clone() for c in dst]
    tx.close()
    rx.close()


def test_equal_lists_reuse_one_conversion_and_new_lists_do_not(pair):
    """Layers 0 and 2 share a pool and get equal (but distinct) lists: one conversion.
    Layer 1 gets other lists; layer 3 (layer 1's pool) layer 1's src with another dst."""
    tx, rx, src, dst, before = pair
    base = make_plan(seed=62, layers=(0, 1, 3))
    s0, d0 = base[0]
    plan = {0: (s0, d0), 2: (list(s0), list(d0)), 1: base[1], 3: (list(base[1][0]), base[3][1])}
    rx.expect("t", {layer: d for layer, (_, d) in plan.items()})
    for layer in (0, 2, 1, 3):
        tx.send_layer(rx.address, "t", layer, *plan[layer])
        if layer == 2:
            (ids,) = tx._transfers["t"].block_ids
            assert ids.src_blocks == s0 and ids.src_blocks is not s0  # a copy: the caller may reuse its list
    assert len(tx._transfers["t"].block_ids) == 3
    tx.finish(rx.address, "t", 4)
    assert tx.wait("t", 20) == S.DONE, tx.reason("t")
    assert rx.wait("t", 20) == S.DONE, rx.reason("t")
    check_written(dst, before, src, [plan])
    assert tx._transfers["t"].block_ids == []  # dropped once terminal


def test_a_list_changed_after_the_call_is_not_mistaken_for_the_old_one(pair):
    tx, rx, src, dst, before = pair
    plan = make_plan(seed=63, layers=(0, 2))  # one pool
    s, d = list(plan[0][0]), list(plan[0][1])
    rx.expect("t", {layer: d for layer, (_, d) in plan.items()})
    tx.send_layer(rx.address, "t", 0, s, d)
    s[:], d[:] = plan[2]  # the caller reuses its lists for the next layer
    tx.send_layer(rx.address, "t", 2, s, d)
    tx.finish(rx.address, "t", 2)
    assert tx.wait("t", 20) == S.DONE, tx.reason("t")
    check_written(dst, before, src, [plan])


def test_bad_lists_are_still_checked_on_every_new_pair(pair):
    tx, rx, *_ = pair
    plan = make_plan(seed=64, layers=(0,))
    s, d = plan[0]
    rx.expect("t", {0: d})
    tx.send_layer(rx.address, "t", 0, s, d)
    with pytest.raises(ValueError, match="src_blocks"):
        tx.send_layer(rx.address, "t", 0, s[:-1] + [10_000], d)
    with pytest.raises(ValueError, match="dst_blocks"):
        tx.send_layer(rx.address, "t", 0, s, d[:-1])
    with pytest.raises(ValueError, match="layer"):
        tx.send_layer(rx.address, "t", 9, s, d)


def test_every_acked_message_goes_to_the_release_hook(pair):
    """NCCL waits on the message's sends there, so torch frees the buffers at once."""
    tx, rx, *_ = pair
    released = []

    def release(peer, sent, _orig=tx._release_sent):
        released.extend(sent.parts)
        _orig(peer, sent)

    tx._release_sent = release
    plan = make_plan(seed=65)
    rx.expect("t", {layer: d for layer, (_, d) in plan.items()})
    for layer, (s, d) in plan.items():
        tx.send_layer(rx.address, "t", layer, s, d)
    tx.finish(rx.address, "t", 4)
    assert tx.wait("t", 20) == S.DONE, tx.reason("t")
    assert sorted(released) == [("t", layer) for layer in range(4)]


def test_one_run_fast_path_matches_the_general_conversion():
    """A fresh pool's lists (each one run of consecutive ids) take a plain-Python path;
    it must give exactly what the general, tensor-based conversion gives, and anything
    else must fall through to it (which checks and explains)."""
    from kv_transfer import TcpSender

    caches = make_caches(torch.float32, seed=0)  # 24 blocks in layer 0
    tx = TcpSender(layout_of(caches), caches, min_direct_blocks=3)
    src, dst = list(range(5, 15)), list(range(2, 12))
    fast = tx._one_run(24, src, dst)
    tx2 = TcpSender(layout_of(caches), caches, min_direct_blocks=3)
    tx2._one_run = lambda *a: None  # the general path only
    general = tx2._block_ids("x", 0, src, dst)
    for field in ("num_blocks", "src_blocks", "dst_blocks", "dst", "runs", "run_src", "num_staged"):
        assert getattr(fast, field) == getattr(general, field), field
    assert fast.staged is None and general.staged is None
    for s, d in ((src[:2], dst[:2]),  # too short to go direct
                 ([5, 6, 8], [2, 3, 4]), ([5, 6, 7], [2, 3, 5]),  # not consecutive
                 (list(range(20, 26)), list(range(6))),  # past the pool
                 ([-1, 0, 1], [0, 1, 2]), ([0, 1, 2], [-1, 0, 1]),  # negative
                 ([0.0, 1.0, 2.0], [0, 1, 2]), ([5, 6.0, 7.0], [0, 1, 2]), ([0, 1, 2], [0, 1.0, 2]),
                 ([0, 1, 2], [2 ** 31, 2 ** 31 + 1, 2 ** 31 + 2])):
        assert tx._one_run(24, s, d) is None, (s, d)
    with pytest.raises(ValueError, match="src_blocks"):
        tx._block_ids("y", 0, list(range(20, 26)), list(range(6)))
    tx.close()
    tx2.close()
