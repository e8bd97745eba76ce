"""The sender's bookkeeping types (prefill side), used by sender.py's TcpSender and
nccl.py's NcclSender; the lifecycle they serve is in sender.py's docstring.

  _Outgoing  one transfer's record: status, layer counters, recent block lists
  _Peer      one connection to a receiver: socket, _Outbox, messages in flight (_Sent)
  _Outbox    a peer's FIFO of queued items: _Part (one send_layer call: its _BlockIds and
             _Payload) and _Control (finish, abort)
"""

from __future__ import annotations

import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from kv_transfer import wire
from kv_transfer.base import TransferStatus

S = TransferStatus


@dataclass(eq=False)
class _BlockIds:
    """A (src, dst) pair of block lists as send_layer saw it, checked, converted and split."""
    num_blocks: int  # of the layer's pool: the src ids were checked against it
    src_blocks: list[int]  # copies of the caller's lists
    dst_blocks: list[int]
    dst: bytes  # the destination ids as they travel (wire.block_ids)
    runs: wire.Runs  # direct runs, (offset into the lists, count), as they travel
    run_src: list[int]  # the first src block of each run
    staged: torch.Tensor | None  # [m] int64 index of the staged src blocks, on the cache's device; None if m = 0
    num_staged: int

    @property
    def num_direct(self) -> int:
        return len(self.src_blocks) - self.num_staged

    def matches(self, num_blocks: int, src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> bool:
        # Lists only: `==` on an array or a tensor compares element-wise.
        return (num_blocks == self.num_blocks and type(src_blocks) is list and type(dst_blocks) is list
                and src_blocks == self.src_blocks and dst_blocks == self.dst_blocks)


@dataclass(eq=False)
class _Payload:
    """What one part puts on the wire, in wire order: its staged blocks, then K and V of
    each direct run."""
    staged: torch.Tensor | None  # [2, m, bs, kvh, d], contiguous; None if every block is in a run
    runs: list[torch.Tensor]  # [count, bs, kvh, d] each, contiguous: K then V of each run
    # CUDA: event recorded on the caller's stream once the tensors may be read; NCCL: a
    # cuda_events.CudaEvent (or torch's), TCP: a torch.cuda.Event (its writer host-waits on it)
    ready: Any = None
    ready_stream: Any = None  # the stream `ready` was recorded on
    ready_seq: int = -1  # when: _record_ready's count (a message waits for the latest recording per stream)
    views: bool = False  # runs are views of the cache, read when sent (fence() copies them)
    keep: Any = None  # lives as long as the payload: TCP on CUDA, its host staging lease (staging.py)

    def __post_init__(self) -> None:
        self.nbytes = sum(t.nbytes for t in self.tensors())  # fixed: copies (fence, host staging) keep sizes

    def tensors(self) -> list[torch.Tensor]:
        return ([] if self.staged is None else [self.staged]) + self.runs


@dataclass(eq=False)
class _Part:
    """One send_layer call, queued for its peer's writer."""
    tid: str
    layer: int
    ids: _BlockIds
    payload: _Payload


@dataclass(eq=False)
class _Control:
    """A finish or abort message, queued behind the parts before it."""
    tid: str
    header: dict[str, Any]


@dataclass(eq=False)
class _Sent:
    """A parts message awaiting its ack."""
    peer: _Peer
    parts: list[tuple[str, int]]  # (tid, layer) of each part, in message order
    keep: list = field(default_factory=list)  # data-plane objects that must live until the ack
    reads_cache: bool = False  # its data-plane ops read cache views (direct runs): fence() orders after them
    posted: bool = False  # its data-plane ops are all posted (the NCCL data plane sets it)


class _Outbox:
    """A peer's FIFO of _Part | _Control | None (stop): put() from any thread; take() takes a
    whole message's parts under one lock (a queue.Queue costs a lock round trip per item,
    and a notify per put)."""

    def __init__(self) -> None:
        self._items: deque = deque()
        self._cond = threading.Condition(threading.Lock())

    def put(self, item: _Part | _Control | None) -> None:
        with self._cond:
            self._items.append(item)
            if len(self._items) == 1:  # the writer waits only on an empty box
                self._cond.notify()

    def wait(self) -> None:
        """Block until something is queued."""
        with self._cond:
            self._cond.wait_for(lambda: self._items)

    def take(self, max_bytes: int, writer: bool) -> list[_Part] | _Control | None:
        """The next item without waiting ([] if none); if it is a part, with it every part
        queued right behind it, in order, while the total stays within max_bytes (at
        least one). The stop (None) is only for the writer thread: [] for the others."""
        with self._cond:
            if not self._items or (self._items[0] is None and not writer):
                return []
            item = self._items.popleft()
            if not isinstance(item, _Part):
                return item
            parts, nbytes = [item], item.payload.nbytes
            while self._items:
                item = self._items[0]
                if not isinstance(item, _Part) or nbytes + item.payload.nbytes > max_bytes:
                    break  # a control message, a stop, or the next message's first part
                parts.append(self._items.popleft())
                nbytes += item.payload.nbytes
            return parts


@dataclass(eq=False)
class _Peer:
    """One connection to a receiver."""
    address: str
    sock: socket.socket
    reader: wire.Reader  # every read on sock goes through it
    outbox: _Outbox = field(default_factory=_Outbox)
    # Held by whoever takes messages from the outbox and writes them (the writer thread or
    # a caller writing inline), from the take to the last byte: every write on sock after
    # the handshake happens under it, in queue order.
    writing: threading.Lock = field(default_factory=threading.Lock)
    alive: bool = True
    threads: list[threading.Thread] = field(default_factory=list)
    threads_running: int = 2  # writer and reader
    data: Any = None  # the data plane's per-connection state
    next_seq: int = 0  # the next parts message's number
    inflight: dict[int, _Sent] = field(default_factory=dict)  # seq -> message, until acked
    # Queued parts whose payload holds cache views, until the writer hands them to the data
    # plane (an insertion-ordered set): the parts fence() may still copy.
    unposted: dict[_Part, None] = field(default_factory=dict)


@dataclass(eq=False)
class _Outgoing:
    address: str
    status: S = S.BOOTSTRAPPING
    peer: _Peer | None = None
    # Parts queued / acknowledged. A layer may take several parts: chunked prefill sends
    # its blocks step by step as they fill.
    layers_queued: int = 0
    layers_acked: int = 0
    finished: bool = False
    reason: str = ""
    # The block lists of recent calls, most recent first, at most MAX_BLOCK_IDS of them
    # (chunked prefill brings new lists every step). Cleared when the record turns terminal.
    block_ids: list[_BlockIds] = field(default_factory=list)

    MAX_BLOCK_IDS = 4

    def find_ids(self, num_blocks: int, src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> _BlockIds | None:
        return next((b for b in self.block_ids if b.matches(num_blocks, src_blocks, dst_blocks)), None)

    def remember_ids(self, ids: _BlockIds) -> None:
        if not self.block_ids or self.block_ids[0] is not ids:
            self.block_ids = [ids, *(b for b in self.block_ids if b is not ids)][:self.MAX_BLOCK_IDS]
