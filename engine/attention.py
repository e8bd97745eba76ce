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

import functools
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DecodeBatch:
    """Rows of the step's batch that are single-token queries. Row b sees the keys at
    positions [kv_start[b], kv_start[b] + kv_len[b]), found through its block table.
    All tensors are on the device; a CUDA graph keeps them as static buffers."""

    token_index: torch.Tensor  # [B] rows of the step's token batch
    block_tables: torch.Tensor  # [B, W] int32 physical block of each logical block (-1: released)
    kv_start: torch.Tensor  # [B] int32 first visible key position
    kv_len: torch.Tensor  # [B] int32 number of visible keys (>= 1)
    max_len: int  # an upper bound on kv_len, known on the host (sizes the torch path's batch)

    def key_slots(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, max_len] cache slot of each visible key, padded; [B, max_len] bool, True
        where the slot is a real visible key). Built on the device, without a sync."""
        j = torch.arange(self.max_len, device=self.kv_len.device)
        start, length = self.kv_start.long()[:, None], self.kv_len.long()[:, None]
        mask = j[None, :] < length
        kpos = torch.where(mask, start + j[None, :], start)  # padding repeats a visible key
        blocks = self.block_tables.long().gather(1, kpos // block_size)
        return blocks * block_size + kpos % block_size, mask


@dataclass
class PrefillSegment:
    """Queries [start, end) of the step's batch (n of them, consecutive positions of one
    request) and the L >= n keys they see: the last n keys are the queries' own, and
    query j sees keys up to L - n + j ("lower-right" causal; square causal when n == L).
    A request's new tokens are cut at local-chunk boundaries so every piece has this
    shape, which flash attention runs without a mask."""

    start: int
    end: int
    kv_start: int  # positions of the visible keys: [kv_start, kv_end)
    kv_end: int
    block_table: torch.Tensor  # [W] int32 on the device: the request's row of PrefillBatch.block_tables
    block_size: int

    @functools.cached_property
    def kv_slots(self) -> torch.Tensor:
        """[L] cache slots of the visible keys, in position order, built on the device when
        first asked for (the torch path gathers K/V by them; the Triton kernel reads the
        block table and never asks)."""
        kpos = torch.arange(self.kv_start, self.kv_end, device=self.block_table.device)
        return self.block_table.long()[kpos // self.block_size] * self.block_size + kpos % self.block_size


@dataclass
class PrefillBatch:
    """The step's prefill segments (the PrefillSegments, in order) as the paged prefill
    kernel takes them (tandem_kernels/prefill_attention.py): segment s owns q rows
    cu_seqlens_q[s]:cu_seqlens_q[s + 1] of q[rows] and sees the key positions
    [kv_start[s], kv_start[s] + kv_len[s]) through its block table, its queries being
    the last of them. Index tensors on the device, int32."""

    rows: slice | torch.Tensor  # the segments' rows of the step's batch: a slice when they are back to back
    block_tables: torch.Tensor  # [S, W] physical block of each logical block (-1: released)
    cu_seqlens_q: torch.Tensor  # [S + 1]
    kv_start: torch.Tensor  # [S]
    kv_len: torch.Tensor  # [S]
    num_tokens: int  # T, the rows in all
    plan: Any = None  # the kernel's tile plan, built by the first layer that runs the kernel, shared by the rest


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot where each new token's K/V is written
    decode: DecodeBatch | None
    prefills: list[PrefillSegment]
    # An fp8 (float8_e4m3fn) cache's [2] fp32 (K scale, V scale) on the device, read by the
    # kernels there (no host sync; a CUDA graph keeps it as a static tensor): attention()
    # reads decode rows and prefill segments with it, and the models pass it to write_kv.
    # One pair for every layer the metadata serves. None: the cache holds the model's dtype.
    kv_scale: torch.Tensor | None = None
    prefill_batch: PrefillBatch | None = None  # the prefills again, for the Triton kernel (None: no prefill)


@dataclass(frozen=True)
class SeqSpan:
    """One request's part of the step, as attention sees it."""

    batch_start: int  # first row in the step's token batch
    q_start: int  # absolute position of the first new token
    num_tokens: int
    block_table: tuple[int | None, ...]  # None: a block released from the local window


@dataclass
class HostTables:
    """The per-request numbers of a step, on the CPU, that build_metadata starts from.
    (The CUDA graph runner's `_fill` computes the same numbers for its all-decode steps
    in plain Python: torch CPU ops cost it more than the step's GPU work at batch 1.)"""

    table: torch.Tensor  # [B, W] int64 block tables, -1 where released (or past the end)
    q_start: torch.Tensor  # [B] position of each request's first new token
    num_tokens: torch.Tensor  # [B]
    kv_first: torch.Tensor  # [B] first key position a request reads (its chunk start, or 0)
    slot_mapping: torch.Tensor  # [T] cache slot where each new token's K/V is written


def host_tables(spans: list[SeqSpan], block_size: int, chunk: int | None) -> HostTables:
    """chunk: the local attention chunk size, or None for global layers. Reading a
    released block is caught here, on block indices, before anything runs."""
    width = max(len(s.block_table) for s in spans)
    # A released (None) block becomes -1 so any read of it is caught below.
    table = torch.tensor([[-1 if b is None else b for b in s.block_table] + [-1] * (width - len(s.block_table))
                          for s in spans], dtype=torch.long)  # [B, W]
    q_start = torch.tensor([s.q_start for s in spans], dtype=torch.long)
    n_tok = torch.tensor([s.num_tokens for s in spans], dtype=torch.long)
    # Keys a request reads start at its chunk start (local group) or 0, and end at its last new token.
    kv_first = (q_start // chunk) * chunk if chunk is not None else torch.zeros_like(q_start)
    q_end = q_start + n_tok
    cols = torch.arange(width)
    needed = (cols[None, :] >= (kv_first // block_size)[:, None]) & (cols[None, :] <= ((q_end - 1) // block_size)[:, None])
    if bool((table[needed] < 0).any()):
        raise RuntimeError("attention touches a released block")
    req = torch.repeat_interleave(torch.arange(len(spans)), n_tok)  # [T] request of each token
    first = torch.cumsum(n_tok, 0) - n_tok
    pos = q_start[req] + torch.arange(len(req)) - first[req]
    slot_mapping = table[req, pos // block_size] * block_size + pos % block_size
    return HostTables(table, q_start, n_tok, kv_first, slot_mapping)


def build_metadata(
    spans: list[SeqSpan], block_size: int, chunk: int | None, device: torch.device,
    kv_scale: torch.Tensor | None = None,
) -> AttentionMetadata:
    """chunk: the local attention chunk size, or None for global layers. kv_scale: an fp8
    cache's scales, carried as AttentionMetadata.kv_scale.

    Per-request numbers (positions, lengths) are worked out on the CPU; the index tensors
    that grow with the context ([n, L] for a prefill piece, [B, L] for the torch decode
    path) are built on `device` from the small block table, so a long-context step neither
    runs megabyte-sized CPU ops nor copies them to the GPU (measured: ~30 ms a step at
    16 x 8k before)."""
    h = host_tables(spans, block_size, chunk)

    decode = None
    dec = [i for i, s in enumerate(spans) if s.num_tokens == 1]
    if dec:
        d = torch.tensor(dec)
        kv_start, length = h.kv_first[d], h.q_start[d] + 1 - h.kv_first[d]
        rows = torch.tensor([spans[i].batch_start for i in dec])
        decode = DecodeBatch(rows.to(device), h.table[d].to(torch.int32).to(device), kv_start.to(torch.int32).to(device),
                             length.to(torch.int32).to(device), int(length.max()))

    pieces = []  # (request, first row, rows, kv_start, kv_len) of each prefill segment
    for i, sp in enumerate(spans):
        if sp.num_tokens == 1:
            continue
        lo, hi = sp.q_start, sp.q_start + sp.num_tokens
        cuts = [lo, *(range((lo // chunk + 1) * chunk, hi, chunk) if chunk is not None else ()), hi]
        for a, b in zip(cuts, cuts[1:]):  # each piece lies in one local chunk
            kv_start = (a // chunk) * chunk if chunk is not None else 0
            pieces.append((i, sp.batch_start + a - lo, b - a, kv_start, b - kv_start))
    pb = _prefill_batch(pieces, h.table, device) if pieces else None
    prefills = [PrefillSegment(row, row + n, kv_start, kv_start + kv_len, pb.block_tables[j], block_size)
                for j, (_, row, n, kv_start, kv_len) in enumerate(pieces)]
    return AttentionMetadata(h.slot_mapping.to(device), decode, prefills, kv_scale, pb)


def _prefill_batch(pieces: list[tuple[int, int, int, int, int]], table: torch.Tensor,
                   device: torch.device) -> PrefillBatch:
    """The pieces (request, first row, rows, kv_start, kv_len) as one PrefillBatch: host
    numbers, then one copy of each index tensor."""
    req, rows0, n, kv_start, kv_len = (list(x) for x in zip(*pieces))
    cu = [0]
    for k in n:
        cu.append(cu[-1] + k)
    back_to_back = all(rows0[j + 1] == rows0[j] + n[j] for j in range(len(n) - 1))
    rows = (slice(rows0[0], rows0[0] + cu[-1]) if back_to_back else
            torch.cat([torch.arange(r, r + k) for r, k in zip(rows0, n)]).to(device))
    i32 = dict(dtype=torch.int32)
    return PrefillBatch(rows, table[req].to(**i32).to(device), torch.tensor(cu, **i32).to(device),
                        torch.tensor(kv_start, **i32).to(device), torch.tensor(kv_len, **i32).to(device), cu[-1])
