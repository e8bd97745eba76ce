"""PinnedStaging's bookkeeping (kv_transfer/staging.py), on ordinary memory (pin=False):
pieces carry the tensors' bytes in wire order, a lease holds its extent until it dies,
a pool without room takes nothing, small parts pack, freed extents merge, and a
finalizer that fires inside the pool's lock does not deadlock. On CUDA the same code
pins its memory and records an event after the copies (bench/tcp_send.py runs it)."""

import gc
import threading

import pytest
import torch

from kv_transfer.staging import GRANULE, PinnedStaging, pinned_size


def _bytes(tensors):
    return b"".join(t.reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors)


def test_pieces_carry_the_bytes_in_order_and_the_lease_holds_the_extent():
    pool = PinnedStaging(64 * GRANULE, pin=False)
    g = torch.Generator().manual_seed(0)
    # K and V of a run (bf16, 1.5 granules each), then a small odd-sized float32 tensor
    k = torch.randn(3 * GRANULE // 4, generator=g).to(torch.bfloat16)
    v = torch.randn(3 * GRANULE // 4, generator=g).to(torch.bfloat16)
    small = torch.randn(1001, generator=g)
    pieces, lease = pool.stage([k, v, small])
    assert [p.nbytes for p in pieces] == [k.nbytes, v.nbytes, small.nbytes]
    assert all(p.dtype == torch.uint8 and p.is_contiguous() for p in pieces)
    assert _bytes(pieces) == _bytes([k, v, small])
    assert pool.free_bytes == 64 * GRANULE - 4 * GRANULE  # 3 granules and 4 KiB: 4
    del pieces, lease
    assert pool.free_bytes == 64 * GRANULE


def test_small_parts_pack_and_a_part_without_room_takes_nothing():
    pool = PinnedStaging(8 * GRANULE, pin=False)
    one_block = torch.zeros(GRANULE // 2, dtype=torch.bfloat16)  # one Scout block's K+V of a layer
    held = [pool.stage([one_block]) for _ in range(8)]
    assert all(h is not None for h in held) and pool.free_bytes == 0
    assert pool.stage([one_block]) is None
    assert pool.free_bytes == 0
    del held[3]
    assert pool.stage([torch.zeros(2 * GRANULE, dtype=torch.uint8)]) is None  # one granule free, not two
    assert pool.stage([one_block]) is not None


def test_freed_extents_merge_back_into_one():
    pool = PinnedStaging(16 * GRANULE, pin=False)
    leases = [pool.stage([torch.zeros(4 * GRANULE, dtype=torch.uint8)]) for _ in range(4)]
    for i in (2, 0, 3, 1):  # out of order: the extents must still merge into the whole pool
        leases[i] = None
    assert pool.stage([torch.zeros(16 * GRANULE, dtype=torch.uint8)]) is not None


def test_extents_come_back_only_once_the_copies_into_them_completed():
    class Copies:  # a CUDA event's query()
        done = False

        def query(self):
            return self.done

    copies = Copies()

    class Staging(PinnedStaging):
        @staticmethod
        def _record_copies(device):
            return copies

    pool = Staging(2 * GRANULE, pin=False)
    pieces, lease = pool.stage([torch.zeros(GRANULE, dtype=torch.uint8)])
    assert lease.copied is copies and pool.free_bytes == GRANULE
    del pieces, lease  # dropped before its copies ran (a part of a failed transfer)
    assert pool.free_bytes == GRANULE
    assert pool.stage([torch.zeros(2 * GRANULE, dtype=torch.uint8)]) is None
    copies.done = True
    assert pool.free_bytes == 2 * GRANULE


def test_a_lease_collected_inside_the_pools_lock_does_not_deadlock():
    """A lease in a reference cycle dies when the collector runs, on whatever thread, at
    any point: here while that thread holds the pool's lock (as stage() does)."""
    pool = PinnedStaging(4 * GRANULE, pin=False)
    _, lease = pool.stage([torch.zeros(GRANULE, dtype=torch.uint8)])
    cycle = [lease]
    cycle.append(cycle)
    del lease, cycle

    def collect_holding_the_lock():
        with pool._lock:
            gc.collect()

    t = threading.Thread(target=collect_holding_the_lock, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "the finalizer waited for the lock its own thread held"
    assert pool.free_bytes == 4 * GRANULE


def test_the_pinned_size_is_a_power_of_two():
    assert [pinned_size(n) for n in (1, GRANULE, 600 << 20, 512 << 20)] == [1, GRANULE, 1 << 30, 512 << 20]


@pytest.mark.parametrize("total", [0, GRANULE - 1, 1.5 * GRANULE, "512MiB"])
def test_bad_sizes_are_refused(total):
    with pytest.raises(ValueError, match="host staging"):
        PinnedStaging(total, pin=False)
