"""Paged decode attention: one new query per sequence, keys and values read from the
paged KV cache through the sequence's block table.

Query b sees the keys at absolute positions [kv_start[b], kv_start[b] + kv_len[b]).
`kv_start` is what makes the same kernel serve both Llama 4 layer kinds: 0 for the
global layers, the start of the query's chunk for the chunked-local ones, whose
block-table entries before it may be released (-1): they are never read.

Layout: q, out [B, H, D]; k_cache, v_cache [num_blocks, block_size, KVH, D]; key
position p of sequence b lives at block block_tables[b, p // block_size], row
p % block_size. Query head h reads KV head h // (H / KVH) (GQA).

The caches hold q's dtype, or float8_e4m3fn with kv_scale, a [2] fp32 tensor (K scale,
V scale) per tensor, as tandem_kernels/kv_write.py writes them: x ~ cache.float() * scale. fp8
tiles are loaded as fp8 and converted to q's compute type (exact: every e4m3 value is a
bf16, fp16 and fp32 value). The kernel reads the scales from the tensor (no host sync:
CUDA-graph capturable) and applies each once per program, never per element: the K
scale joins the logit scale, q . (s_k k) = s_k (q . k); the V scale multiplies the
accumulated output, sum p (s_v v) = s_v sum p v, before it is normalised or written as
a partial. A constexpr switch (KV_FP8): caches of q's dtype compile to the same code.

Program decomposition (flash-decoding): one program per (KV head, sequence, split), KV
heads fastest so the programs reading one cache block's rows run together. The
G = H / KVH query heads sharing the KV head are the rows of one tile (padded to 16 for
tl.dot), so each key is read once per KV head. The sequence's key tiles (BLOCK_N
absolute positions each, spanning several cache blocks: one block-table entry per key)
are cut into NUM_SPLITS runs of whole tiles on the device, so nothing length-dependent
is baked into the launch and a CUDA graph replays it for any lengths. A split walks its
tiles in up to three runs with an online softmax (fp32, exp2 with log2(e) folded into
the scale):
    head  0 or 1 tile that kv_start cuts:            masked
    full  tiles wholly inside the visible keys:       no mask, K/V copies kept in flight
    tail  0 or 1 tile that the last key cuts:        masked
Each tile's block-table entries are loaded one tile ahead: when the K/V addresses hang
on a load in the same iteration, Triton's pipeliner does not prefetch K/V at all. With
one split the program writes the normalised output; with more it writes unnormalised
partials (acc, max, sum) and a second kernel merges them, one program per (b, head).

Bound: bytes. K and V of every visible key once per KV head (2 * KVH * D * elem B a key:
4 KiB at Scout's 8 KV heads of 128 in bf16, 2 KiB in fp8, which halves the bytes and so
the time at the same bandwidth), beside which q, the output and the partials are small;
FLOPs are 4 * H * D a key, 5 FLOP/byte at Scout's heads in bf16 and 10 in fp8 (20 and
40 on the padded 16-row tiles), far below an H100's ~240: the ceiling is the copy
bandwidth on those bytes (bench/kernels.py). The engine's `TritonOps` runs every decode
row of a CUDA step through it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_SPLITS = 64  # the merge kernel holds every split of a row in registers
FP8 = torch.float8_e4m3fn  # the quantised cache's dtype (tandem_kernels/kv_write.py writes it)


class DecodeConfig(NamedTuple):
    block_n: int  # keys per tile (a power of two; need not be a multiple of block_size)
    num_warps: int
    num_stages: int  # Triton's pipeline depth: num_stages - 1 tiles of K/V buffered, in flight


def default_config(dtype: torch.dtype, device: torch.device) -> DecodeConfig:
    """Fixed heuristics (no runtime autotuning), checked by compiling for sm_90 with Triton
    3.6 at Scout's shapes (tests/test_kernels.py). bf16/fp16: 32-key tiles, 4 warps, 4
    stages (53 KiB of shared memory, 112 registers, no spills, mma.sync dots; three tiles
    in flight per program, several programs per SM). Picked from a sweep on an H100
    (BENCHMARKS.md): 100% of copy bandwidth at 64 x 8k (64-key tiles with 3 stages: 78%),
    88% at 8 x 8k, 77% at 1 x 32k, each the best of the five configs timed. fp32 (parity
    runs, FMA dots): 32-key tiles need 8 warps (4 take 255 registers), 74 KiB, 63
    registers. An fp8 cache takes its queries' config, untimed so far (bench/kernels.py's
    fp8 sweep): with bf16 queries 29 KiB, 128 registers, no spills; K copied 16 bytes a
    thread but V 8 (Triton lays the V tile out like the bf16 tile it is converted to)."""
    if device.type == "cpu":  # the interpreter: fewer, larger steps; 32 keys still span blocks
        return DecodeConfig(32, 1, 1)
    if dtype == torch.float32:
        return DecodeConfig(32, 8, 3)
    return DecodeConfig(32, 4, 4)


@triton.jit
def _blocks_of(table_row, tile, start, length, BLOCK_N: tl.constexpr, BS: tl.constexpr):
    """[BLOCK_N] physical block of each key of `tile` (absolute positions tile * BLOCK_N +
    [0, BLOCK_N)); 0 for keys outside [start, start + length), whose entries may be
    released or past the table, and which are never read."""
    pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    # One unsigned comparison for start <= pos < start + length: keys before start wrap to
    # huge (Triton 3.9's interpreter turns `a & b` of masks into int32, which loads reject).
    ok = (pos - start).to(tl.uint32) < length.to(tl.uint32)
    return tl.load(table_row + pos // BS, mask=ok, other=0)


@triton.jit
def _attend_tile(acc, l_i, m_i, q, blocks, k_base, v_base, tile, start, length, qk_scale,
                 stride_kb, stride_kt, stride_vb, stride_vt,
                 BLOCK_N: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, MASK: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Fold key tile `tile`, whose keys lie in cache blocks `blocks`, into the online
    softmax state (acc, l_i, m_i) of the query rows. MASK: a boundary tile, whose keys
    outside [start, start + length) are neither read nor seen; without it every key is.
    K and V are converted to q's compute type: nothing to do for a cache of q's dtype on
    the GPU; exact from fp8 (every e4m3 value is a bf16, fp16 and fp32 value); fp32 in
    the interpreter, where q is upcast. An fp8 cache's scales are applied by the caller."""
    pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] absolute key positions
    d = tl.arange(0, D)
    phys = blocks.to(tl.int64)
    k_ptrs = k_base + (phys * stride_kb + (pos % BS) * stride_kt)[:, None] + d[None, :]  # [BLOCK_N, D]
    v_ptrs = v_base + (phys * stride_vb + (pos % BS) * stride_vt)[:, None] + d[None, :]
    if MASK:
        ok = (pos - start).to(tl.uint32) < length.to(tl.uint32)
        k = tl.load(k_ptrs, mask=ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    k = k.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_G, BLOCK_N] fp32, unscaled
    if MASK:
        s = tl.where(ok[None, :], s, float("-inf"))
    # Every tile a split walks holds a visible key, so m_new is finite from its first tile.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASK:
        v = tl.load(v_ptrs, mask=ok[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attend_run(acc, l_i, m_i, q, k_base, v_base, table_row, lo, hi, count, start, length, qk_scale,
                stride_kb, stride_kt, stride_vb, stride_vt,
                BLOCK_N: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, MASK: tl.constexpr,
                INTERP: tl.constexpr, PRECISION: tl.constexpr):
    """Fold key tiles lo .. hi - 1 into the state. count is hi - lo on the GPU; in the
    interpreter it is a constexpr bound (program ids and loaded scalars are 1-element
    arrays there, which cannot bound a loop) and tiles from hi on change nothing."""
    blocks = _blocks_of(table_row, lo, start, length, BLOCK_N, BS)
    for i in range(0, count):
        nxt = _blocks_of(table_row, lo + i + 1, start, length, BLOCK_N, BS)  # a tile ahead
        if INTERP:  # tiles from hi on read only real memory (block 0 outside the keys); drop them
            acc_t, l_t, m_t = _attend_tile(acc, l_i, m_i, q, blocks, k_base, v_base, lo + i, start, length,
                                           qk_scale, stride_kb, stride_kt, stride_vb, stride_vt,
                                           BLOCK_N, D, BS, MASK, PRECISION)
            live = lo + i < hi
            acc, l_i, m_i = tl.where(live, acc_t, acc), tl.where(live, l_t, l_i), tl.where(live, m_t, m_i)
        else:
            acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, blocks, k_base, v_base, lo + i, start, length,
                                         qk_scale, stride_kb, stride_kt, stride_vb, stride_vt,
                                         BLOCK_N, D, BS, MASK, PRECISION)
        blocks = nxt
    return acc, l_i, m_i


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [num_blocks, block_size, KVH, D]
    v_ptr,  # [num_blocks, block_size, KVH, D]
    table_ptr,  # [B, W] int32 physical block of each logical block (-1: released)
    start_ptr,  # [B] int32 first visible key position
    len_ptr,  # [B] int32 visible keys (>= 1)
    out_ptr,  # [B, H, D] q's dtype (NUM_SPLITS == 1)
    acc_ptr,  # [B, NUM_SPLITS, H, D] fp32 partial outputs, unnormalised (NUM_SPLITS > 1)
    m_ptr,  # [B, NUM_SPLITS, H] fp32 partial row maxima, base-2 logits
    l_ptr,  # [B, NUM_SPLITS, H] fp32 partial sums of exp2
    kv_scale_ptr,  # [2] fp32 (K, V) per-tensor scales of an fp8 cache: x = cache * scale (KV_FP8)
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_tb,
    H: tl.constexpr,  # query heads
    G: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # G padded for tl.dot (>= 16)
    D: tl.constexpr,
    BS: tl.constexpr,  # cache block size
    BLOCK_N: tl.constexpr,  # keys per tile
    NUM_SPLITS: tl.constexpr,
    KV_FP8: tl.constexpr,  # k/v caches are float8_e4m3fn, dequantised by kv_scale_ptr's scales
    PRECISION: tl.constexpr,  # tl.dot on fp32: "ieee" (exact parity); unused for 16-bit
    INTERP: tl.constexpr,  # CPU interpreter: fp32 dot operands (its bf16 dot is wrong), fixed trip counts
    INTERP_TILES: tl.constexpr,  # interpreter only: the most tiles in a split (0 on GPU: no recompiles)
):
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    start = tl.load(start_ptr + b)
    length = tl.load(len_ptr + b)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    heads = kvh * G + g
    gmask = g < G
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
    if INTERP:
        q = q.to(tl.float32)
    if KV_FP8:  # the logits are q . (k * k_scale): K's scale joins the softmax scale, once
        qk_scale = qk_scale * tl.load(kv_scale_ptr)

    # The sequence's tiles first .. last, cut into NUM_SPLITS runs of whole tiles.
    first = start // BLOCK_N
    last = (start + length - 1) // BLOCK_N  # inclusive
    per_split = (last - first + NUM_SPLITS) // NUM_SPLITS
    lo = first + split * per_split
    hi = tl.maximum(lo, tl.minimum(lo + per_split, last + 1))  # lo == hi: an empty split
    # The three runs (module docstring): tiles from full_lo on start at or after kv_start,
    # tiles before full_hi end at or before the last key.
    full_lo = (start + BLOCK_N - 1) // BLOCK_N
    full_hi = (start + length) // BLOCK_N
    head_hi = tl.minimum(tl.maximum(full_lo, lo), hi)
    tail_lo = tl.minimum(tl.maximum(full_hi, head_hi), hi)

    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    table_row = table_ptr + b.to(tl.int64) * stride_tb
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    acc, l_i, m_i = _attend_run(acc, l_i, m_i, q, k_base, v_base, table_row, lo, head_hi,
                                1 if INTERP else head_hi - lo, start, length, qk_scale,
                                stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_N, D, BS, True, INTERP, PRECISION)
    acc, l_i, m_i = _attend_run(acc, l_i, m_i, q, k_base, v_base, table_row, head_hi, tail_lo,
                                INTERP_TILES if INTERP else tail_lo - head_hi, start, length, qk_scale,
                                stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_N, D, BS, False, INTERP, PRECISION)
    acc, l_i, m_i = _attend_run(acc, l_i, m_i, q, k_base, v_base, table_row, tail_lo, hi,
                                1 if INTERP else hi - tail_lo, start, length, qk_scale,
                                stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_N, D, BS, True, INTERP, PRECISION)
    if KV_FP8:  # sum p (v * v_scale) = v_scale * sum p v: V's scale, once per output (or partial) row
        acc = acc * tl.load(kv_scale_ptr + 1)

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + (b * H + heads)[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=gmask[:, None])
    else:
        part = (b * NUM_SPLITS + split) * H + heads  # [BLOCK_G] rows of the partial tensors
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=gmask[:, None])
        tl.store(m_ptr + part, m_i, mask=gmask)
        tl.store(l_ptr + part, l_i, mask=gmask)


@triton.jit
def _merge_splits_kernel(
    acc_ptr,  # [B, NUM_SPLITS, H, D] fp32
    m_ptr,  # [B, NUM_SPLITS, H] fp32 (-inf: an empty split)
    l_ptr,  # [B, NUM_SPLITS, H] fp32
    out_ptr,  # [B, H, D]
    H: tl.constexpr,
    D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # NUM_SPLITS padded to a power of two
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    ok = s < NUM_SPLITS
    rows = (b * NUM_SPLITS + s) * H + h  # [BLOCK_S]
    m = tl.load(m_ptr + rows, mask=ok, other=float("-inf"))
    l = tl.load(l_ptr + rows, mask=ok, other=0.0)
    acc = tl.load(acc_ptr + rows[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    w = tl.math.exp2(m - tl.max(m, 0))  # some split saw a key, so the max is finite; empty ones weigh 0
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + (b * H + h) * D + d, out.to(out_ptr.dtype.element_ty))


def choose_num_splits(batch: int, kv_heads: int, max_blocks: int, num_sms: int) -> int:
    """Flash-decoding splits: fill the two program slots per SM in one wave (rounding
    down: a second, part-filled wave of equal programs would cost as much as the first),
    but no split shorter than 8 cache blocks (shorter runs cost more in partials and
    merging than they win), rounded down to a power of two: the split count is a
    compile-time constant, so this bounds the kernel's variants at seven instead of one
    new JIT compile each time a growing context moves the count."""
    n = max(1, min(2 * num_sms // max(1, batch * kv_heads), -(-max_blocks // 8), MAX_SPLITS))
    return 1 << (n.bit_length() - 1)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, kv_start: torch.Tensor, kv_len: torch.Tensor,
                           scale: float, kv_scale: torch.Tensor | None = None, num_splits: int = 1,
                           validate: bool = True, config: DecodeConfig | None = None) -> torch.Tensor:
    """q: [B, H, D]; k_cache, v_cache: [num_blocks, block_size, KVH, D] (a layer's
    kv_cache[0] and [1]); block_tables: [B, W] int32; kv_start, kv_len: [B] int32. Query b
    sees keys at positions [kv_start[b], kv_start[b] + kv_len[b]). Returns [B, H, D] in q's
    dtype. num_splits (1 .. 64) spreads one long sequence over more programs; config: tile
    sizes, else default_config (benchmarks pass others).

    The caches hold q's dtype, or float8_e4m3fn with kv_scale: a [2] fp32 tensor (K scale,
    V scale) on their device, as tandem_kernels/kv_write.py writes them (x = cache.float() *
    scale). The kernel reads the scales itself: no host sync, CUDA-graph capturable.

    validate=False skips the checks that read the index tensors' values (one
    device-to-host sync): the engine passes it for metadata it built itself, and a CUDA
    graph must, since a capture cannot sync. Then nothing here syncs on a GPU."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q: [B, H, D] and caches [blocks, block_size, KVH, D] expected, got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    b, h, d = q.shape
    num_blocks, bs, kvh, dk = k_cache.shape
    if dk != d or kvh < 1 or h % kvh:
        raise ValueError(f"q: {h} heads of {d} do not fit {kvh} KV heads of {dk}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q: dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache, v_cache: must share a dtype, got {k_cache.dtype} and {v_cache.dtype}")
    kv_fp8 = k_cache.dtype == FP8
    if not kv_fp8 and k_cache.dtype != q.dtype:
        raise ValueError(f"k_cache, v_cache: dtype must be q's ({q.dtype}) or {FP8}, got {k_cache.dtype}")
    if kv_fp8 and (kv_scale is None or kv_scale.shape != (2,) or kv_scale.dtype != torch.float32
                   or kv_scale.device != q.device or not kv_scale.is_contiguous()):
        got = None if kv_scale is None else f"{tuple(kv_scale.shape)} {kv_scale.dtype} on {kv_scale.device}"
        raise ValueError(f"kv_scale: an {FP8} cache needs a contiguous [2] float32 (K, V) scale tensor "
                         f"on {q.device}, got {got}")
    if not kv_fp8 and kv_scale is not None:
        raise ValueError(f"kv_scale: only for a {FP8} cache, these are {k_cache.dtype}")
    if block_tables.dtype != torch.int32 or kv_start.dtype != torch.int32 or kv_len.dtype != torch.int32:
        raise ValueError("block_tables, kv_start, kv_len: must be int32")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or kv_start.shape != (b,) or kv_len.shape != (b,):
        raise ValueError(f"block_tables / kv_start / kv_len: one row per query ({b}) expected")
    if not (kv_start.is_contiguous() and kv_len.is_contiguous()):
        raise ValueError("kv_start, kv_len: must be contiguous")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("kv_start", kv_start), ("kv_len", kv_len)):
        if x.device != q.device:
            raise ValueError(f"{name}: on {x.device}, q on {q.device}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("q, caches and block_tables: last dimension must be contiguous")
    if d < 16 or d & (d - 1) or bs < 16 or bs & (bs - 1):
        raise ValueError(f"head_dim ({d}) and block_size ({bs}) must be powers of two >= 16")
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits: must be in [1, {MAX_SPLITS}], got {num_splits}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: must be a positive finite number, got {scale}")
    cfg = config or default_config(q.dtype, q.device)
    if cfg.block_n < 16 or cfg.block_n & (cfg.block_n - 1):
        raise ValueError(f"config.block_n: must be a power of two >= 16, got {cfg.block_n}")
    if validate and b:
        _check_values(num_blocks, bs, block_tables, kv_start, kv_len)

    out = torch.empty(b, h, d, device=q.device, dtype=q.dtype)
    if b == 0:
        return out
    interp = q.device.type == "cpu"
    interp_tiles = 0
    if interp:  # the interpreter's loop needs a constant trip count
        first, last = kv_start // cfg.block_n, (kv_start + kv_len - 1) // cfg.block_n
        interp_tiles = int(((last - first + num_splits) // num_splits).max())
    parts = (torch.empty(b, num_splits, h, d, device=q.device, dtype=torch.float32),
             torch.empty(b, num_splits, h, device=q.device, dtype=torch.float32),
             torch.empty(b, num_splits, h, device=q.device, dtype=torch.float32)) if num_splits > 1 else (out,) * 3
    g = h // kvh
    _paged_decode_kernel[(kvh, b, num_splits)](
        q, k_cache, v_cache, block_tables, kv_start, kv_len, out, *parts,
        kv_scale if kv_fp8 else q, scale * math.log2(math.e),  # q: a placeholder pointer, never read
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        H=h, G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), D=d, BS=bs, BLOCK_N=cfg.block_n,
        NUM_SPLITS=num_splits, KV_FP8=kv_fp8, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INTERP=interp, INTERP_TILES=interp_tiles, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(b, h)](*parts, out, H=h, D=d, NUM_SPLITS=num_splits,
                                     BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4)
    return out


def _check_values(num_blocks: int, bs: int, block_tables: torch.Tensor, kv_start: torch.Tensor,
                  kv_len: torch.Tensor) -> None:
    """The checks that read index values: one host sync for all of them."""
    width = block_tables.shape[1]
    first, last = kv_start.long() // bs, (kv_start.long() + kv_len.long() - 1) // bs
    cols = torch.arange(width, device=block_tables.device)
    read = (cols[None, :] >= first[:, None]) & (cols[None, :] <= last[:, None])
    flags = torch.stack([
        (kv_len < 1).any() | (kv_start < 0).any(),
        (last >= width).any(),
        (read & ((block_tables < 0) | (block_tables >= num_blocks))).any(),
    ]).tolist()
    problems = [
        "kv_len: every query sees at least one key; kv_start: >= 0",
        "block_tables: too few columns for kv_start + kv_len",
        "block_tables: a visible key lies in a released (-1) or out-of-range block",
    ]
    for flag, problem in zip(flags, problems):
        if flag:
            raise ValueError(problem)


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, kv_start, kv_len, scale,
                                     kv_scale=None) -> torch.Tensor:
    """Plain torch, one sequence at a time, in fp32. kv_scale: an fp8 cache's (K, V)
    scales; the visible keys and values are dequantised (cache.float() * scale)."""
    b, h, d = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(b, h, d, dtype=torch.float32, device=q.device)
    # An fp8 cache is gathered as bytes: indexing need not support fp8 on every device.
    k_raw, v_raw = (c.view(torch.uint8) if c.dtype == FP8 else c for c in (k_cache, v_cache))
    for i in range(b):
        pos = torch.arange(int(kv_start[i]), int(kv_start[i] + kv_len[i]), device=q.device)
        blocks = block_tables[i, pos // bs].long()
        k = k_raw[blocks, pos % bs].view(k_cache.dtype).float()  # [L, KVH, D]
        v = v_raw[blocks, pos % bs].view(v_cache.dtype).float()
        if kv_scale is not None:
            k, v = k * kv_scale[0], v * kv_scale[1]
        k, v = (x.repeat_interleave(h // kvh, dim=1).transpose(0, 1) for x in (k, v))  # [H, L, D]
        p = torch.softmax((q[i].float()[:, None, :] @ k.transpose(1, 2))[:, 0] * scale, dim=-1)  # [H, L]
        out[i] = (p[:, None, :] @ v)[:, 0]
    return out.to(q.dtype)
