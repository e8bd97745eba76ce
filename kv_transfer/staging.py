"""Pinned host memory for the TCP data plane on CUDA caches, pinned once.

The TCP sender copies each part's KV from the GPU into pinned host memory on the
caller's thread (prefill's engine thread, inside send_layer), so that the copy is
asynchronous and the writer thread can send the bytes later. Pinning memory is slow
the first time -- cudaHostAlloc pins page by page, ~0.56 ms per MiB on an H200 host,
9 ms for a 16 MiB run of K -- and torch's caching host allocator pins fresh memory
whenever more parts are queued at once than ever before. Those allocations stalled the
engine thread 15-18 ms per layer (bench/tcp_send.py: send_layer's p99 17.7 ms, 0.61 ms
with this pool).

A `PinnedStaging` pins its memory once, at the sender's start, and hands out one
contiguous extent per part, in GRANULE units (64 KiB: one block of one layer of Scout's
K and V is 64 KiB, so a short prompt's part wastes little): the part's tensors are
copied into it back to back, one piece each, exactly as they go on the wire. Free
extents are kept sorted and merged, first fit; parts are taken and given back nearly in
queue order, so the memory stays in few extents. An extent comes back when its `Lease`,
which the part's payload holds, dies -- the part sent, dropped, or its peer gone:
`weakref.finalize`, so no path can leak it -- and is reused once the copies into it
have completed on the GPU. When no free extent is large enough, `stage` returns None and
the caller pins fresh memory as before (the sender's stats count `host_staging_misses`).

torch's host allocator pins a power of two: the pool takes the size asked for rounded
up to one, and uses all of it.
"""

from __future__ import annotations

import bisect
import collections
import threading
import weakref

import torch

GRANULE = 64 << 10
DEFAULT_STAGING_BYTES = 512 << 20  # a few requests' layers in flight; 0 disables the pool


def pinned_size(nbytes: int) -> int:
    """What torch pins for a request of nbytes (its host allocator rounds up to a power
    of two)."""
    return 1 << max(0, nbytes - 1).bit_length()


class PinnedStaging:
    def __init__(self, total_bytes: int = DEFAULT_STAGING_BYTES, *, pin: bool = True):
        """pin=False: ordinary memory of exactly total_bytes, for tests of the bookkeeping
        on machines without CUDA."""
        if type(total_bytes) is not int or total_bytes < GRANULE:
            raise ValueError(f"host staging: need at least {GRANULE} bytes, got {total_bytes!r}")
        size = pinned_size(total_bytes) if pin else total_bytes
        self.num_granules = size // GRANULE
        self.nbytes = self.num_granules * GRANULE
        self._memory = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)
        self._free: list[tuple[int, int]] = [(0, self.num_granules)]  # (start, count) in granules, sorted
        self._pending: list[tuple[int, int, object]] = []  # given back, copies maybe still running
        # Finalizers append here without a lock: one may run on a thread that holds the
        # lock below (a collection can fire it anywhere), and deque.append is atomic.
        self._returned: collections.deque[tuple[int, int, object]] = collections.deque()
        self._lock = threading.Lock()

    @property
    def free_bytes(self) -> int:
        with self._lock:
            self._reclaim()
            return GRANULE * sum(n for _, n in self._free)

    def stage(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Lease] | None:
        """Host copies of `tensors` (contiguous; on the GPU, or anywhere with pin=False),
        enqueued on the current stream: one uint8 piece each, back to back in one extent,
        and the lease that holds it: keep it as long as the pieces are read; the extent
        comes back when it dies, once the copies have completed. None: no free extent is
        large enough (nothing taken)."""
        sizes = [t.nbytes for t in tensors]
        need = max(1, -(-sum(sizes) // GRANULE))
        with self._lock:
            self._reclaim()
            start = self._take(need)
        if start is None:
            return None
        pieces, offset = [], start * GRANULE
        for t, size in zip(tensors, sizes):
            piece = self._memory[offset:offset + size]
            piece.copy_(t.reshape(-1).view(torch.uint8), non_blocking=True)
            pieces.append(piece)
            offset += size
        copied = self._record_copies(tensors[0].device) if tensors else None
        lease = Lease(copied)
        weakref.finalize(lease, self._returned.append, (start, need, copied))
        return pieces, lease

    @staticmethod
    def _record_copies(device: torch.device):
        """An event after the copies just enqueued (None off CUDA: they are done)."""
        if device.type != "cuda":
            return None
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(device))
        return copied

    def _take(self, need: int) -> int | None:
        """Caller holds the lock: the start of a free extent of `need` granules, first fit."""
        for i, (start, count) in enumerate(self._free):
            if count >= need:
                if count == need:
                    del self._free[i]
                else:
                    self._free[i] = (start + need, count - need)
                return start
        return None

    def _reclaim(self) -> None:
        """Caller holds the lock: extents given back whose copies have completed are free
        again, merged with their free neighbours."""
        while self._returned:
            self._pending.append(self._returned.popleft())
        still = []
        for start, count, copied in self._pending:
            if copied is None or copied.query():
                self._put(start, count)
            else:
                still.append((start, count, copied))
        self._pending = still

    def _put(self, start: int, count: int) -> None:
        i = bisect.bisect(self._free, (start, count))
        if i < len(self._free) and start + count == self._free[i][0]:  # merge with the next
            count += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:  # and the previous
            start, count = self._free[i - 1][0], self._free[i - 1][1] + count
            del self._free[i - 1]
            i -= 1
        self._free.insert(i, (start, count))


class Lease:
    """An extent of a PinnedStaging, held while this object lives; `copied`: the event
    after the copies into it (None off CUDA)."""

    def __init__(self, copied):
        self.copied = copied
