"""CUDA events through the CUDA driver API called with ctypes, for the KV data plane's
per-message event calls: record a ready event, make a stream wait for one, poll one.

Why not torch.cuda.Event: each of its calls lets go of the GIL, and taking it back can
cost a whole `sys.setswitchinterval` while other Python threads run (measured: 0.3-2 ms
a message on the GPU machine; see nccl_lib.py, which calls NCCL the same way for the
same reason). Here every call is a `ctypes.PyDLL` call, which keeps the GIL for the
microsecond or two the driver takes. Only `synchronize()`, a host wait that lasts as
long as the GPU work before the record, goes through a `ctypes.CDLL` handle and lets go.

    ev = CudaEvent(device)     # cuEventCreate(CU_EVENT_DISABLE_TIMING)
    ev.record(stream)          # cuEventRecord: captures the work enqueued on stream so far
    ev.wait(other)             # cuStreamWaitEvent: `other` runs later work after it; no host wait
    ev.query() -> bool         # cuEventQuery: True once that work is done
    ev.synchronize()           # cuEventSynchronize: host wait, GIL released
    ev.close()                 # cuEventDestroy_v2 (also on garbage collection)

It stands in for torch.cuda.Event as kv_transfer uses it: `record(stream)`, `query()`,
`synchronize()`, and `ev.wait(stream)` (torch's Event has that too, so call sites read
the same for both). Streams are torch.cuda.Streams: driver and runtime handles are
the same objects, so `stream.cuda_stream` is a CUstream.

Contexts: a driver call acts in the calling thread's current context, and a NULL stream
(a device's legacy default stream, `cuda_stream == 0`) means that context's default
stream. The runtime, and so torch, uses each device's primary context, but a thread
does not always have it current: a fresh thread has none until a runtime call binds
one, and torch may skip cudaSetDevice for the device already selected (cuda:0 on a
fresh thread), so kv_transfer's `_use_device` does not guarantee it. So each call here
runs with the primary context of the stream's device (the event's, for query and
synchronize) current, as torch's device guards do: one cuCtxGetCurrent per call, and a
push and pop around the call only when another context, or none, is current.

Re-recording: a stream wait, once enqueued, waits for the record that was latest at
the time of the cuStreamWaitEvent call; later records do not change it. So an event may
be recorded again as soon as its waits are enqueued and nobody will query it for the
old record: callers keep pools of free events (creating one is a driver call too).

The driver is libcuda.so.1, whose soname is the same for every CUDA version (the
runtime's is not), loaded on first use: this module imports on machines without it,
and a CudaEvent there raises CudaError.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading

import torch

LIBRARY = "libcuda.so.1"
CUDA_SUCCESS, CUDA_ERROR_INVALID_CONTEXT, CUDA_ERROR_NOT_READY = 0, 201, 600
CU_EVENT_DISABLE_TIMING = 0x2


class CudaError(RuntimeError):
    """The CUDA driver could not be loaded, or one of its calls failed."""


class _Driver:
    """libcuda's functions used here, with their signatures. Two handles on the one
    library: HOLDING calls keep the GIL (microseconds each); RELEASING ones may block for
    long (a host wait; driver and primary-context set-up, once per process) and let go."""

    HOLDING = (("cuCtxGetCurrent", ["ptr*"]), ("cuCtxPushCurrent_v2", ["ptr"]), ("cuCtxPopCurrent_v2", ["ptr*"]),
               ("cuEventCreate", ["ptr*", "uint"]), ("cuEventDestroy_v2", ["ptr"]),
               ("cuEventRecord", ["ptr", "ptr"]), ("cuStreamWaitEvent", ["ptr", "ptr", "uint"]),
               ("cuEventQuery", ["ptr"]), ("cuGetErrorName", ["int", "str*"]), ("cuGetErrorString", ["int", "str*"]))
    RELEASING = (("cuInit", ["uint"]), ("cuDeviceGet", ["int*", "int"]), ("cuDevicePrimaryCtxRetain", ["ptr*", "int"]),
                 ("cuEventSynchronize", ["ptr"]))
    TYPES = {"int": ctypes.c_int, "uint": ctypes.c_uint, "int*": ctypes.POINTER(ctypes.c_int),
             "ptr": ctypes.c_void_p, "ptr*": ctypes.POINTER(ctypes.c_void_p), "str*": ctypes.POINTER(ctypes.c_char_p)}

    def __init__(self, path: str):
        holding, releasing = ctypes.PyDLL(path), ctypes.CDLL(path)
        for handle, table in ((holding, self.HOLDING), (releasing, self.RELEASING)):
            for name, args in table:
                fn = getattr(handle, name)
                fn.argtypes, fn.restype = [self.TYPES[a] for a in args], ctypes.c_int
                setattr(self, name, fn)
        self._contexts: dict[int, int] = {}  # device ordinal -> its primary context (CUcontext as int)
        self._lock = threading.Lock()
        _check(self, "cuInit", self.cuInit(0))

    def primary_context(self, index: int) -> int:
        """The primary context of device `index`, the one the runtime and torch use (device
        ordinals are the same in both APIs). Retained once per process and never released:
        torch keeps it alive anyway."""
        ctx = self._contexts.get(index)
        if ctx is not None:
            return ctx
        with self._lock:
            if index not in self._contexts:
                dev, handle = ctypes.c_int(), ctypes.c_void_p()
                _check(self, f"cuDeviceGet({index})", self.cuDeviceGet(ctypes.byref(dev), index))
                _check(self, f"cuDevicePrimaryCtxRetain(cuda:{index})",
                       self.cuDevicePrimaryCtxRetain(ctypes.byref(handle), dev))
                self._contexts[index] = handle.value
            return self._contexts[index]

    def run(self, ctx: int, fn, *args) -> int:
        """fn(*args) with `ctx` current on this thread (see the module docstring); its CUresult."""
        current = ctypes.c_void_p()
        _check(self, "cuCtxGetCurrent", self.cuCtxGetCurrent(ctypes.byref(current)))
        if current.value == ctx:
            return fn(*args)
        _check(self, "cuCtxPushCurrent_v2", self.cuCtxPushCurrent_v2(ctx))
        try:
            return fn(*args)
        finally:
            self.cuCtxPopCurrent_v2(ctypes.byref(current))


_driver: _Driver | None = None
_driver_lock = threading.Lock()


def driver() -> _Driver:
    """The CUDA driver, loaded (and cuInit called) once."""
    global _driver
    with _driver_lock:
        if _driver is None:
            try:
                _driver = _Driver(LIBRARY)
            except (OSError, AttributeError) as e:  # no driver here; a symbol missing from it
                raise CudaError(f"cannot load the CUDA driver {LIBRARY}: {e} (CUDA events through ctypes "
                                "need an NVIDIA driver)") from e
        return _driver


def _describe(cu: _Driver, result: int) -> str:
    name, text = ctypes.c_char_p(), ctypes.c_char_p()
    if cu.cuGetErrorName(result, ctypes.byref(name)) != CUDA_SUCCESS or name.value is None:
        return f"CUresult {result}"
    cu.cuGetErrorString(result, ctypes.byref(text))
    detail = f": {text.value.decode()}" if text.value else ""
    return f"{name.value.decode()} (CUresult {result}){detail}"


def _check(cu: _Driver, what: str, result: int) -> None:
    if result == CUDA_SUCCESS:
        return
    hint = ""
    if result == CUDA_ERROR_INVALID_CONTEXT:
        hint = " -- no usable CUDA context on this thread; was the device's primary context reset or destroyed?"
    raise CudaError(f"{what}: {_describe(cu, result)}{hint}")


class CudaEvent:
    """A CUDA event made and used through the driver API, the GIL kept on every call but
    synchronize() (see the module docstring). Timing disabled, as torch.cuda.Event()'s."""

    def __init__(self, device: torch.device | str | int):
        self._event = None  # set last: close() and __del__ see a half-made event as closed
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"device: CudaEvent needs a CUDA device, got {device}")
        self.device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        self._cu = driver()
        self._ctx = self._cu.primary_context(self.device.index)
        handle = ctypes.c_void_p()
        _check(self._cu, f"cuEventCreate ({self.device})",
               self._cu.run(self._ctx, self._cu.cuEventCreate, ctypes.byref(handle), CU_EVENT_DISABLE_TIMING))
        self._event = handle.value

    def _handle(self, what: str) -> int:
        if self._event is None:
            raise CudaError(f"{what}: the event is closed")
        return self._event

    def _stream_context(self, stream: torch.cuda.Stream) -> int:
        """The primary context of the stream's device: the one its NULL handle refers to."""
        index = stream.device_index
        return self._ctx if index == self.device.index else self._cu.primary_context(index)

    def record(self, stream: torch.cuda.Stream) -> None:
        """Capture the work enqueued on `stream` so far (a stream of the event's device, as
        torch requires too); replaces what an earlier record captured."""
        event = self._handle("cuEventRecord")
        if stream.device_index != self.device.index:
            raise ValueError(f"stream: on cuda:{stream.device_index}, the event on {self.device}")
        _check(self._cu, "cuEventRecord", self._cu.run(self._ctx, self._cu.cuEventRecord, event, stream.cuda_stream))

    def wait(self, stream: torch.cuda.Stream) -> None:
        """Work enqueued on `stream` from now on runs after the captured work (a device-side
        wait; `stream` may be on another device). The host does not wait."""
        event = self._handle("cuStreamWaitEvent")
        _check(self._cu, "cuStreamWaitEvent",
               self._cu.run(self._stream_context(stream), self._cu.cuStreamWaitEvent, stream.cuda_stream, event, 0))

    def query(self) -> bool:
        """True once the captured work is done (or the event was never recorded)."""
        result = self._cu.run(self._ctx, self._cu.cuEventQuery, self._handle("cuEventQuery"))
        if result == CUDA_ERROR_NOT_READY:
            return False
        _check(self._cu, "cuEventQuery", result)
        return True

    def synchronize(self) -> None:
        """Block this thread (GIL released) until the captured work is done."""
        event = self._handle("cuEventSynchronize")
        _check(self._cu, "cuEventSynchronize", self._cu.run(self._ctx, self._cu.cuEventSynchronize, event))

    def close(self) -> None:
        """Destroy the event. Idempotent. Work already captured still completes (the driver
        frees the event once it has)."""
        event, self._event = self._event, None
        if event is not None:
            _check(self._cu, "cuEventDestroy_v2", self._cu.run(self._ctx, self._cu.cuEventDestroy_v2, event))

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the driver may be gone already
            self.close()

    def __repr__(self) -> str:
        return f"CudaEvent({self.device}, {'closed' if self._event is None else hex(self._event)})"
