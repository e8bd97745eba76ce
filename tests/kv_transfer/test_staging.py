"""PinnedStaging's bookkeeping (kv_transfer/staging.py), on ordinary memory (pin=False):
pieces carry the tensors' bytes in wire order, a lease holds its slabs until it dies,
and a pool too small for a part takes nothing. On CUDA the same code pins its memory
and records an event after the copies (bench/disagg.py --one-gpu runs it)."""

import gc

import pytest
import torch

from kv_transfer.staging import SLAB_BYTES, PinnedStaging


def _bytes(tensors):
    return b"".join(t.reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors)


def test_pieces_carry_the_bytes_in_order_and_the_lease_holds_the_slabs():
    pool = PinnedStaging(8 * SLAB_BYTES, pin=False)
    g = torch.Generator().manual_seed(0)
    # K and V of a run, 1.5 slabs each in bf16, then a small odd-sized float32 tensor
    k = torch.randn(3 * SLAB_BYTES // 4, generator=g).to(torch.bfloat16)
    v = torch.randn(3 * SLAB_BYTES // 4, generator=g).to(torch.bfloat16)
    small = torch.randn(1001, generator=g)
    pieces, lease = pool.stage([k, v, small])
    assert all(p.dtype == torch.uint8 and p.is_contiguous() and p.nbytes <= SLAB_BYTES for p in pieces)
    assert _bytes(pieces) == _bytes([k, v, small])
    assert pool.free_slabs == 8 - (2 + 2 + 1)
    del pieces, lease
    gc.collect()
    assert pool.free_slabs == 8


def test_a_part_larger_than_the_free_slabs_takes_nothing():
    pool = PinnedStaging(4 * SLAB_BYTES, pin=False)
    held = pool.stage([torch.zeros(3 * SLAB_BYTES, dtype=torch.uint8)])
    assert held is not None and pool.free_slabs == 1
    assert pool.stage([torch.zeros(SLAB_BYTES + 1, dtype=torch.uint8)]) is None  # needs 2
    assert pool.free_slabs == 1
    again = pool.stage([torch.ones(SLAB_BYTES, dtype=torch.uint8)])
    assert again is not None and pool.free_slabs == 0
    del held
    assert pool.free_slabs == 3


def test_slabs_come_back_only_once_the_copies_into_them_completed():
    class Copies:  # a CUDA event's query()
        done = False

        def query(self):
            return self.done

    copies = Copies()

    class Staging(PinnedStaging):
        @staticmethod
        def _record_copies(device):
            return copies

    pool = Staging(2 * SLAB_BYTES, pin=False)
    pieces, lease = pool.stage([torch.zeros(SLAB_BYTES, dtype=torch.uint8)])
    assert lease.copied is copies and pool.free_slabs == 1
    del pieces, lease  # dropped before its copies ran (a part of a failed transfer)
    assert pool.free_slabs == 1
    assert pool.stage([torch.zeros(2 * SLAB_BYTES, dtype=torch.uint8)]) is None
    copies.done = True
    assert pool.free_slabs == 2


@pytest.mark.parametrize("total", [0, SLAB_BYTES - 1, 1.5 * SLAB_BYTES, "512MiB"])
def test_bad_sizes_are_refused(total):
    with pytest.raises(ValueError, match="host staging"):
        PinnedStaging(total, pin=False)
