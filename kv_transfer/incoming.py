"""The receiver's bookkeeping types (decode side), used by receiver.py's TcpReceiver and
nccl.py's NcclReceiver; the lifecycle they serve is in receiver.py's docstring.

  _Incoming  one transfer's record: status, expected and written blocks, claims in flight
  _Conn      one accepted sender connection: socket, reader -> completer queue, claims
  _Message   a parts message read from a connection: its _InPart list; _Finish is a finish
             queued behind the messages; _Arrived is a part's data once it is all here
"""

from __future__ import annotations

import queue
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_transfer import wire
from kv_transfer.base import TransferStatus

S = TransferStatus


@dataclass(eq=False)
class _InPart:
    """One part of a parts message: a (transfer, layer) share of blocks."""
    tid: str
    layer: int
    dst_raw: bytes  # destination block ids as they travel (wire.block_ids): compared with ==
    runs: wire.Runs  # direct runs: (offset into dst, count), consecutive destination ids
    run_first: list[int]  # the first destination block of each run
    data: Any = None  # the data plane's handle on the part's bytes (see _take_data)
    claim: _Incoming | None = None  # the live transfer its runs land in, until settled
    unclaimed: str | None = None  # why its runs could not land in the cache (received into scratch)

    def __post_init__(self) -> None:
        self.dst = memoryview(self.dst_raw).cast("i")  # the ids as Python ints, no copy, no torch
        self.num_direct = sum(n for _, n in self.runs)
        self.num_staged = len(self.dst) - self.num_direct

    def run_dst(self) -> list[tuple[int, int]]:
        """(first destination block, count) of each run."""
        return [(first, n) for first, (_, n) in zip(self.run_first, self.runs)]

    def staged_dst(self) -> torch.Tensor:
        """The destination ids of the staged blocks, in wire order (int32, CPU)."""
        ids = torch.frombuffer(bytearray(self.dst_raw), dtype=torch.int32)
        if not self.runs:
            return ids
        keep = torch.ones(ids.numel(), dtype=torch.bool)
        for offset, n in self.runs:
            keep[offset:offset + n] = False
        return ids[keep]


@dataclass(eq=False)
class _Arrived:
    """A part's data once it is all here."""
    staged: torch.Tensor | None  # [2, m, bs, kvh, d]: the staged blocks, to scatter into the cache
    # [2, count, bs, kvh, d] per run, to copy into the cache (TCP on CUDA: they came through
    # host memory); empty where the runs were received in place
    runs: list[torch.Tensor] = field(default_factory=list)


@dataclass(eq=False)
class _Message:
    seq: int
    parts: list[_InPart]
    problem: str | None = None  # the whole message's data was unusable and has been dropped


@dataclass(eq=False)
class _Finish:
    tid: str
    num_layers: int


@dataclass(eq=False)
class _Conn:
    """One accepted sender connection."""
    sock: socket.socket
    peer: str
    arrivals: queue.Queue  # _Message | _Finish | None (stop): reader -> completer
    reader: wire.Reader = field(init=False)  # every read on sock goes through it
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None  # the reader
    completer: threading.Thread | None = None
    data: Any = None  # the data plane's per-connection state (nccl: the process group)
    claims: set[_InPart] = field(default_factory=set)  # parts whose runs may still be landing
    last_started: int = -1  # seq of the last parts message whose data the reader started moving

    def __post_init__(self) -> None:
        self.reader = wire.Reader(self.sock)


@dataclass(eq=False)
class _Incoming:
    dst_raw: dict[int, bytes]  # layer -> destination block ids as expect() gave them, as they travel
    dst: dict[int, torch.Tensor]  # the same as an int64 index on the cache device
    status: S = S.WAITING
    written: set[int] = field(default_factory=set)  # layers whose every expected block arrived
    pending: dict[int, set[int]] = field(default_factory=dict)  # layers partly written -> blocks still missing
    parts_written: int = 0  # a layer may come in several parts, one per prefill chunk
    direct_inflight: int = 0  # claimed parts whose runs may still be landing in its blocks
    unsynced: bool = False  # cache writes enqueued on the receiver's stream, not yet waited for
    conns: set[_Conn] = field(default_factory=set)  # connections that sent data for it
    reason: str = ""
