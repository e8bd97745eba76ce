"""Attention metadata: what one step's attention needs to know about the batch.

Built once per step per layer group (global layers; chunked-local layers) from the
requests' block tables, then shared by every layer of the group. Keys visible to a
query at position p:
  - global group: every key at position <= p;
  - local group: keys k <= p with k // C == p // C (position-aligned chunks of C tokens).
The local group's block table holds only the blocks of the current chunk (older ones
are released), so its key range starts at the chunk start, never at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeBatch:
    token_index: torch.Tensor  # [B] rows of the step's token batch that are single-token queries
    kv_slots: torch.Tensor  # [B, L] cache slots of each row's visible keys, padded
    mask: torch.Tensor  # [B, L] bool, True where a slot is a real visible key


@dataclass
class PrefillSegment:
    start: int  # this request's queries are tokens [start, end) of the step's batch
    end: int
    kv_slots: torch.Tensor  # [L] cache slots of keys [kv_start, q_end)
    mask: torch.Tensor | None  # [n, L] bool; None when it is exactly causal (square, no prefix)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot where each new token's K/V is written
    decode: DecodeBatch | None
    prefills: list[PrefillSegment]


@dataclass(frozen=True)
class SeqSpan:
    """One request's part of the step, as attention sees it."""

    batch_start: int  # first row in the step's token batch
    q_start: int  # absolute position of the first new token
    num_tokens: int
    block_table: tuple[int | None, ...]  # None: a block released from the local window


def build_metadata(
    spans: list[SeqSpan], block_size: int, chunk: int | None, device: torch.device
) -> AttentionMetadata:
    """chunk: the local attention chunk size, or None for global layers."""

    def slots(table: tuple[int | None, ...], lo: int, hi: int) -> torch.Tensor:
        pos = torch.arange(lo, hi)
        blocks = torch.tensor([b if b is not None else -1 for b in table[lo // block_size : (hi - 1) // block_size + 1]])
        s = blocks[pos // block_size - lo // block_size] * block_size + pos % block_size
        if bool((s < 0).any()):
            raise RuntimeError(f"attention reads a released block in positions [{lo}, {hi})")
        return s

    slot_mapping, dec_rows, dec_slots, prefills = [], [], [], []
    for sp in spans:
        q_end = sp.q_start + sp.num_tokens
        slot_mapping.append(slots(sp.block_table, sp.q_start, q_end))
        kv_start = 0 if chunk is None else (sp.q_start // chunk) * chunk
        kv = slots(sp.block_table, kv_start, q_end)
        if sp.num_tokens == 1:
            dec_rows.append(sp.batch_start)
            dec_slots.append(kv)
            continue
        qpos = torch.arange(sp.q_start, q_end)[:, None]
        kpos = torch.arange(kv_start, q_end)[None, :]
        square = kv_start == sp.q_start
        if square and (chunk is None or (q_end - 1) // chunk == sp.q_start // chunk):
            mask = None
        else:
            mask = kpos <= qpos
            if chunk is not None:
                mask &= (kpos // chunk) == (qpos // chunk)
            mask = mask.to(device)
        prefills.append(PrefillSegment(sp.batch_start, sp.batch_start + sp.num_tokens, kv.to(device), mask))

    decode = None
    if dec_rows:
        width = max(len(s) for s in dec_slots)
        kv_slots = torch.zeros(len(dec_rows), width, dtype=torch.long)
        mask = torch.zeros(len(dec_rows), width, dtype=torch.bool)
        for i, s in enumerate(dec_slots):
            kv_slots[i, : len(s)] = s
            mask[i, : len(s)] = True
        decode = DecodeBatch(torch.tensor(dec_rows, device=device), kv_slots.to(device), mask.to(device))
    return AttentionMetadata(torch.cat(slot_mapping).to(device), decode, prefills)
