"""kv_transfer/cuda_events.py: CUDA events through the driver API with ctypes.

Here (no GPU): the module imports without libcuda and fails only when used, with an
error naming the library or the call and its CUresult; nccl_lib's Works hand their events
back to the communicator's pool. On a GPU machine: an event's query, synchronize, record
again and stream waits behave as torch's do (compared side by side), from a thread that
never touched CUDA and with another device current; on two GPUs, a transfer lands byte
for byte with either kind of event."""

from __future__ import annotations

import threading

import pytest
import torch

from kv_transfer import cuda_events, nccl_lib
from kv_transfer.cuda_events import CudaError, CudaEvent
from tests.kv_transfer.helpers import check_written, dst_of, layout_of, make_caches, run_plan

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


# ---- anywhere

def test_imports_without_a_driver_and_fails_when_used(monkeypatch):
    monkeypatch.setattr(cuda_events, "LIBRARY", "libcuda-not-here.so.1")
    monkeypatch.setattr(cuda_events, "_driver", None)
    with pytest.raises(CudaError, match=r"cannot load the CUDA driver libcuda-not-here\.so\.1"):
        CudaEvent("cuda:0")


def test_refuses_a_device_that_is_not_cuda():
    with pytest.raises(ValueError, match="device: CudaEvent needs a CUDA device, got cpu"):
        CudaEvent("cpu")


class _FakeDriver:
    """cuGetErrorName / cuGetErrorString as the driver answers them (through the byref's
    object), or failing when the code is unknown to it."""

    def __init__(self, known: bool):
        self.known = known

    def cuGetErrorName(self, result, ref):
        if not self.known:
            return 1  # CUDA_ERROR_INVALID_VALUE: not a CUresult it knows
        ref._obj.value = b"CUDA_ERROR_INVALID_CONTEXT"
        return 0

    def cuGetErrorString(self, result, ref):
        ref._obj.value = b"invalid device context"
        return 0


def test_errors_name_the_call_and_the_cuda_result():
    cuda_events._check(_FakeDriver(True), "cuEventRecord", 0)  # success: no error
    with pytest.raises(CudaError, match=r"^cuEventRecord: CUDA_ERROR_INVALID_CONTEXT \(CUresult 201\): "
                                        r"invalid device context -- no usable CUDA context on this thread"):
        cuda_events._check(_FakeDriver(True), "cuEventRecord", 201)
    with pytest.raises(CudaError, match=r"^cuEventQuery: CUresult 999$"):
        cuda_events._check(_FakeDriver(False), "cuEventQuery", 999)


class _FakeEvent:
    def __init__(self):
        self.done = False

    def query(self) -> bool:
        return self.done


def test_a_work_hands_its_event_back_when_dropped_and_stays_complete():
    """A Work seen complete stays complete without querying its event again (the event may
    be recorded again by then), and its event joins the pool only when the Work goes."""
    comm = nccl_lib.NcclComm(None, None, 0, torch.device("cpu"))
    event = _FakeEvent()
    work = nccl_lib.Work(comm, event, "stream", comm._free_events)
    event.done = True
    assert work.is_completed()
    event.done = False  # recorded again for a later group
    assert work.is_completed() and work.wait()  # no stream wait once complete
    assert comm._free_events == []
    del work
    assert comm._free_events == [event]
    nccl_lib.Work(comm, _FakeEvent(), "stream")  # torch's events (no pool): dropped, not pooled
    assert comm._free_events == [event]


# ---- on a GPU

def _busy(stream: torch.cuda.Stream) -> None:
    """Tens of milliseconds of GPU work on `stream` (fp32 4096^3 matmuls, ~3 ms each on an
    H100), so the host gets ahead of it."""
    with torch.cuda.stream(stream):
        a = torch.randn(4096, 4096, device=stream.device) / 64
        for _ in range(20):
            a = a @ a


def _new_event(kind: str, device: str):
    return CudaEvent(device) if kind == "ctypes" else torch.cuda.Event()


@gpu
def test_query_is_false_until_the_work_before_the_record_is_done():
    stream = torch.cuda.Stream("cuda:0")
    ev = CudaEvent("cuda:0")
    assert ev.query()  # never recorded: nothing to wait for
    _busy(stream)
    ev.record(stream)
    assert not ev.query()
    ev.synchronize()
    assert ev.query() and stream.query()  # nothing was enqueued after the record
    ev.close()
    ev.close()  # idempotent
    with pytest.raises(CudaError, match="cuEventQuery: the event is closed"):
        ev.query()


@gpu
@pytest.mark.parametrize("kind", ["ctypes", "torch"])
def test_a_waiting_stream_sees_what_was_written_before_the_record(kind):
    """Both kinds of event, the same calls: the reader's copy is enqueued while the writer
    is still busy, so without the wait it would read zeros."""
    writer, reader = torch.cuda.Stream("cuda:0"), torch.cuda.Stream("cuda:0")
    x = torch.zeros(1 << 20, device="cuda:0")
    torch.cuda.synchronize("cuda:0")
    ev = _new_event(kind, "cuda:0")
    _busy(writer)
    with torch.cuda.stream(writer):
        x.fill_(7)
    ev.record(writer)
    ev.wait(reader)
    with torch.cuda.stream(reader):
        y = x.clone()
    assert not ev.query()  # the copy went in while the fill was still queued
    reader.synchronize()
    assert torch.equal(y.cpu(), torch.full((1 << 20,), 7.0))


@gpu
def test_an_event_recorded_again_captures_the_new_work():
    writer, reader = torch.cuda.Stream("cuda:0"), torch.cuda.Stream("cuda:0")
    x = torch.zeros(1 << 20, device="cuda:0")
    ev = CudaEvent("cuda:0")
    with torch.cuda.stream(writer):
        x.fill_(1)
    ev.record(writer)
    ev.synchronize()
    _busy(writer)
    with torch.cuda.stream(writer):
        x.fill_(2)
    ev.record(writer)
    assert not ev.query()  # the new record, not the completed old one
    ev.wait(reader)
    with torch.cuda.stream(reader):
        y = x.clone()
    reader.synchronize()
    assert torch.equal(y.cpu(), torch.full((1 << 20,), 2.0))


@gpu
def test_usable_from_a_thread_that_never_touched_cuda():
    """A new thread may have no CUDA context current (torch skips cudaSetDevice for the
    device already selected): every call makes the device's primary context current."""
    stream, other = torch.cuda.Stream("cuda:0"), torch.cuda.Stream("cuda:0")
    made = CudaEvent("cuda:0")
    _busy(stream)
    seen, errors = [], []

    def use() -> None:
        try:
            made.record(stream)
            seen.append(made.query())
            made.synchronize()
            seen.append(made.query())
            ev = CudaEvent("cuda:0")  # created here too
            ev.record(stream)
            ev.wait(other)
            ev.synchronize()
            seen.append(ev.query())
            ev.close()
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    t = threading.Thread(target=use)
    t.start()
    t.join(60)
    assert not errors, errors
    assert seen == [False, True, True]


@two_gpus
def test_the_null_stream_is_the_streams_device_whatever_device_is_current():
    """cuda_stream 0 (a device's default stream) means the current context's: each call
    makes the right device's context current, as torch's device guard does."""
    side0, default0 = torch.cuda.Stream("cuda:0"), torch.cuda.default_stream(0)
    x = torch.zeros(1 << 20, device="cuda:0")
    torch.cuda.synchronize("cuda:0")
    ev = CudaEvent("cuda:0")
    _busy(default0)
    with torch.cuda.device(1):
        ev.record(default0)  # behind device 0's work, not on device 1's idle default stream
        assert not ev.query()
        with pytest.raises(ValueError, match="stream: on cuda:1, the event on cuda:0"):
            ev.record(torch.cuda.default_stream(1))
    ev.synchronize()

    _busy(side0)
    with torch.cuda.stream(side0):
        x.fill_(5)
    ev.record(side0)
    with torch.cuda.device(1):
        ev.wait(default0)  # device 0's default stream waits, though device 1 is current
    with torch.cuda.device(0):
        y = x.clone()  # on default0
    assert not ev.query()
    torch.cuda.synchronize("cuda:0")
    assert torch.equal(y.cpu(), torch.full((1 << 20,), 5.0))


@two_gpus
def test_a_stream_on_another_device_waits_for_the_event():
    side0, side1 = torch.cuda.Stream("cuda:0"), torch.cuda.Stream("cuda:1")
    x = torch.zeros(1 << 20, device="cuda:0")
    y = torch.zeros(1 << 20, device="cuda:1")
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    ev = CudaEvent("cuda:0")
    _busy(side0)
    with torch.cuda.stream(side0):
        x.fill_(9)
    ev.record(side0)
    ev.wait(side1)
    with torch.cuda.device(1), torch.cuda.stream(side1):
        y.copy_(x, non_blocking=True)  # torch copies after side1 (and device 0's idle default stream)
    assert not ev.query()
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    assert torch.equal(y.cpu(), torch.full((1 << 20,), 9.0))


@two_gpus
@pytest.mark.parametrize("ctypes_events", [True, False], ids=["ctypes-events", "torch-events"])
def test_a_transfer_lands_with_either_kind_of_event(ctypes_events):
    """The NCCL pair with its events through the driver (the default) and through torch
    (bench/kv_transfer.py's "before" row): the bytes land, and each side's pools hold the
    kind it was told to use."""
    from kv_transfer import NcclReceiver, NcclSender

    kind = CudaEvent if ctypes_events else torch.cuda.Event
    sender_cls = type("Sender", (NcclSender,), {"ctypes_events": ctypes_events})
    receiver_cls = type("Receiver", (NcclReceiver,), {"ctypes_events": ctypes_events})
    src_cpu = [c.to(torch.bfloat16) for c in make_caches(torch.float32, seed=51)]
    src = [c.to("cuda:0") for c in src_cpu]
    dst = [torch.zeros_like(c, device="cuda:1") for c in src_cpu]
    plan = run_plan(51, (3, 1, 2, 1))
    with receiver_cls(layout_of(src), dst) as rx, sender_cls(layout_of(src), src, min_direct_blocks=2) as tx:
        rx.expect("t", dst_of(plan))
        for layer in plan:
            tx.send_layer(rx.address, "t", layer, *plan[layer])
        tx.fence()
        tx.finish(rx.address, "t", len(plan))
        assert tx.wait("t", 60).name == "DONE", tx.reason("t")
        assert rx.wait("t", 60).name == "DONE", rx.reason("t")
        pair = next(iter(tx._peers.values())).data
        assert pair.group.ctypes_events is ctypes_events
        posted = [w.event for works in pair.posted for w in works]  # the last message's group
        assert posted and all(isinstance(e, kind) for e in posted)
        assert tx._free_events and all(isinstance(e, kind) for e in tx._free_events)
        assert all(isinstance(e, CudaEvent) for e in pair.group._free_events)
        if not ctypes_events:
            assert pair.group._free_events == []  # torch's events: one per group, not pooled
        torch.cuda.synchronize("cuda:1")
        check_written([c.cpu() for c in dst], [torch.zeros_like(c) for c in src_cpu], src_cpu, [plan])
