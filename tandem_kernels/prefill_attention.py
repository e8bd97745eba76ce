"""Paged prefill attention: the step's new tokens of every prefill segment attend to
their visible keys, read straight from the paged KV cache through the block table.

Segment s owns query rows cu_seqlens_q[s] : cu_seqlens_q[s + 1] (n of them) and sees
the keys at absolute positions [kv_start, kv_start + kv_len). Its queries are the last
n of those keys, so query j sees keys kv_start .. kv_start + kv_len - n + j
("lower-right" causal; square causal when n == kv_len). kv_start is 0 for global
layers and the chunk start for chunked-local ones, whose earlier block-table entries
may be released (-1): they are never read. kv_len > n is a chunk after a cached prefix.

Layout: q, out [T, H, D]; k_cache, v_cache [num_blocks, block_size, KVH, D]; key
position p of segment s lives at block block_tables[s, p // block_size], row
p % block_size. Query head h reads KV head h // (H / KVH) (GQA).

Program decomposition (FlashAttention-2): one program per (query tile, query head),
heads fastest so the G heads sharing a KV head run together and share its tiles in L2.
A plan (prefill_plan: ~35 small torch ops on the device, no host sync) cuts each
segment into tiles of BLOCK_M queries, heaviest first for load balance, and gives each
tile a record (segment, tile, first row, queries, kv_start, prefix) that its program
reads with independent loads. One plan serves every layer of a step that shares the
segments, so the engine can build it once a step. The grid is sized from shapes alone
(T / BLOCK_M + S tiles at most); spare programs return at once. A program walks the
key tiles of BLOCK_N absolute positions its queries can see, in three runs:
    head  [kv_start // BN, ceil(kv_start / BN))  0 or 1 tile straddling kv_start: masked
    full  up to the first key tile that any query's causal limit cuts:          no mask
    diag  the rest up to the last query's own key:                             masked
keeping an online softmax (fp32, exp2 with log2(e) folded into the scale). Key tiles
past the causal limit are never loaded. Each key tile's block-table entries (one per
key; a tile may span several cache blocks or part of one) are loaded a tile ahead.

Variants (PrefillConfig's switches, timed against each other by the benchmark's
--sweep; each does the same arithmetic, and the sweep checks the bits): ids_per_block
loads one table entry per cache block a key tile touches (BLOCK_N / block_size of
them, or 1) instead of one per key, which cuts the address work of the steady-state
loop (SASS: 392 against 444 instructions a key tile at Scout's shapes); lean_runs skips
empty runs (the head run is empty unless kv_start is unaligned) and loads each run's
first entries alongside q's load, not on the way to the run's first K/V copies; order
"group" launches the G heads of one KV head tile by tile (its K/V stay hot in L2), and
"tiles" one head's query tiles after another, instead of the H heads of a tile together.

Bound: FLOPs. 4 * H * D per visible (query, key) pair (QK^T and PV), about half of
n * kv_len for a square causal segment; K/V bytes are read once per query tile and
query head (L2 absorbs the G-fold reuse), small beside the FLOPs at D = 128: 8k causal
at Scout's heads is 0.69 TFLOP over 34 MB of K/V (2 * 8192 * 8 * 128 * 2 B).
Compared with SDPA flash on contiguous K/V in bench/kernels_prefill_attention.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class PrefillConfig(NamedTuple):
    block_m: int  # queries per tile
    block_n: int  # keys per tile (a power of two, like block_size: one divides the other)
    num_warps: int
    num_stages: int
    # Variants of the same kernel, for bench/kernels_prefill_attention.py --sweep; False is
    # the kernel as first measured. Results are identical either way (same dot order).
    ids_per_block: bool = False  # read one block-table entry per cache block a key tile touches, not one per key
    lean_runs: bool = False  # skip empty key-tile runs; load each run's first table entries before q
    # Launch order: "heads", the H heads of a query tile, then the next tile; "group", the G
    # heads of a KV head tile by tile, then the next KV head; "tiles", one head's tiles.
    order: str = "heads"


def default_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> PrefillConfig:
    """Fixed heuristics (no runtime autotuning, so results never depend on timing noise),
    checked by compiling for sm_90 with Triton 3.6 (shared memory, registers, spills).
    bf16/fp16 at D <= 128: 128 x 64 tiles, two warpgroups of 64 query rows, 4 stages (Q
    32 KiB + 4 x 32 KiB of K/V), one table entry per cache block and lean runs: the
    fastest row of `bench/kernels_prefill_attention.py --sweep` on an H100 at 8k causal,
    2k after 6k and 32k chunked-local alike (8k: 1.50 ms of GPU time against 1.69 ms for
    the first kernel, 3 stages and an entry per key; SDPA flash 2.08 ms). fp32 (parity
    runs, 3xTF32 dots) needs smaller tiles: 64 x 32 still spills a little (192 B of stack)."""
    if device.type == "cpu":  # the interpreter: larger tiles mean fewer Python-level steps
        return PrefillConfig(32, 32, 1, 1)
    if dtype == torch.float32:
        return PrefillConfig(64, 32, 4, 2) if head_dim <= 128 else PrefillConfig(32, 16, 4, 2)
    if head_dim <= 128:
        return PrefillConfig(128, 64, 8, 4, ids_per_block=True, lean_runs=True)
    return PrefillConfig(64, 32, 8, 2)


@triton.jit
def _table_ids(table_row, tile, kv_start, span, BLOCK_N: tl.constexpr, BS: tl.constexpr, PER_BLOCK: tl.constexpr):
    """Block-table entries of key tile `tile` (absolute positions tile * BLOCK_N + [0, BLOCK_N)):
    PER_BLOCK, one per cache block the tile touches ([max(BLOCK_N // BS, 1)]); else one per
    key ([BLOCK_N]). Entries of keys (blocks) outside kv_start + [0, span) read as 0: they
    may be released or past the table, and those keys are never used."""
    # Unsigned differences: indices before the first wrap to huge and fail `<`, one
    # comparison for both ends (Triton 3.9's interpreter turns `a & b` of masks into int32,
    # which loads reject).
    if PER_BLOCK:
        IDS: tl.constexpr = BLOCK_N // BS if BLOCK_N > BS else 1
        col = tile * BLOCK_N // BS + tl.arange(0, IDS)
        first = kv_start // BS
        ok = (col - first).to(tl.uint32) < ((kv_start + span - 1) // BS - first + 1).to(tl.uint32)
    else:  # (a mask per key, not per column: 21 fewer registers at Scout's shapes, sm_90)
        pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col = pos // BS
        ok = (pos - kv_start).to(tl.uint32) < span
    return tl.load(table_row + col, mask=ok, other=0)


@triton.jit
def _key_rows(ids, tile, stride_b, stride_t, BLOCK_N: tl.constexpr, BS: tl.constexpr, PER_BLOCK: tl.constexpr,
              ROW_ALIGN: tl.constexpr):
    """[BLOCK_N] element offsets, in a cache of block stride stride_b and row stride
    stride_t, of the keys of `tile`, given its table entries `ids` (_table_ids)."""
    phys = ids.to(tl.int64)
    if PER_BLOCK:  # [ids, keys of the tile in each block] flattened: consecutive keys
        KEYS: tl.constexpr = BS if BLOCK_N > BS else BLOCK_N
        within = (tile * BLOCK_N) % BS + tl.arange(0, KEYS)
        rows = tl.reshape(phys[:, None] * stride_b + within[None, :] * stride_t, [BLOCK_N])
        # The compiler loses the offsets' divisibility through the reshape; without it
        # the K/V copies are neither vectorised nor pipelined (sm_90, Triton 3.6).
        rows = tl.multiple_of(rows, ROW_ALIGN)
    else:
        rows = phys * stride_b + ((tile * BLOCK_N + tl.arange(0, BLOCK_N)) % BS) * stride_t
    return rows


@triton.jit
def _attend_tile(acc, l_i, m_i, q, q_last, ids, k_base, v_base, tile, kv_start, span, qk_scale,
                 stride_kb, stride_kt, stride_vb, stride_vt,
                 BLOCK_N: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, PER_BLOCK: tl.constexpr,
                 ROW_ALIGN: tl.constexpr, MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Fold key tile `tile`, whose table entries are `ids`, into the online softmax state
    (acc, l_i, m_i) of the query rows. Keys are indexed from kv_start; q_last [BLOCK_M]
    (uint32) is the last key index each row sees, span the number of keys the tile's rows
    see together.
    MASK: a boundary tile; each row keeps only key indices 0 .. q_last, and keys outside
    [0, span) are not read at all. Without MASK every key is read and seen by every row."""
    key = (tile * BLOCK_N + tl.arange(0, BLOCK_N) - kv_start).to(tl.uint32)  # those before kv_start wrap to huge
    d = tl.arange(0, D)
    k_rows = _key_rows(ids, tile, stride_kb, stride_kt, BLOCK_N, BS, PER_BLOCK, ROW_ALIGN)  # [BLOCK_N]
    v_rows = _key_rows(ids, tile, stride_vb, stride_vt, BLOCK_N, BS, PER_BLOCK, ROW_ALIGN)
    k_ptrs = k_base + k_rows[:, None] + d[None, :]
    v_ptrs = v_base + v_rows[:, None] + d[None, :]
    if MASK:
        key_ok = key < span
        k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N] fp32, unscaled
    if MASK:
        s = tl.where(key[None, :] <= q_last[:, None], s, float("-inf"))
    # Scores stay unscaled; qk_scale = scale * log2(e) turns them into base-2 logits.
    # Every row sees kv_start in the first tile it processes, so m_new is finite there.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASK:
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attend_run(acc, l_i, m_i, q, q_last, k_base, v_base, table_row, lo, hi, count, ids, kv_start, span, qk_scale,
                stride_kb, stride_kt, stride_vb, stride_vt,
                BLOCK_N: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, PER_BLOCK: tl.constexpr,
                ROW_ALIGN: tl.constexpr, MASK: tl.constexpr, LEAN: tl.constexpr, INTERP: tl.constexpr,
                PRECISION: tl.constexpr):
    """Fold key tiles lo .. hi - 1 into the state. count is hi - lo on the GPU; in the
    interpreter it is a constexpr bound (program ids and loaded scalars are 1-element
    arrays there, which cannot bound a loop) and tiles from hi on change nothing.
    ids: tile lo's table entries, loaded early by the caller (LEAN), else None.
    LEAN: an empty run is skipped, table loads and pipeline fill and drain included."""
    # The table entries of each tile are loaded one iteration ahead: when the K/V
    # addresses hang on a load in the same iteration, Triton's pipeliner does not
    # prefetch K/V at all (async_wait 0 in the compiled loop; checked for sm_90, 3.6).
    if ids is None:
        ids = _table_ids(table_row, lo, kv_start, span, BLOCK_N, BS, PER_BLOCK)
    if (not LEAN) or count > 0:
        for i in range(0, count):
            tile = lo + i
            nxt = _table_ids(table_row, tile + 1, kv_start, span, BLOCK_N, BS, PER_BLOCK)
            if INTERP:  # tiles from hi on read only real memory (block 0 past the span); drop them
                acc_t, l_t, m_t = _attend_tile(acc, l_i, m_i, q, q_last, ids, k_base, v_base, tile, kv_start, span,
                                               qk_scale, stride_kb, stride_kt, stride_vb, stride_vt,
                                               BLOCK_N, D, BS, PER_BLOCK, ROW_ALIGN, MASK, True, PRECISION)
                live = tile < hi
                acc, l_i, m_i = tl.where(live, acc_t, acc), tl.where(live, l_t, l_i), tl.where(live, m_t, m_i)
            else:
                acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, q_last, ids, k_base, v_base, tile, kv_start, span,
                                             qk_scale, stride_kb, stride_kt, stride_vb, stride_vt,
                                             BLOCK_N, D, BS, PER_BLOCK, ROW_ALIGN, MASK, False, PRECISION)
            ids = nxt
    return acc, l_i, m_i


# The step's tile and segment counts vary step to step: not specialised on (== 1, % 16), so
# they never cost a recompile.
@triton.jit(do_not_specialize=["num_segments", "num_tiles"])
def _prefill_kernel(
    q_ptr,  # [T, H, D]
    k_ptr,  # [num_blocks, block_size, KVH, D]
    v_ptr,  # [num_blocks, block_size, KVH, D]
    out_ptr,  # [T, H, D]
    table_ptr,  # [S, W] int32 physical block of each logical block (-1: released)
    plan_ptr,  # [6, num_tiles] int32 per query tile, launch order (PrefillPlan.tiles)
    num_segments,
    num_tiles,
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_tb,
    H: tl.constexpr,  # query heads
    G: tl.constexpr,  # query heads per KV head
    D: tl.constexpr,
    BS: tl.constexpr,  # cache block size
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PER_BLOCK: tl.constexpr,  # PrefillConfig.ids_per_block
    ROW_ALIGN: tl.constexpr,  # what every cache block and row stride is a multiple of (at most 16)
    LEAN_RUNS: tl.constexpr,  # PrefillConfig.lean_runs
    ORDER: tl.constexpr,  # PrefillConfig.order
    PRECISION: tl.constexpr,  # tl.dot on fp32: "tf32x3" (fp32-accurate, on tensor cores); unused for 16-bit
    INTERP: tl.constexpr,  # CPU interpreter: fp32 dot operands (its bf16 dot is wrong), fixed trip counts
    INTERP_HEAD: tl.constexpr,  # interpreter only: the most tiles any program has in each run
    INTERP_FULL: tl.constexpr,  # (0 on GPU: no recompiles)
    INTERP_DIAG: tl.constexpr,
):
    pid = tl.program_id(0)  # tiles come heaviest first in every order
    if ORDER == "tiles":
        tile_id = pid % num_tiles
        h = pid // num_tiles
    elif ORDER == "group":
        tile_id = pid % (num_tiles * G) // G
        h = pid // (num_tiles * G) * G + pid % G
    else:  # "heads"
        tile_id = pid // H
        h = pid % H
    # The tile's record: six independent loads, no chain through the segment's metadata.
    seg = tl.load(plan_ptr + tile_id)
    qt = tl.load(plan_ptr + num_tiles + tile_id)
    row0 = tl.load(plan_ptr + 2 * num_tiles + tile_id)
    n = tl.load(plan_ptr + 3 * num_tiles + tile_id)
    kv_start = tl.load(plan_ptr + 4 * num_tiles + tile_id)
    prefix = tl.load(plan_ptr + 5 * num_tiles + tile_id)  # keys before the segment's first query
    if seg >= num_segments:  # the grid is sized for the most tiles the shapes allow
        return

    # Keys are indexed from kv_start; query row r sees key indices 0 .. prefix + r.
    rows = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    q_last = (prefix + rows).to(tl.uint32)  # rows past n see more, harmlessly: never stored
    seen = prefix + tl.minimum(qt * BLOCK_M + BLOCK_M, n)  # keys the tile's rows see together
    span = seen.to(tl.uint32)
    # The three runs of key tiles (module docstring), in absolute tile indices.
    head_lo = kv_start // BLOCK_N
    full_lo = (kv_start + BLOCK_N - 1) // BLOCK_N
    full_hi = tl.maximum(full_lo, (kv_start + prefix + qt * BLOCK_M + 1) // BLOCK_N)  # the first row's keys
    diag_hi = (kv_start + seen + BLOCK_N - 1) // BLOCK_N
    table_row = table_ptr + seg.to(tl.int64) * stride_tb
    if LEAN_RUNS:  # in flight together with q's load, not each on the way to its run's first K/V copies
        ids_head = _table_ids(table_row, head_lo, kv_start, span, BLOCK_N, BS, PER_BLOCK)
        ids_full = _table_ids(table_row, full_lo, kv_start, span, BLOCK_N, BS, PER_BLOCK)
        ids_diag = _table_ids(table_row, full_hi, kv_start, span, BLOCK_N, BS, PER_BLOCK)
    else:  # each run loads its own
        ids_head = None
        ids_full = None
        ids_diag = None

    d = tl.arange(0, D)
    q_rows = (row0 + rows).to(tl.int64) * stride_qt + h * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    if INTERP:
        q = q.to(tl.float32)

    kvh = h // G
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # The interpreter walks constexpr counts (see _attend_run); they stay inline because
    # it turns every assignment into a tensor.
    acc, l_i, m_i = _attend_run(acc, l_i, m_i, q, q_last, k_base, v_base, table_row, head_lo, full_lo,
                                INTERP_HEAD if INTERP else full_lo - head_lo, ids_head, kv_start, span, qk_scale,
                                stride_kb, stride_kt, stride_vb, stride_vt,
                                BLOCK_N, D, BS, PER_BLOCK, ROW_ALIGN, True, LEAN_RUNS, INTERP, PRECISION)
    acc, l_i, m_i = _attend_run(acc, l_i, m_i, q, q_last, k_base, v_base, table_row, full_lo, full_hi,
                                INTERP_FULL if INTERP else full_hi - full_lo, ids_full, kv_start, span, qk_scale,
                                stride_kb, stride_kt, stride_vb, stride_vt,
                                BLOCK_N, D, BS, PER_BLOCK, ROW_ALIGN, False, LEAN_RUNS, INTERP, PRECISION)
    acc, l_i, m_i = _attend_run(acc, l_i, m_i, q, q_last, k_base, v_base, table_row, full_hi, diag_hi,
                                INTERP_DIAG if INTERP else diag_hi - full_hi, ids_diag, kv_start, span, qk_scale,
                                stride_kb, stride_kt, stride_vb, stride_vt,
                                BLOCK_N, D, BS, PER_BLOCK, ROW_ALIGN, True, LEAN_RUNS, INTERP, PRECISION)

    out = acc / l_i[:, None]
    o_rows = (row0 + rows).to(tl.int64) * stride_ot + h * stride_oh
    tl.store(out_ptr + o_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


class PrefillPlan(NamedTuple):
    """The query tiles of one step's segments in launch order, heaviest first: all a call
    needs from cu_seqlens_q, kv_start and kv_len besides the tables. Every layer of a step
    whose calls share those tensors (and the config) can share one plan: build it once
    with `prefill_plan` and pass it to each call. A call without one builds its own, ~35
    small torch ops of host time (no sync)."""
    config: PrefillConfig
    num_tokens: int  # T, the rows of q
    num_segments: int  # S
    # [6, ceil(T / block_m) + S] int32, a column per tile: segment (S: no tile, a spare
    # entry; spare entries come last), query tile within it, the segment's first query
    # row, its queries n, its kv_start, and its keys before the first query (kv_len - n).
    tiles: torch.Tensor


def prefill_plan(cu_seqlens_q: torch.Tensor, kv_start: torch.Tensor, kv_len: torch.Tensor, num_tokens: int,
                 config: PrefillConfig) -> PrefillPlan:
    """Cut every segment into query tiles of config.block_m, on the index tensors' device
    without a host sync, heaviest first (most key tiles of config.block_n) for load
    balance. A segment of n queries has ceil(n / block_m) tiles, so S segments have fewer
    than T / block_m + S: the plan, and the grid, are sized from shapes alone.
    Arguments as for prefill_attention (num_tokens: q's T); their values are not checked
    here (prefill_attention(validate=True) checks them)."""
    if kv_start.dim() != 1:
        raise ValueError(f"kv_start: [S] expected, got {tuple(kv_start.shape)}")
    s = kv_start.shape[0]
    for name, x, shape in (("cu_seqlens_q", cu_seqlens_q, (s + 1,)), ("kv_start", kv_start, (s,)),
                           ("kv_len", kv_len, (s,))):
        if x.dtype != torch.int32 or x.shape != shape or x.device != kv_start.device:
            raise ValueError(f"{name}: int32 {list(shape)} on {kv_start.device} expected (S = {s}), "
                             f"got {x.dtype} {tuple(x.shape)} on {x.device}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens: must be >= 0, got {num_tokens}")
    _check_config(config)
    bm, bn = config.block_m, config.block_n
    max_tiles = triton.cdiv(num_tokens, bm) + s
    if s == 0:
        return PrefillPlan(config, num_tokens, s, torch.zeros(6, max_tiles, dtype=torch.int32, device=kv_start.device))
    cu = cu_seqlens_q.long()
    n = cu.diff()
    per_seg = (n + bm - 1) // bm
    ends = per_seg.cumsum(0)
    j = torch.arange(max_tiles, device=cu.device)
    seg = torch.searchsorted(ends, j, right=True)  # S past the last real tile
    fields = torch.stack([cu[:-1], n, kv_start.long(), kv_len.long(), ends - per_seg])  # [5, S]
    row0, n, start, length, first_tile = fields[:, seg.clamp(max=s - 1)]
    real = seg < s
    qt, prefix = j - first_tile, length - n
    seen = prefix + torch.minimum((qt + 1) * bm, n)
    key_tiles = (start + seen + bn - 1) // bn - start // bn  # as the kernel walks them
    order = torch.argsort(torch.where(real, key_tiles, -1), descending=True, stable=True)
    tiles = torch.stack([seg, qt, row0, n * real, start, prefix])[:, order].to(torch.int32)
    return PrefillPlan(config, num_tokens, s, tiles)


def _check_config(config: PrefillConfig) -> None:
    for name, v in (("block_m", config.block_m), ("block_n", config.block_n)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"config.{name}: must be a power of two >= 16, got {v}")
    if config.order not in ("heads", "group", "tiles"):
        raise ValueError(f"config.order: must be 'heads', 'group' or 'tiles', got {config.order!r}")


def _key_tile_runs(plan: PrefillPlan) -> torch.Tensor:
    """[3, tiles] key tiles in each plan tile's head, full and diag runs (0 for spare
    entries): the kernel's run bounds in torch, for the interpreter's loop counts and the
    tests."""
    seg, qt, _, n, start, prefix = plan.tiles.long()
    bm, bn = plan.config.block_m, plan.config.block_n
    seen = prefix + torch.minimum((qt + 1) * bm, n)
    head_lo = start // bn
    full_lo = (start + bn - 1) // bn
    full_hi = torch.maximum(full_lo, (start + prefix + qt * bm + 1) // bn)
    diag_hi = (start + seen + bn - 1) // bn
    return torch.stack([full_lo - head_lo, full_hi - full_lo, diag_hi - full_hi]) * (seg < plan.num_segments)


def _check_values(t: int, num_blocks: int, bs: int, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  kv_start: torch.Tensor, kv_len: torch.Tensor) -> None:
    """The checks that read index values: one host sync for all of them."""
    s, width = block_tables.shape
    n = cu_seqlens_q[1:].long() - cu_seqlens_q[:-1].long()
    first, last = kv_start.long() // bs, (kv_start.long() + kv_len.long() - 1) // bs
    live = n > 0
    cols = torch.arange(width, device=block_tables.device)
    read = (cols[None, :] >= first[:, None]) & (cols[None, :] <= last[:, None]) & live[:, None]
    bad_entry = (read & ((block_tables < 0) | (block_tables >= num_blocks))).any()
    flags = torch.stack([
        (cu_seqlens_q[0] != 0) | (cu_seqlens_q[-1] != t) | (n < 0).any(),
        (kv_start < 0).any(), (n > kv_len).any(), (live & (last >= width)).any(), bad_entry,
    ]).tolist()
    problems = [
        f"cu_seqlens_q: must rise from 0 to T = {t}",
        "kv_start: must be >= 0",
        "kv_len: a segment has more queries than visible keys (n > kv_len)",
        f"block_tables: {width} columns do not reach kv_start + kv_len",
        "block_tables: a visible key lies in a released (-1) or out-of-range block",
    ]
    for flag, problem in zip(flags, problems):
        if flag:
            raise ValueError(problem)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, kv_start: torch.Tensor, kv_len: torch.Tensor, scale: float,
                      config: PrefillConfig | None = None, validate: bool = True,
                      plan: PrefillPlan | None = None) -> torch.Tensor:
    """q: [T, H, D], the new tokens of S prefill segments back to back; k_cache, v_cache:
    [num_blocks, block_size, KVH, D] (a layer's kv_cache[0] and [1], the new tokens' K/V
    already written); block_tables: [S, W] int32; cu_seqlens_q: [S + 1] int32 (segment s
    owns rows cu[s]:cu[s+1]); kv_start, kv_len: [S] int32 (segment s sees key positions
    [kv_start, kv_start + kv_len), its queries being the last of them). Returns [T, H, D]
    in q's dtype. config: tile sizes and variant, else default_config (tests and benchmarks
    pass one). plan: prefill_plan's tiles for these cu_seqlens_q, kv_start, kv_len (its
    config is used; pass it to every layer of a step rather than rebuilding it per call).

    validate=False skips the checks that read the index tensors' values (one host sync),
    for callers whose metadata is already checked (the engine's): then nothing here
    syncs with the device, and bad values are undefined behaviour."""
    if q.dim() != 3:
        raise ValueError(f"q: [T, H, D] expected, got {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache: [num_blocks, block_size, KVH, D] expected, got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: shape {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    t, h, d = q.shape
    num_blocks, bs, kvh, dk = k_cache.shape
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q: dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"k_cache, v_cache: dtype must match q's {q.dtype}, got {k_cache.dtype}, {v_cache.dtype}")
    if dk != d:
        raise ValueError(f"k_cache: head_dim {dk} differs from q's {d}")
    if kvh < 1 or h % kvh:
        raise ValueError(f"q: {h} heads is not a multiple of k_cache's {kvh} KV heads")
    if d < 16 or d & (d - 1):
        raise ValueError(f"q: head_dim must be a power of two >= 16, got {d}")
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"k_cache: block_size must be a power of two >= 16, got {bs}")
    if block_tables.dim() != 2:
        raise ValueError(f"block_tables: [S, W] expected, got {tuple(block_tables.shape)}")
    s = block_tables.shape[0]
    for name, x, shape in (("block_tables", block_tables, None), ("cu_seqlens_q", cu_seqlens_q, (s + 1,)),
                           ("kv_start", kv_start, (s,)), ("kv_len", kv_len, (s,))):
        if x.dtype != torch.int32:
            raise ValueError(f"{name}: must be int32, got {x.dtype}")
        if shape is not None and (x.shape != shape or not x.is_contiguous()):
            raise ValueError(f"{name}: contiguous {list(shape)} expected (S = {s} block-table rows), "
                             f"got {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name}: on {x.device}, q on {q.device}")
    if k_cache.device != q.device or v_cache.device != q.device:
        raise ValueError(f"k_cache, v_cache: on {k_cache.device}, {v_cache.device}, q on {q.device}")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name}: last dimension must be contiguous")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: must be a positive finite number, got {scale}")
    if plan is not None:
        if config is not None and config != plan.config:
            raise ValueError(f"config: {config} differs from the plan's {plan.config}")
        if (plan.num_tokens, plan.num_segments) != (t, s):
            raise ValueError(f"plan: built for T = {plan.num_tokens}, S = {plan.num_segments}; "
                             f"got T = {t}, S = {s}")
        if plan.tiles.device != q.device:
            raise ValueError(f"plan: on {plan.tiles.device}, q on {q.device}")
    cfg = plan.config if plan is not None else config or default_config(d, q.dtype, q.device)
    _check_config(cfg)
    if validate:
        _check_values(t, num_blocks, bs, block_tables, cu_seqlens_q, kv_start, kv_len)

    out = torch.empty(t, h, d, device=q.device, dtype=q.dtype)
    if t == 0 or s == 0:
        return out
    plan = plan or prefill_plan(cu_seqlens_q, kv_start, kv_len, t, cfg)
    max_tiles = plan.tiles.shape[1]
    interp = q.device.type == "cpu"
    counts = _key_tile_runs(plan).amax(1).tolist() if interp else [0, 0, 0]  # interpreter only: loop bounds
    _prefill_kernel[(max_tiles * h,)](
        q, k_cache, v_cache, out, block_tables, plan.tiles,
        s, max_tiles, scale * math.log2(math.e),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        H=h, G=h // kvh, D=d, BS=bs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        PER_BLOCK=cfg.ids_per_block, LEAN_RUNS=cfg.lean_runs, ORDER=cfg.order,
        ROW_ALIGN=math.gcd(16, k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1)),
        PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        INTERP=interp, INTERP_HEAD=counts[0], INTERP_FULL=counts[1], INTERP_DIAG=counts[2],
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def prefill_attention_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_start, kv_len,
                                scale) -> torch.Tensor:
    """Plain torch, one segment at a time, in fp32: gather the visible keys by position
    through the block table, then softmax under the lower-right causal mask."""
    t, h, d = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(t, h, d, dtype=torch.float32, device=q.device)
    for i in range(block_tables.shape[0]):
        a, b = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        start, length, n = int(kv_start[i]), int(kv_len[i]), b - a
        if n == 0:
            continue
        pos = torch.arange(start, start + length, device=q.device)
        blocks = block_tables[i, pos // bs].long()
        k = k_cache[blocks, pos % bs].float().repeat_interleave(h // kvh, dim=1).transpose(0, 1)  # [H, L, D]
        v = v_cache[blocks, pos % bs].float().repeat_interleave(h // kvh, dim=1).transpose(0, 1)
        scores = (q[a:b].float().transpose(0, 1) @ k.transpose(1, 2)) * scale  # [H, n, L]
        visible = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
        p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out[a:b] = (p @ v).transpose(0, 1)
    return out.to(q.dtype)
