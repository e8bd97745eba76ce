"""The transfer interface: status enum, cache layout handshake, sender/receiver ABCs, registry.

A *transfer* is one request's KV blocks moving from a prefill process (the sender) into
a decode process's (the receiver's) paged KV cache. Each side's cache is a list of
per-layer tensors `kv_caches[layer]`, `[2, num_blocks, block_size, num_kv_heads, head_dim]`
(K and V; num_blocks may differ between layers: Llama 4's local and global layer groups
have separate pools). For each layer the transfer names `src_blocks` on the sender and the
same-length `dst_blocks` on the receiver. Each `send_layer` call makes one *part*. Parts
travel in messages that may carry several parts, of several transfers (sender.py:
coalescing); a layer may take several parts (chunked prefill sends its blocks as they fill).

Direct runs and staged blocks. A part's block lists split into maximal *runs* where
both the src and the dst ids step by one (`direct_runs`). A run of at least
`min_direct_blocks` blocks travels DIRECT: K blocks s..s+n-1 of a layer are one
contiguous region `kv_caches[layer][0, s:s+n]` (V likewise), so the sender sends those
cache views as they are and the receiver receives straight into its own cache views,
no copy on either side. The other blocks are STAGED: gathered into a contiguous
`[2, m, bs, kvh, d]` on the sender, received into a buffer and scattered into the cache
on the receiver. A fresh pool hands out consecutive ids, so a long prompt's layers are
usually one run each; a fragmented pool gives short runs, which stay staged (a p2p op
per two short regions would be latency-bound).

Two rules follow from reading and writing caches in place:
  - sender: a direct run is read when its message goes out, not at send_layer. Before
    the caller writes into a block it passed (a freed block reused by a later request),
    it calls `fence()`: copies what is still queued and orders the caller's stream
    after the sends already posted (KVSender.fence);
  - receiver: bytes may land in a transfer's blocks only while it is live, and
    `abort()` and `release()` return only once no recv into its blocks is in flight,
    waiting for them if need be (KVReceiver.abort).

Who knows what (one sender per (receiver, transfer)):
  - the receiver learns the transfer's layers and destination blocks from `expect()`
    BEFORE the sender starts, and is DONE once every expected layer was written;
  - the sender's `finish(num_layers)` is the end-of-stream marker (`num_layers`: the parts
    sent, i.e. send_layer calls): the receiver answers it, after every earlier message on
    that connection was processed, with DONE (all expected layers written and
    `num_layers` parts written) or FAILED. That answer is what makes the sender's side DONE.

Both sides report a `TransferStatus`; FAILED and DONE are terminal. The order
FAILED < BOOTSTRAPPING < WAITING < TRANSFERRING < DONE makes `min()` over the ranks of a
tensor-parallel group the group's status.

Backends register themselves in `BACKENDS` (see `register_backend`); importing the
`kv_transfer` package registers "tcp" and "nccl".
"""

from __future__ import annotations

import abc
import array
import enum
import threading
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Sequence

import torch


class TransferStatus(enum.IntEnum):
    FAILED = 0
    BOOTSTRAPPING = 1  # connection / handshake in progress
    WAITING = 2  # registered, no data yet
    TRANSFERRING = 3  # some layers moved
    DONE = 4  # every layer written (receiver) / acknowledged as written (sender)

    @property
    def terminal(self) -> bool:
        return self in (TransferStatus.FAILED, TransferStatus.DONE)


class TransferError(RuntimeError):
    """A transfer could not be set up or carried out (peer unreachable, backend unusable)."""


class LayoutMismatch(ValueError):
    """The two sides' KV caches are laid out differently; the message names every field."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype: unknown torch dtype {name!r}")
    return dtype


@dataclass(frozen=True)
class CacheLayout:
    """What both sides must agree on before a byte moves. All fields must be equal:
    heterogeneous tensor parallelism (different kv heads per rank) is not supported."""

    model: str
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    num_layers: int
    num_kv_heads: int  # per tensor-parallel rank
    head_dim: int
    block_size: int  # tokens per block
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        dtype_from_name(self.dtype)
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "tp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank: must be in [0, {self.tp_size}), got {self.tp_rank}")

    def check_compatible(self, other: CacheLayout) -> None:
        diffs = [
            f"{f.name}: {getattr(self, f.name)!r} here vs {getattr(other, f.name)!r} at peer"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
        if diffs:
            raise LayoutMismatch("KV cache layouts differ: " + "; ".join(diffs))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheLayout:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"CacheLayout: unknown fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_caches(cls, model: str, kv_caches: Sequence[torch.Tensor],
                    tp_rank: int = 0, tp_size: int = 1) -> CacheLayout:
        if not kv_caches:
            raise ValueError("kv_caches: empty")
        c0 = kv_caches[0]
        if c0.dim() != 5:
            raise ValueError(f"kv_caches[0]: shape {tuple(c0.shape)}, want "
                             "[2, num_blocks, block_size, num_kv_heads, head_dim]")
        layout = cls(model=model, dtype=dtype_name(c0.dtype), num_layers=len(kv_caches),
                     num_kv_heads=c0.shape[3], head_dim=c0.shape[4], block_size=c0.shape[2],
                     tp_rank=tp_rank, tp_size=tp_size)
        layout.check_caches(kv_caches)
        return layout

    def check_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        """ValueError unless `kv_caches` is laid out as this layout says."""
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"kv_caches: {len(kv_caches)} layers, layout says {self.num_layers}")
        want_tail = (self.block_size, self.num_kv_heads, self.head_dim)
        device = kv_caches[0].device
        for i, c in enumerate(kv_caches):
            if c.dim() != 5 or c.shape[0] != 2 or tuple(c.shape[2:]) != want_tail:
                raise ValueError(f"kv_caches[{i}]: shape {tuple(c.shape)}, want "
                                 f"[2, num_blocks, {', '.join(map(str, want_tail))}]")
            if dtype_name(c.dtype) != self.dtype:
                raise ValueError(f"kv_caches[{i}]: dtype {dtype_name(c.dtype)}, layout says {self.dtype}")
            if c.device != device:
                raise ValueError(f"kv_caches[{i}]: on {c.device}, layer 0 on {device}")
            if not c.is_contiguous():
                raise ValueError(f"kv_caches[{i}]: must be contiguous")


_RAW_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def raw(t: torch.Tensor) -> torch.Tensor:
    """`t` viewed as the integer dtype of its element size: the same elements, as bits. A
    transfer moves bytes, never values, and index_select / index_copy_ exist for integer
    dtypes on every device (index_copy_ has no fp8 kernel on CPU); the element count,
    hence the speed of those kernels, stays that of `t`'s dtype. `t`'s last dimension
    must be contiguous."""
    return t.view(_RAW_DTYPES[t.element_size()])


def check_blocks(kv_caches: Sequence[torch.Tensor], layer: int, blocks: Sequence[int], name: str) -> torch.Tensor:
    """ValueError naming `name` unless `blocks` are valid block ids of `layer`; returns them
    as a CPU int64 tensor. Vectorised: a 32k-token layer lists ~2,000 blocks, and a
    per-id Python check cost ~1 ms a message (measured)."""
    if not 0 <= layer < len(kv_caches):
        raise ValueError(f"layer: {layer} out of range [0, {len(kv_caches)})")
    if not len(blocks):
        raise ValueError(f"{name}: empty block list for layer {layer}")
    try:
        ids = torch.frombuffer(array.array("q", blocks), dtype=torch.int64)  # keeps the array alive
    except (TypeError, OverflowError) as e:
        raise ValueError(f"{name}: layer {layer} block ids must be integers ({e})") from None
    nb = kv_caches[layer].shape[1]
    lo, hi = torch.aminmax(ids)
    if int(lo) < 0 or int(hi) >= nb:
        bad = ids[(ids < 0) | (ids >= nb)][:8].tolist()
        raise ValueError(f"{name}: layer {layer} block ids {bad} out of range [0, {nb})")
    return ids


def direct_runs(src: torch.Tensor, dst: torch.Tensor, min_blocks: int) -> list[tuple[int, int]]:
    """The maximal runs (offset, count) of positions where both `src` and `dst` (1-D
    integer tensors of one length) step by one, keeping those of at least `min_blocks`
    positions, in order. Vectorised: a fragmented 32k-token layer has ~2,000 runs."""
    n = src.numel()
    if n < min_blocks:
        return []
    steps = ((src[1:] - src[:-1]) == 1) & ((dst[1:] - dst[:-1]) == 1)  # [n - 1]: i+1 continues i's run
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64), torch.nonzero(~steps).flatten() + 1,
                        torch.full((1,), n, dtype=torch.int64)])
    starts, counts = bounds[:-1], bounds[1:] - bounds[:-1]
    keep = counts >= min_blocks
    return list(zip(starts[keep].tolist(), counts[keep].tolist()))


class TransferRecords:
    """poll / reason / wait over `self._transfers` (transfer id -> a record with `status`
    and `reason`), guarded by `self._lock` and its condition `self._cond`: the part of
    the bookkeeping the sender and the receiver share."""

    _lock: threading.Lock
    _cond: threading.Condition
    _transfers: dict

    def _record(self, transfer_id: str):
        """Caller holds the lock."""
        rec = self._transfers.get(transfer_id)
        if rec is None:
            raise KeyError(f"transfer_id: unknown {transfer_id!r}")
        return rec

    def poll(self, transfer_id: str) -> TransferStatus:
        with self._lock:
            return self._record(transfer_id).status

    def reason(self, transfer_id: str) -> str:
        """Why a transfer FAILED ('' otherwise, or when unknown)."""
        with self._lock:
            rec = self._transfers.get(transfer_id)
            return "" if rec is None else rec.reason

    def wait(self, transfer_id: str, timeout: float) -> TransferStatus:
        """Block until DONE or FAILED, or `timeout` seconds; the status then."""
        with self._cond:
            self._cond.wait_for(lambda: self._record(transfer_id).status.terminal, timeout=max(0.0, timeout))
            return self._record(transfer_id).status



class KVEndpoint(abc.ABC):
    """What both sides of a transfer answer: its status by transfer id, and their own
    lifetime."""

    @abc.abstractmethod
    def poll(self, transfer_id: str) -> TransferStatus: ...

    @abc.abstractmethod
    def wait(self, transfer_id: str, timeout: float) -> TransferStatus:
        """Block until DONE or FAILED, or `timeout` seconds; return the status then."""

    @abc.abstractmethod
    def abort(self, transfer_id: str) -> None: ...

    @abc.abstractmethod
    def release(self, transfer_id: str) -> None:
        """Forget the transfer's bookkeeping (after DONE, FAILED or abort)."""

    @abc.abstractmethod
    def stats(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class KVReceiver(KVEndpoint):
    """Decode side. Constructed with (layout, kv_caches, host, port); listens at once.
    `abort`: FAILED from now on; no byte of it is written into the cache after it
    returns (it waits for recvs already landing in the transfer's blocks). `release`
    waits the same way, so a caller may free the blocks once either has returned."""

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """'host:port' for senders to connect to."""

    @abc.abstractmethod
    def expect(self, transfer_id: str, layers: dict[int, list[int]]) -> None:
        """Register destination block ids per layer; call before the sender starts."""


class KVSender(KVEndpoint):
    """Prefill side. Constructed with (layout, kv_caches)."""

    @abc.abstractmethod
    def connect(self, address: str) -> None:
        """Open (or reuse) the connection to `address` and check layouts (LayoutMismatch)."""

    @abc.abstractmethod
    def send_layer(self, address: str, transfer_id: str, layer: int,
                   src_blocks: list[int], dst_blocks: list[int]) -> None:
        """Send the layer's blocks in the background: staged blocks are gathered now
        (stream-ordered), direct runs are read when their message goes out (fence())."""

    @abc.abstractmethod
    def fence(self) -> None:
        """Call before writing into any block passed to send_layer (from the thread, and
        on CUDA the stream, that writes it): afterwards no send reads a source block
        later than that write. Parts still queued get their direct runs copied now;
        sends already posted are waited for (CUDA: the current stream waits; CPU: this
        thread waits for the receiver's ack)."""

    @abc.abstractmethod
    def finish(self, address: str, transfer_id: str, num_layers: int) -> None:
        """Mark the end of the transfer: `num_layers` layers were sent."""


BACKENDS: dict[str, tuple[type[KVSender], type[KVReceiver]]] = {}


def register_backend(name: str) -> Callable[[tuple[type[KVSender], type[KVReceiver]]], None]:
    def add(pair: tuple[type[KVSender], type[KVReceiver]]) -> None:
        if name in BACKENDS:
            raise ValueError(f"kv_transfer backend {name!r} registered twice")
        BACKENDS[name] = pair
    return add


def _backend(name: str) -> tuple[type[KVSender], type[KVReceiver]]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"kv_transfer backend: unknown {name!r}; choose from {sorted(BACKENDS)}") from None


def make_sender(name: str, layout: CacheLayout, kv_caches: Sequence[torch.Tensor], **kwargs) -> KVSender:
    return _backend(name)[0](layout, kv_caches, **kwargs)


def make_receiver(name: str, layout: CacheLayout, kv_caches: Sequence[torch.Tensor], **kwargs) -> KVReceiver:
    return _backend(name)[1](layout, kv_caches, **kwargs)
