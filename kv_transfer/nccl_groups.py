"""The NCCL backend's pair groups: the private 2-rank group each connection builds for
its data plane (rank 0 = sender, rank 1 = receiver), and how to wait for its ops. Used by
nccl.py's NcclSender and NcclReceiver; the lifecycle they serve (pair set-up, grouped
ops, failure) is in nccl.py's docstring.

  PG_BACKENDS     the group kinds, keyed by `pg_backend` (PgBackend: require,
                  make_group, wait, can_group): "nccl" (ctypes, nccl_lib.py; the
                  default), "nccl-torch" (ProcessGroupNCCL), and on CPU "gloo" and
                  "gloo-grouped" (tests, bench/kv_transfer.py --cpu)
  _C10dGroup      a torch.distributed group posting p2p ops one by one or as one group;
                  _GroupingGloo and _AllOf make gloo take NCCL's grouping calls
  _poll_work      NCCL: wait for an op without hanging on a dead peer (_block_on_work:
                  gloo's)
  _Pair           one connection's data plane: its store, its group, the sender's stream
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kv_transfer import nccl_lib
from kv_transfer.base import TransferError

SENDER_RANK, RECEIVER_RANK, WORLD = 0, 1, 2
TAG = 0


def _dist():
    """torch.distributed, imported on use: this module must import on any torch build."""
    import torch.distributed as dist
    return dist


# ---- process-group backends: requirements, factory, how to wait for an op

def _require_nccl(device: torch.device) -> None:
    dist = _dist()
    if not (dist.is_available() and dist.is_nccl_available()):
        raise TransferError(f"kv_transfer backend 'nccl': this torch build ({torch.__version__}) has no "
                            f"NCCL (CUDA available: {torch.cuda.is_available()}); on CPU-only machines use 'tcp'")
    if device.type != "cuda":
        raise TransferError(f"kv_transfer backend 'nccl': the KV caches are on {device}; NCCL moves CUDA "
                            "tensors only; use 'tcp' for CPU caches")


def _require_gloo(device: torch.device) -> None:
    if device.type != "cpu":
        raise TransferError(f"pg_backend 'gloo' (tests only) needs CPU caches, got {device}")


def _require_nccl_lib(device: torch.device) -> None:
    _require_nccl(device)
    try:
        nccl_lib.library()
    except nccl_lib.NcclError as e:
        raise TransferError(f"kv_transfer backend 'nccl': {e}; pg_backend 'nccl-torch' uses torch's own") from e


def _ctypes_nccl_group(store, rank: int, timeout: datetime.timedelta, device: torch.device):
    try:
        return nccl_lib.NcclComm.create(store, rank, device, timeout)
    except nccl_lib.NcclError as e:
        raise TransferError(f"kv_transfer backend 'nccl': {e}") from e


def _torch_nccl_group(store, rank: int, timeout: datetime.timedelta, device: torch.device):
    dist = _dist()
    opts = dist.ProcessGroupNCCL.Options()
    opts.is_high_priority_stream = False
    opts._timeout = timeout
    return _C10dGroup(dist.ProcessGroupNCCL(store, rank, WORLD, opts), rank)


def _gloo_pg(store, rank: int, timeout: datetime.timedelta):
    return _dist().ProcessGroupGloo(store, rank, WORLD, timeout=timeout)


def _poll_work(work, alive: Callable[[], bool], timeout: float, what: str,
               patient: Callable[[], bool] = lambda: False) -> None:
    """NCCL: wait for a p2p op without ever hanging on a dead peer (an NCCL op whose peer
    died never completes); then `work.wait()`, which orders the current stream after it.
    Sleeps between polls and never spins: a thread that spins in Python keeps the GIL (a
    sleep(0) hands it over only if the waiter wins the race; otherwise the waiter waits
    out the 5 ms switch interval), and the reader thread of the same connection needs
    the GIL to post the next recvs. Each poll takes the GIL from that reader, so: 20 us
    at first, doubling up to 100 us, or up to 400 us while `patient()` (a later
    message's recvs are posted behind this one: the link is busy with them, and
    learning of this one's completion late delays nothing). The peer is checked every
    10 ms."""
    start = checked = time.monotonic()
    delay = 2e-5
    while not work.is_completed():
        time.sleep(delay)
        delay = min(2 * delay, 4e-4 if patient() else 1e-4)
        now = time.monotonic()
        if now - checked > 0.01:
            if not alive():
                raise ConnectionError(f"peer went away during {what}")
            if now - start > timeout:
                raise TimeoutError(f"{what} did not complete in {timeout:.0f} s")
            checked = now
    work.wait()


def _block_on_work(work, alive: Callable[[], bool], timeout: float, what: str,
                   patient: Callable[[], bool] = lambda: False) -> None:
    """gloo: its send/recv works only complete inside wait(); gloo's own sockets see a dead
    peer and its timeout bounds the wait."""
    work.wait(datetime.timedelta(seconds=timeout))


@dataclass(frozen=True)
class PgBackend:
    """How the pair's process group is made and used, per `pg_backend`."""
    require: Callable[[torch.device], None]  # TransferError unless the caches' device can use it
    make_group: Callable[..., Any]  # (store, rank, timeout, device) -> a group with post() and abort()
    wait: Callable[..., None]  # (work, alive, timeout s, what, patient): until the op completed, never hanging
    can_group: bool  # can post a message's ops as one group (one launch, one work)


class _C10dGroup:
    """A 2-rank torch.distributed backend (ProcessGroupNCCL, gloo) posting p2p ops, one by
    one or as one group (`_start_coalescing` / `_end_coalescing`: ncclGroupStart/End)."""

    def __init__(self, pg, rank: int):
        self.pg = pg
        self.peer = WORLD - 1 - rank

    def post(self, tensors: list[torch.Tensor], send: bool, grouped: bool) -> list:
        """Each op moves the tensor's bytes (a uint8 view): any cache dtype travels, fp8
        included, which gloo has no type for (and NCCL only in recent builds)."""
        op = self.pg.send if send else self.pg.recv
        if not grouped:
            return [op([t.view(torch.uint8)], self.peer, TAG) for t in tensors]
        self.pg._start_coalescing()
        for t in tensors:
            op([t.view(torch.uint8)], self.peer, TAG)  # inside a group torch returns no work per op
        return [self.pg._end_coalescing()]

    def abort(self) -> None:
        self.pg.abort()


class _AllOf:
    """One work standing for several, as ProcessGroupNCCL's _end_coalescing returns."""

    def __init__(self, works: list):
        self.works = works

    def wait(self, timeout=None) -> bool:
        for w in self.works:
            w.wait() if timeout is None else w.wait(timeout)
        return True

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)


class _GroupingGloo:
    """A gloo pair group that takes NCCL's grouping calls the way ProcessGroupNCCL does:
    ops between _start_coalescing and _end_coalescing return no work, and
    _end_coalescing one work for all of them. So the grouped flow runs on CPU (tests,
    bench/kv_transfer.py --cpu)."""

    def __init__(self, group):
        self.group = group
        self.pending: list | None = None

    def _start_coalescing(self) -> None:
        assert self.pending is None, "groups do not nest"
        self.pending = []

    def _end_coalescing(self) -> _AllOf:
        works, self.pending = self.pending, None
        return _AllOf(works)

    def _op(self, work):
        if self.pending is None:
            return work
        self.pending.append(work)
        return None

    def send(self, tensors, dst, tag):
        return self._op(self.group.send(tensors, dst, tag))

    def recv(self, tensors, src, tag):
        return self._op(self.group.recv(tensors, src, tag))

    def abort(self) -> None:
        self.group.abort()


PG_BACKENDS: dict[str, PgBackend] = {
    "nccl": PgBackend(_require_nccl_lib, _ctypes_nccl_group, _poll_work, can_group=True),
    "nccl-torch": PgBackend(_require_nccl, _torch_nccl_group, _poll_work, can_group=True),
    "gloo": PgBackend(_require_gloo, lambda store, rank, timeout, device: _C10dGroup(_gloo_pg(store, rank, timeout), rank),
                      _block_on_work, can_group=False),
    "gloo-grouped": PgBackend(_require_gloo, lambda store, rank, timeout, device: _C10dGroup(
        _GroupingGloo(_gloo_pg(store, rank, timeout)), rank), _block_on_work, can_group=True),
}


@dataclass
class _Pair:
    """One connection's data plane."""
    store: Any  # TCPStore: the receiver hosts it, the sender is its client
    prefix: str  # unique per pair: the store's keys
    grouped: bool  # a message's ops go as one group (both sides alike)
    group: Any = None  # the 2-rank group: nccl_lib.NcclComm or _C10dGroup
    stream: Any = None  # sender, CUDA: the stream its sends are posted from
    posted: deque = field(default_factory=deque)  # sender: the works of the messages posted last (LINK_DEPTH)

    def post(self, tensors: list[torch.Tensor], send: bool) -> list:
        """One p2p op per tensor, in order, on the current stream: sends to the receiver or
        recvs from the sender. Returns their works: one per op, or one for the group."""
        return self.group.post(tensors, send, self.grouped)

    def abort(self) -> None:
        if self.group is not None:
            with contextlib.suppress(Exception):  # abort is best effort on a broken group
                self.group.abort()
            self.group = None
