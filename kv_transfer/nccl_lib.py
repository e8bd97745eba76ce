"""NCCL through ctypes: a two-rank communicator for the KV data plane, without
torch.distributed in the way.

Why not torch's ProcessGroupNCCL: every p2p op through it costs tens of microseconds
of Python and C++ bookkeeping (argument checks, a Work object with its own CUDA
events, tensor-storage tracking for the watchdog), and a 48-layer transfer posts ~100
ops on each side; that CPU, not the link, set the pace of a transfer (BENCHMARKS.md).
Here an op is one ctypes call (a few microseconds): `ncclSend`/`ncclRecv` of a
contiguous tensor's bytes on a stream, the ops of one message inside one
ncclGroupStart/End, and one CUDA event recorded after the group stands for all of them.
That event is a cuda_events.CudaEvent (the driver API through ctypes, GIL kept; from
a per-communicator pool: a Work hands its event back when it is dropped), or with
`ctypes_events = False` a torch.cuda.Event, whose every call lets go of the GIL.

    comm = NcclComm.create(store, rank, device, timeout)  # both ranks; blocks until both joined
    works = comm.post(tensors, send=True)                 # on the current stream
    works[0].is_completed(); works[0].wait()              # poll; order the current stream after
    comm.abort()                                          # ends ops still waiting for a dead peer

Rendezvous: rank 1 (the receiver) draws the NCCL unique id and publishes it in the
pair's own TCPStore; rank 0 reads it; both call ncclCommInitRank(2, id, rank). The
library is the libnccl.so.2 torch itself loaded (or TANDEM_NCCL_LIBRARY). Nothing here
reads or sets NCCL_* variables.

The caller keeps every tensor it posted alive until the op completed (NCCL holds only
pointers): the sender until the receiver's ack, the receiver until its completer saw
the work complete.
"""

from __future__ import annotations

import ctypes
import datetime
import glob
import os
import threading

import torch

from kv_transfer.cuda_events import CudaEvent

NCCL_UINT8 = 1  # ncclDataType_t ncclUint8: every op moves raw bytes
NCCL_SUCCESS, NCCL_IN_PROGRESS = 0, 7
UNIQUE_ID_BYTES = 128
ID_KEY = "nccl_unique_id"


class NcclError(RuntimeError):
    pass


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * UNIQUE_ID_BYTES)]


_lib: _Library | None = None
_lib_lock = threading.Lock()


def _candidates() -> list[str]:
    """Where libnccl.so.2 may be: an explicit path, the soname (torch's CUDA libraries
    already loaded it), then the pip `nvidia-nccl` packages beside torch."""
    paths = [os.environ["TANDEM_NCCL_LIBRARY"]] if os.environ.get("TANDEM_NCCL_LIBRARY") else []
    paths.append("libnccl.so.2")
    site = os.path.dirname(os.path.dirname(torch.__file__))
    paths += sorted(glob.glob(os.path.join(site, "nvidia", "nccl*", "lib", "libnccl.so*")))
    return paths


class _Library:
    """libnccl's functions with their signatures. Two handles on the one library: calls
    that may block (communicator set-up and abort) drop the GIL as ctypes does by
    default; the per-message calls (ncclSend/Recv, group start and end, the error poll:
    microseconds each) keep it. Dropping and retaking the GIL around each of them let
    another thread take it, and getting it back could take the whole switch interval
    (5 ms): posting one message took 0.3-2 ms that way on the GPU machine.
    Except a communicator's first group (the warm-up): its ncclGroupEnd connects the two
    ranks and blocks until the peer posts too, so it must drop the GIL
    (`ncclGroupEnd_releasing`): holding it there hangs two ranks in one process, and
    stalls every other thread of the process for the hand-shake otherwise."""

    BLOCKING = (("ncclGetVersion", ["i32*"]), ("ncclGetUniqueId", ["uid*"]),
                ("ncclCommInitRank", ["ptr*", "i32", "uid", "i32"]), ("ncclCommAbort", ["ptr"]))
    FAST = (("ncclSend", ["ptr", "size", "i32", "i32", "ptr", "ptr"]),
            ("ncclRecv", ["ptr", "size", "i32", "i32", "ptr", "ptr"]),
            ("ncclGroupStart", []), ("ncclGroupEnd", []), ("ncclCommGetAsyncError", ["ptr", "i32*"]))
    TYPES = {"i32": ctypes.c_int, "i32*": ctypes.POINTER(ctypes.c_int), "ptr": ctypes.c_void_p,
             "ptr*": ctypes.POINTER(ctypes.c_void_p), "size": ctypes.c_size_t, "uid": _UniqueId,
             "uid*": ctypes.POINTER(_UniqueId)}

    def __init__(self, path: str):
        self.path = path
        releasing, holding = ctypes.CDLL(path), ctypes.PyDLL(path)
        for handle, table in ((releasing, self.BLOCKING), (holding, self.FAST)):
            for name, args in table:
                fn = getattr(handle, name)
                fn.argtypes, fn.restype = [self.TYPES[a] for a in args], ctypes.c_int
                setattr(self, name, fn)
        self.ncclGroupEnd_releasing = releasing.ncclGroupEnd
        self.ncclGroupEnd_releasing.argtypes, self.ncclGroupEnd_releasing.restype = [], ctypes.c_int
        self.ncclGetErrorString = holding.ncclGetErrorString
        self.ncclGetErrorString.argtypes, self.ncclGetErrorString.restype = [ctypes.c_int], ctypes.c_char_p


def library() -> _Library:
    """The NCCL library, loaded once."""
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        errors = []
        for path in _candidates():
            try:
                _lib = _Library(path)
                return _lib
            except OSError as e:
                errors.append(f"{path}: {e}")
        raise NcclError("cannot load libnccl.so.2 (set TANDEM_NCCL_LIBRARY to its path): " + "; ".join(errors))


def _check(lib: _Library, what: str, result: int) -> None:
    if result != NCCL_SUCCESS:
        raise NcclError(f"{what}: {lib.ncclGetErrorString(result).decode()} (ncclResult {result})")


def version() -> str:
    lib = library()
    v = ctypes.c_int()
    _check(lib, "ncclGetVersion", lib.ncclGetVersion(ctypes.byref(v)))
    major, rest = divmod(v.value, 10000)
    return f"{major}.{rest // 100}.{rest % 100}"


class Work:
    """A posted group of ops, done when the event recorded after it on its stream is.
    `recycle`: the communicator's pool of free events, which this Work's event joins when
    the Work is dropped (no one can query or wait on its record after that)."""

    def __init__(self, comm: NcclComm, event, stream: torch.cuda.Stream, recycle: list | None = None):
        self.comm = comm
        self.event = event  # CudaEvent or torch.cuda.Event
        self.stream = stream
        self._recycle = recycle
        self._done = False  # seen complete once: the event is not queried again

    def is_completed(self) -> bool:
        if self._done:
            return True
        if self.event.query():
            self._done = True
            return True
        self.comm.raise_async_error()
        return False

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        """Orders the current stream after the ops (no host wait), as torch's works do;
        nothing to do on the stream they were posted on, nor once they were seen complete."""
        if self._done:
            return True
        current = torch.cuda.current_stream(self.comm.device)
        if current != self.stream:
            self.event.wait(current)
        return True

    def __del__(self) -> None:
        if self._recycle is not None:
            self._recycle.append(self.event)  # list.append: atomic, so safe from any thread's GC


class NcclComm:
    """One rank of a two-rank NCCL communicator (see the module docstring)."""

    ctypes_events = True  # False: a new torch.cuda.Event per group (bench/kv_transfer.py's "before" row)

    def __init__(self, lib: _Library, handle: ctypes.c_void_p, rank: int, device: torch.device):
        self._lib = lib
        self._handle = handle
        self.rank = rank
        self.peer = 1 - rank
        self.device = device
        self._aborted = False
        self._connected = False  # the first group connects the ranks (see _Library)
        self._free_events: list[CudaEvent] = []  # recorded by no live Work (Work.__del__ returns them)
        # One thread at a time uses the communicator (NCCL's rule): abort, from the thread
        # that saw the peer die, must not free it while another thread posts or polls.
        self._lock = threading.Lock()

    @classmethod
    def create(cls, store, rank: int, device: torch.device, timeout: datetime.timedelta) -> NcclComm:
        """Both ranks call this at about the same time; it returns once both joined, or
        raises NcclError after `timeout` (the init thread is left to NCCL then)."""
        lib = library()
        uid = _UniqueId()
        if rank == 1:
            _check(lib, "ncclGetUniqueId", lib.ncclGetUniqueId(ctypes.byref(uid)))
            store.set(ID_KEY, bytes(uid.internal))
        else:
            raw = store.get(ID_KEY)  # waits up to the store's timeout for rank 1
            ctypes.memmove(uid.internal, raw, UNIQUE_ID_BYTES)
        handle = ctypes.c_void_p()
        result: list[int] = []

        def init() -> None:  # ctypes drops the GIL for the call: the caller's timeout works
            with torch.cuda.device(device):
                result.append(lib.ncclCommInitRank(ctypes.byref(handle), 2, uid, rank))

        t = threading.Thread(target=init, daemon=True, name=f"nccl-init-rank{rank}")
        t.start()
        t.join(timeout.total_seconds())
        if not result:
            raise NcclError(f"ncclCommInitRank (rank {rank}): the peer did not join within "
                            f"{timeout.total_seconds():.0f} s")
        _check(lib, f"ncclCommInitRank (rank {rank})", result[0])
        return cls(lib, handle, rank, device)

    def post(self, tensors: list[torch.Tensor], send: bool, grouped: bool = True) -> list[Work]:
        """Send each tensor's bytes to the peer (or receive into it), in order, on the
        current stream: as one group with one Work for the lot, or (not grouped) each op
        its own group and Work."""
        with self._lock:
            return self._post(tensors, send, grouped)

    def _post(self, tensors: list[torch.Tensor], send: bool, grouped: bool) -> list[Work]:
        if self._aborted:
            raise NcclError("communicator aborted")
        lib, handle, peer = self._lib, self._handle, self.peer
        op, name = (lib.ncclSend, "ncclSend") if send else (lib.ncclRecv, "ncclRecv")
        stream = torch.cuda.current_stream(self.device)
        s = ctypes.c_void_p(stream.cuda_stream)
        works = []
        for chunk in [tensors] if grouped else [[t] for t in tensors]:
            _check(lib, "ncclGroupStart", lib.ncclGroupStart())
            try:
                for t in chunk:
                    if not t.is_contiguous():
                        raise ValueError("NcclComm.post: tensors must be contiguous")
                    _check(lib, name, op(t.data_ptr(), t.nbytes, NCCL_UINT8, peer, handle, s))
            finally:
                end = lib.ncclGroupEnd if self._connected else lib.ncclGroupEnd_releasing
                _check(lib, "ncclGroupEnd", end())
                self._connected = True
            works.append(self._record(stream))
        return works

    def _record(self, stream: torch.cuda.Stream) -> Work:
        """A Work for what was just posted on `stream`: an event recorded after it."""
        if not self.ctypes_events:
            event = torch.cuda.Event()
            event.record(stream)
            return Work(self, event, stream)
        try:
            event = self._free_events.pop()
        except IndexError:
            event = CudaEvent(self.device)
        event.record(stream)
        return Work(self, event, stream, self._free_events)

    def raise_async_error(self) -> None:
        err = ctypes.c_int()
        with self._lock:
            if self._aborted:
                raise NcclError("communicator aborted")
            _check(self._lib, "ncclCommGetAsyncError", self._lib.ncclCommGetAsyncError(self._handle, ctypes.byref(err)))
        if err.value not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
            _check(self._lib, "NCCL communicator", err.value)

    def abort(self) -> None:
        """Ends every op of this communicator, those still waiting for the peer included,
        and frees it. Idempotent."""
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
            with torch.cuda.device(self.device):
                self._lib.ncclCommAbort(self._handle)
