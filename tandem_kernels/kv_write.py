"""Write a step's new keys and values into the paged KV cache: one Triton launch for K and V.

    kv_cache[0].view(-1, KVH, D)[slots[t]] = k[t]
    kv_cache[1].view(-1, KVH, D)[slots[t]] = v[t]      for every t with 0 <= slots[t] < num_slots

Layout: kv_cache [2, num_blocks, block_size, KVH, D] with each of K and V contiguous over
its last four dims; a flat slot is block * block_size + offset, as in `TorchOps.write_kv`.
k, v [T, KVH, D], each token's [KVH, D] row contiguous (any token stride: views of a fused
projection work). slots [T] int64 (or int32). A negative slot skips its row: the padding
rows of a CUDA-graph batch use -1. Slots at or past num_slots are skipped too rather than
written out of bounds (no host check: that would sync). Two rows with one slot: either wins.

fp8 cache (optional): kv_cache of dtype float8_e4m3fn and `scale`, a [2] fp32 tensor
(K scale, V scale), per tensor. The cache holds e4m3(clamp(x / scale, +-448)), rounded to
nearest even, bit for bit as torch's `(x.float() / scale).clamp(-448, 448).to(e4m3fn)`; a
reader recovers x ~ cache.float() * scale. The kernel rounds to the e4m3 grid itself in fp32
(a correctly rounded x / scale, then the 1.5 * 2^23 trick), so the final cast is exact: the
same code is right on the GPU and in Triton's interpreter, whose own fp8 rounding is not.

Programs: one per BT tokens; a program moves its tokens' K rows then V rows, each a
[BT, KVH * D] tile (padded to a power of two, masked), BT filling it to ~4k elements:
Scout (8 KV heads of 128) moves 4 tokens a program.
Bytes: k and v read once, written once: 4 * T * KVH * D * elem (3 * T * KVH * D * 2 when
bf16 goes into an fp8 cache).
Memory-bound; the ceiling is the copy bandwidth (bench/kernels_small.py). No host
synchronisation: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 4096  # elements a program aims to hold per tensor
_FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0  # largest finite e4m3fn value


@triton.jit
def _round_to_e4m3(y):
    """fp32 y, |y| <= 448 -> the nearest e4m3fn value (ties to even), still in fp32."""
    bits = y.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127  # unbiased exponent of y
    exp = tl.maximum(exp, -6)  # below 2^-6 (subnormals) the grid step stays 2^-9
    step = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits: step = 2^(exp - 3)
    inv_step = ((127 - (exp - 3)) << 23).to(tl.float32, bitcast=True)
    q = y * inv_step  # exact (a power of two); |q| < 16
    q = (q + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 addition rounds q to an integer, ties to even
    # y's sign bit (0x80000000) on |result|, so what rounds to zero keeps it (-0.0, as torch);
    # Triton's unary minus is 0 - x, which makes +0.
    r = tl.abs(q * step).to(tl.int32, bitcast=True) | (bits & -2147483648)
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr,  # [T, KVH, D] (token rows of KVH * D contiguous elements)
    cache_ptr,  # [2, num_blocks * block_size, KVH * D]
    slots_ptr,  # [T] int64 or int32
    scale_ptr,  # [2] fp32 (K, V) when QUANT
    T,
    num_slots,
    stride_kt, stride_vt,
    stride_kv,  # kv_cache.stride(0)
    ROW: tl.constexpr,  # KVH * D
    ROW_P: tl.constexpr,  # next power of two >= ROW
    BT: tl.constexpr,  # tokens per program
    QUANT: tl.constexpr,  # fp8 cache
):
    t = tl.program_id(0) * BT + tl.arange(0, BT)  # [BT]
    j = tl.arange(0, ROW_P)  # [ROW_P]
    slot = tl.load(slots_ptr + t, mask=t < T, other=-1).to(tl.int64)
    # One unsigned comparison drops negative (skip) and out-of-range slots together. The
    # row mask `&` the column mask keeps 16-byte vector access under Triton 3.9 too.
    keep = slot.to(tl.uint64) < num_slots
    mask = keep[:, None] & (j < ROW)[None, :]  # [BT, ROW_P]
    tok = t.to(tl.int64)[:, None]
    dst = cache_ptr + slot[:, None] * ROW + j[None, :]
    k = tl.load(k_ptr + tok * stride_kt + j[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + tok * stride_vt + j[None, :], mask=mask, other=0.0)
    if QUANT:  # x / scale (correctly rounded, as torch divides), saturated to e4m3's +-448
        k = _round_to_e4m3(tl.clamp(tl.math.div_rn(k.to(tl.float32), tl.load(scale_ptr)), -448.0, 448.0))
        v = _round_to_e4m3(tl.clamp(tl.math.div_rn(v.to(tl.float32), tl.load(scale_ptr + 1)), -448.0, 448.0))
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def _check(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
           scale: torch.Tensor | None) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache: want [2, num_blocks, block_size, KVH, D], got {tuple(kv_cache.shape)}")
    _, nb, bs, kvh, d = kv_cache.shape
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 3 or x.shape[1:] != (kvh, d) or x.shape[0] != slots.shape[0]:
            raise ValueError(f"{name}: want [{slots.shape[0]}, {kvh}, {d}] (slots' T and the cache's heads), "
                             f"got {tuple(x.shape)}")
        if x.stride(2) != 1 or x.stride(1) != d:
            raise ValueError(f"{name}: each token's [KVH, D] row must be contiguous, strides {x.stride()}")
        if x.device != kv_cache.device:
            raise ValueError(f"{name}: on {x.device}, kv_cache on {kv_cache.device}")
    if slots.dim() != 1 or slots.dtype not in (torch.int64, torch.int32) or slots.device != kv_cache.device:
        raise ValueError(f"slots: want [T] int64 on {kv_cache.device}, got {tuple(slots.shape)} {slots.dtype} "
                         f"on {slots.device}")
    if k.dtype != v.dtype or k.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"k, v: want one float dtype, got {k.dtype} and {v.dtype}")
    if kv_cache[0].stride() != (bs * kvh * d, kvh * d, d, 1):
        raise ValueError(f"kv_cache: K and V must each be contiguous, strides {kv_cache.stride()}")
    if kv_cache.dtype == _FP8:
        if scale is None or scale.shape != (2,) or scale.dtype != torch.float32 or scale.device != kv_cache.device:
            raise ValueError(f"scale: an fp8 cache needs a [2] float32 (K, V) scale on {kv_cache.device}")
    elif scale is not None:
        raise ValueError(f"scale: only for a float8_e4m3fn cache, this one is {kv_cache.dtype}")
    elif kv_cache.dtype != k.dtype:
        raise ValueError(f"kv_cache: dtype {kv_cache.dtype} differs from k's {k.dtype}")


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
             scale: torch.Tensor | None = None) -> None:
    """kv_cache: [2, num_blocks, block_size, KVH, D]; k, v: [T, KVH, D]; slots: [T] int64,
    negative = skip. scale: [2] fp32 (K, V), only for a float8_e4m3fn cache. Writes in place."""
    _check(kv_cache, k, v, slots, scale)
    t, kvh, d = k.shape
    row = kvh * d
    row_p = triton.next_power_of_2(row)
    bt = max(1, _TILE // row_p)
    if t and row:
        _write_kv_kernel[(triton.cdiv(t, bt),)](
            k, v, kv_cache, slots, scale if scale is not None else slots, t,
            kv_cache.shape[1] * kv_cache.shape[2], k.stride(0), v.stride(0), kv_cache.stride(0),
            ROW=row, ROW_P=row_p, BT=bt, QUANT=scale is not None,
            num_warps=min(8, max(1, bt * row_p // 512)),
        )


def quantize_fp8_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, saturated to e4m3's finite range, rounded to nearest even (torch's cast)."""
    return (x.float() / scale).clamp(-_FP8_MAX, _FP8_MAX).to(_FP8)


def write_kv_reference(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                       scale: torch.Tensor | None = None) -> None:
    """Plain torch (`TorchOps.write_kv` plus the skipped slots and the fp8 cast)."""
    kvh, d = k.shape[1], k.shape[2]
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]
    keep = (slots >= 0) & (slots < num_slots)
    for i, x in enumerate((k, v)):
        dst = kv_cache[i].view(-1, kvh, d)
        if scale is None:
            dst[slots[keep]] = x[keep]
        else:  # scattered as bytes: index_put need not support fp8 on every device
            dst.view(torch.uint8)[slots[keep]] = quantize_fp8_reference(x[keep], scale[i]).view(torch.uint8)
