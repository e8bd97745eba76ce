"""NCCL backend: no GPU here, so (1) it imports and refuses CPU-only set-ups clearly, and
(2) its exact control flow (pair store, 2-rank group, warm-up, header-then-p2p ordering,
discard-by-receive) runs with the pair's group built by gloo on CPU tensors."""

import pytest
import torch

from kv_transfer import (BACKENDS, NcclReceiver, NcclSender, TcpSender, TransferError, TransferStatus as S,
                         make_receiver, make_sender)
from tests.kv_transfer.helpers import (GlooReceiver, GlooSender, GroupedGlooSender, check_written, dst_of, layout_of,
                                      make_caches, make_plan, run_plan)


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


def test_pg_backend_mismatch_refused_at_hello():
    """Groups built differently cannot rendezvous (the ctypes NCCL communicator and
    torch's ProcessGroupNCCL differ): refused at hello, before either side starts one."""
    caches = make_caches(torch.float32, seed=0)
    layout = layout_of(caches)
    with GlooReceiver(layout, caches) as rx, GroupedGlooSender(layout, caches) as tx:
        with pytest.raises(TransferError, match="nccl/gloo-grouped"):
            tx.connect(rx.address)
        assert rx.stats()["connections_refused"] == 1


# ---- on two GPUs (the device machine): the real NCCL data planes, sender on cuda:0 and
# receiver on cuda:1 in this one process (a rank per thread).

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def _nccl_classes(pg_backend: str):
    return (type("Sender", (NcclSender,), {"pg_backend": pg_backend}),
            type("Receiver", (NcclReceiver,), {"pg_backend": pg_backend}))


@two_gpus
@pytest.mark.parametrize("pg_backend", ["nccl", "nccl-torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_gpu_pair_moves_direct_runs_and_staged_blocks(pg_backend, dtype):
    """Runs long and short (direct and staged in one part), two transfers interleaved
    and a ghost transfer between them: every byte lands where planned, nothing else
    changes, on both NCCL data planes."""
    sender_cls, receiver_cls = _nccl_classes(pg_backend)
    src_cpu = make_caches(torch.float32, seed=41)
    src_cpu = [c.to(dtype) for c in src_cpu]
    dst_cpu = [torch.zeros_like(c) for c in src_cpu]
    src = [c.to("cuda:0") for c in src_cpu]
    dst = [c.to("cuda:1") for c in dst_cpu]
    layout = layout_of(src)
    a = run_plan(41, (3, 1, 2, 1), dst_range=(0.0, 0.5))
    b = run_plan(42, (2, 3, 1), dst_range=(0.5, 1.0))
    with receiver_cls(layout, dst) as rx, sender_cls(layout, src, min_direct_blocks=2) as tx:
        rx.expect("a", dst_of(a))
        rx.expect("b", dst_of(b))
        tx.connect(rx.address)
        tx.send_layer(rx.address, "ghost", 0, *a[0])
        for layer in a:
            tx.send_layer(rx.address, "a", layer, *a[layer])
            tx.send_layer(rx.address, "b", layer, *b[layer])
        tx.fence()
        tx.finish(rx.address, "a", 4)
        tx.finish(rx.address, "b", 4)
        for tid in "ab":
            assert tx.wait(tid, 60) == S.DONE, tx.reason(tid)
            assert rx.wait(tid, 60) == S.DONE, rx.reason(tid)
        torch.cuda.synchronize("cuda:1")
        as_bits = [c.view(torch.uint8).cpu() for c in dst]  # fp8 has no torch.equal on every build
        check_written(as_bits, [c.view(torch.uint8) for c in dst_cpu], [c.view(torch.uint8) for c in src_cpu],
                      [a, b])
        assert rx.stats()["blocks_direct"] > 0 and rx.stats()["blocks_staged"] > 0


@two_gpus
def test_gpu_pair_outlives_an_aborted_transfer():
    """The receiver aborts a transfer while its layers are on the way (their recvs land in
    the cache or in scratch, then are dropped): both sides see FAILED, and the next
    transfer on the same pair lands byte-exact (ctypes NCCL)."""
    sender_cls, receiver_cls = _nccl_classes("nccl")
    src = [c.to("cuda:0") for c in make_caches(torch.bfloat16, seed=43)]
    dst = [torch.zeros_like(c, device="cuda:1") for c in src]
    layout = layout_of(src)
    x = make_plan(seed=43)
    y = make_plan(seed=44, exclude={l: set(d) for l, (_, d) in x.items()})
    with receiver_cls(layout, dst) as rx, sender_cls(layout, src) as tx:
        rx.expect("x", dst_of(x))
        for layer in x:
            tx.send_layer(rx.address, "x", layer, *x[layer])
            if layer == 1:
                rx.abort("x")
        tx.finish(rx.address, "x", 4)
        assert tx.wait("x", 60) == S.FAILED
        assert rx.poll("x") == S.FAILED
        rx.expect("y", dst_of(y))
        for layer in y:
            tx.send_layer(rx.address, "y", layer, *y[layer])
        tx.finish(rx.address, "y", 4)
        assert tx.wait("y", 60) == S.DONE, tx.reason("y")
        torch.cuda.synchronize("cuda:1")
        for layer, (s, d) in y.items():
            assert torch.equal(dst[layer][:, d].cpu(), src[layer][:, s].cpu())


def test_a_message_waits_for_the_latest_recording_on_each_stream():
    """A message's sends wait, per stream, for the part event recorded last on it, which
    covers the others. fence() records a queued part's event again, so the latest is by
    recording order, not queue order: here part a, re-recorded after b."""
    from kv_transfer.nccl import _latest_per_stream
    from kv_transfer.outgoing import _Payload

    class Event:  # stands in for torch.cuda.Event (no GPU here)
        def __init__(self):
            self.streams = []

        def record(self, stream):
            self.streams.append(stream)

    caches = make_caches(torch.float32, seed=0)
    with GlooSender(layout_of(caches), caches) as tx:
        a, b, c = (_Payload(None, [], ready=Event()) for _ in range(3))
        for payload, stream in ((a, "S"), (b, "S"), (c, "T")):
            tx._record_ready(payload, stream)
        assert _latest_per_stream([a, b, c]) == [b.ready, c.ready]
        tx._record_ready(a, "S")  # fence() copied a's runs and recorded its event again
        assert _latest_per_stream([a, b, c]) == [a.ready, c.ready]
        assert a.ready.streams == ["S", "S"] and a.ready_seq > b.ready_seq
