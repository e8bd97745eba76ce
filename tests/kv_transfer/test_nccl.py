"""NCCL backend: no GPU here, so (1) it imports and refuses CPU-only set-ups clearly, and
(2) its exact control flow (pair store, 2-rank group, warm-up, header-then-p2p ordering,
discard-by-receive) runs with the pair's group built by gloo on CPU tensors."""

import pytest
import torch

from kv_transfer import (BACKENDS, NcclReceiver, NcclSender, TcpSender, TransferError, TransferStatus as S,
                         make_receiver, make_sender)
from tests.kv_transfer.helpers import GlooReceiver, GlooSender, check_written, dst_of, layout_of, make_caches, make_plan


def test_registered_and_clear_error_without_cuda():
    assert BACKENDS["nccl"] == (NcclSender, NcclReceiver)
    caches = make_caches(torch.float32, seed=0)
    layout = layout_of(caches)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for make in (make_sender, make_receiver):
        with pytest.raises(TransferError, match="'tcp'"):
            make("nccl", layout, caches)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_p2p_data_plane_round_trip(dtype):
    src, dst = make_caches(dtype, seed=31), make_caches(dtype, seed=None)
    before = [c.clone() for c in dst]
    layout = layout_of(src)
    a = make_plan(seed=31)
    b = make_plan(seed=32, exclude={l: set(d) for l, (_, d) in a.items()})
    with GlooReceiver(layout, dst) as rx, GlooSender(layout, src) as tx:
        rx.expect("a", dst_of(a))
        rx.expect("b", dst_of(b))
        # an unknown transfer in the middle: its bytes must be received and dropped so
        # that the later messages on the pair still line up
        tx.send_layer(rx.address, "ghost", 0, *a[0])
        for layer in a:
            tx.send_layer(rx.address, "a", layer, *a[layer])
            tx.send_layer(rx.address, "b", layer, *b[layer])
        tx.finish(rx.address, "a", 4)
        tx.finish(rx.address, "b", 4)
        for tid in "ab":
            assert tx.wait(tid, 20) == S.DONE, tx.reason(tid)
            assert rx.poll(tid) == S.DONE
        assert tx.wait("ghost", 5) == S.FAILED
        check_written(dst, before, src, [a, b])
        assert tx.stats()["connections_opened"] == 1 and rx.stats()["layers_discarded"] == 1


def test_data_plane_mismatch_refused():
    caches = make_caches(torch.float32, seed=0)
    layout = layout_of(caches)
    with GlooReceiver(layout, caches) as rx, TcpSender(layout, caches) as tx:
        with pytest.raises(TransferError, match="data plane"):
            tx.connect(rx.address)
