"""Pinned host memory for the TCP data plane on CUDA caches, pinned once.

The TCP sender copies each part's KV from the GPU into pinned host memory on the
caller's thread (prefill's engine thread, inside send_layer), so that the copy is
asynchronous and the writer thread can send the bytes later. Pinning memory is slow
the first time -- cudaHostAlloc pins page by page, ~0.56 ms per MiB on an H200 host,
9 ms for a 16 MiB run of K -- and torch's caching host allocator pins fresh memory
whenever more parts are queued at once than ever before. Those allocations stalled the
engine thread 15-18 ms per layer (bench/disagg.py --one-gpu: the KV push's p99 was
32-53 ms of a request's 50 ms prefill).

A `PinnedStaging` pins `total_bytes` once, at the sender's start, and hands them out
in fixed SLAB_BYTES slabs: a tensor of n bytes takes ceil(n / SLAB_BYTES) slabs and is
copied into them piece by piece (the wire carries bytes: a part's pieces go back to
back, exactly as its tensors would). The slabs come back when their `Lease`, which the
part's payload holds, dies -- the part sent, dropped, or its peer gone:
`weakref.finalize`, so no path can leak them -- and are reused once the copies into
them have completed on the GPU. When the pool
has too few free slabs, `take` returns None and the caller pins fresh memory as
before (counted in the sender's stats as `host_staging_misses`).
"""

from __future__ import annotations

import threading
import weakref

import torch

SLAB_BYTES = 4 << 20
DEFAULT_STAGING_BYTES = 512 << 20  # a few requests' layers in flight; 0 disables the pool


class PinnedStaging:
    def __init__(self, total_bytes: int = DEFAULT_STAGING_BYTES, *, pin: bool = True):
        """pin=False: ordinary memory, for tests of the bookkeeping on machines without CUDA."""
        if type(total_bytes) is not int or total_bytes < SLAB_BYTES:
            raise ValueError(f"host staging: need at least {SLAB_BYTES} bytes, got {total_bytes!r}")
        n = total_bytes // SLAB_BYTES
        self._memory = torch.empty(n * SLAB_BYTES, dtype=torch.uint8, pin_memory=pin)
        self._free = list(range(n))  # slab indices
        self._pending: list[tuple[list[int], object]] = []  # (slabs, event of the copies into them)
        self._lock = threading.Lock()
        self.num_slabs = n

    @property
    def free_slabs(self) -> int:
        with self._lock:
            self._reclaim()
            return len(self._free)

    def stage(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Lease] | None:
        """Host copies of `tensors` (contiguous; on the GPU, or anywhere with pin=False),
        enqueued on the current stream: uint8 pieces in wire order, and the lease that
        holds their slabs: keep it as long as the pieces are read; the slabs come back
        when it dies, once the copies have completed. None: too few free slabs (nothing
        taken)."""
        sizes = [t.nbytes for t in tensors]
        need = sum(-(-s // SLAB_BYTES) for s in sizes)
        with self._lock:
            self._reclaim()
            if need > len(self._free):
                return None
            slabs, self._free = self._free[:need], self._free[need:]
        pieces, k = [], 0
        for t, size in zip(tensors, sizes):
            flat = t.reshape(-1).view(torch.uint8)
            for start in range(0, size, SLAB_BYTES):
                n = min(SLAB_BYTES, size - start)
                piece = self._memory[slabs[k] * SLAB_BYTES:][:n]
                piece.copy_(flat[start:start + n], non_blocking=True)
                pieces.append(piece)
                k += 1
        copied = self._record_copies(tensors[0].device) if tensors else None
        lease = Lease(copied)
        weakref.finalize(lease, self._give, slabs, copied)
        return pieces, lease

    @staticmethod
    def _record_copies(device: torch.device):
        """An event after the copies just enqueued (None off CUDA: they are done)."""
        if device.type != "cuda":
            return None
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(device))
        return copied

    def _give(self, slabs: list[int], copied) -> None:
        with self._lock:
            self._pending.append((slabs, copied))

    def _reclaim(self) -> None:
        """Caller holds the lock: slabs whose copies have completed are free again."""
        still = []
        for slabs, copied in self._pending:
            if copied is None or copied.query():
                self._free += slabs
            else:
                still.append((slabs, copied))
        self._pending = still


class Lease:
    """Slabs of a PinnedStaging, held while this object lives; `copied`: the event after
    the copies into them (None off CUDA)."""

    def __init__(self, copied):
        self.copied = copied
