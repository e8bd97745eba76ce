"""RoPE (+ Llama 4's weightless QK L2 norm) for q and k in one Triton launch.

Two pairings: `interleaved` (Llama 4: (x[2i], x[2i+1]) is one complex number) and
rotate-half (Llama 3 in HF layout: (x[i], x[i + D/2])). The rounding points follow
transformers: Llama 4 rotates in fp32 and rounds once (then the norm works on the rounded
values in fp32 and rounds again); Llama 3 multiplies in the model dtype with cos/sin
rounded to it.

Layout: q [T, H, D], k [T, KVH, D], any token and head strides (views of a fused QKV
projection work), head dim contiguous; outputs are new contiguous tensors.

Programs: grid (T / BT, H / BH + KVH / BH). A program rotates a [BT tokens, BH heads, D]
tile of q (the first H / BH columns of the grid) or of k (the rest), computing cos/sin
once per token for all BH heads. An interleaved tile is loaded whole (contiguous, wide
loads) and its pairs split in registers. BH is the smaller head count rounded up to a
power of two, at most 8; BT fills the tile to ~4k elements: Scout (40 q / 8 kv heads of
128) runs [4, 8, 128] tiles, 5 q programs and 1 k program per 4 tokens.

Bytes: q and k read once, written once (4 * T * (H + KVH) * D bytes in bf16); the cos/sin
and the norm are a few flops an element. Memory-bound: the ceiling is the copy bandwidth
(bench/kernels_small.py). No host synchronisation: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 4096  # elements a program aims to hold


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr,  # [T, H, D], [T, KVH, D] (head dim contiguous)
    qo_ptr, ko_ptr,  # [T, H, D], [T, KVH, D] contiguous outputs
    pos_ptr,  # [T] int
    inv_freq_ptr,  # [D/2] fp32
    T, H, KVH,
    stride_qt, stride_qh, stride_kt, stride_kh,
    eps,
    BT: tl.constexpr,  # tokens per program
    BH: tl.constexpr,  # heads per program
    HALF: tl.constexpr,  # D / 2
    INTERLEAVED: tl.constexpr,
    NORM: tl.constexpr,
):
    D: tl.constexpr = 2 * HALF
    hb = tl.program_id(1)
    q_blocks = tl.cdiv(H, BH)
    is_q = hb < q_blocks
    t = tl.program_id(0) * BT + tl.arange(0, BT)  # [BT]
    head = tl.where(is_q, hb, hb - q_blocks) * BH + tl.arange(0, BH)  # [BH]
    heads = tl.where(is_q, H, KVH)
    tok, hd = t.to(tl.int64)[:, None, None], head[None, :, None]
    dst_off = (tok * heads + hd) * D
    if is_q:  # only the pointers differ; values computed above keep one type either way
        src, dst = q_ptr + tok * stride_qt + hd * stride_qh, qo_ptr + dst_off
    else:
        src, dst = k_ptr + tok * stride_kt + hd * stride_kh, ko_ptr + dst_off
    # One comparison per (token, head): a token past T keeps no heads.
    mask = head[None, :, None] < tl.where(t < T, heads, 0)[:, None, None]  # [BT, BH, 1]

    i = tl.arange(0, HALF)
    freq = tl.load(pos_ptr + t, mask=t < T, other=0).to(tl.float32)[:, None] * tl.load(inv_freq_ptr + i)[None, :]
    cos, sin = tl.cos(freq)[:, None, :], tl.sin(freq)[:, None, :]  # [BT, 1, HALF]
    if INTERLEAVED:
        d = tl.arange(0, D)[None, None, :]
        x = tl.load(src + d, mask=mask, other=0.0)  # [BT, BH, D]
        dtype = x.dtype
        a, b = tl.split(tl.reshape(x, [BT, BH, HALF, 2]))  # real and imaginary parts
        a, b = a.to(tl.float32), b.to(tl.float32)
        ra = (a * cos - b * sin).to(dtype)  # complex multiply in fp32, one rounding
        rb = (a * sin + b * cos).to(dtype)
    else:  # HF Llama: x*cos + rotate_half(x)*sin, every op rounded to the model dtype
        i3 = i[None, None, :]
        a_raw = tl.load(src + i3, mask=mask, other=0.0)  # [BT, BH, HALF]
        b_raw = tl.load(src + HALF + i3, mask=mask, other=0.0)
        dtype = a_raw.dtype
        c, s = cos.to(dtype).to(tl.float32), sin.to(dtype).to(tl.float32)
        a, b = a_raw.to(tl.float32), b_raw.to(tl.float32)
        ra = ((a * c).to(dtype).to(tl.float32) + (-b * s).to(dtype).to(tl.float32)).to(dtype)
        rb = ((b * c).to(dtype).to(tl.float32) + (a * s).to(dtype).to(tl.float32)).to(dtype)
    if NORM:  # weightless RMS norm over the head dim, on the rounded rotation
        fa, fb = ra.to(tl.float32), rb.to(tl.float32)
        inv = 1.0 / tl.sqrt((tl.sum(fa * fa, axis=2) + tl.sum(fb * fb, axis=2)) / D + eps)  # [BT, BH]
        ra, rb = (fa * inv[:, :, None]).to(dtype), (fb * inv[:, :, None]).to(dtype)
    if INTERLEAVED:
        tl.store(dst + d, tl.reshape(tl.join(ra, rb), [BT, BH, D]), mask=mask)
    else:
        tl.store(dst + i3, ra, mask=mask)
        tl.store(dst + HALF + i3, rb, mask=mask)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
         interleaved: bool, norm_eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, KVH, D], positions: [T] int, inv_freq: [D/2] fp32.
    norm_eps: apply the weightless L2 (RMS) norm after RoPE (Llama 4 RoPE layers)."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q, k: want [T, heads, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    t, h, d = q.shape
    kvh = k.shape[1]
    if k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"k: shape {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if d < 2 or d % 2 or (d // 2) & (d // 2 - 1):
        raise ValueError(f"head_dim {d}: must be twice a power of two")
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q, k: want one float dtype, got {q.dtype} and {k.dtype}")
    if inv_freq.shape != (d // 2,) or inv_freq.dtype != torch.float32:
        raise ValueError(f"inv_freq: want [{d // 2}] float32, got {tuple(inv_freq.shape)} {inv_freq.dtype}")
    if positions.shape != (t,) or positions.is_floating_point() or positions.is_complex():
        raise ValueError(f"positions: want [{t}] integers, got {tuple(positions.shape)} {positions.dtype}")
    if len({q.device, k.device, positions.device, inv_freq.device}) != 1:
        raise ValueError("q, k, positions, inv_freq: must be on one device")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q, k: the head dimension must be contiguous")
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    bh = min(8, triton.next_power_of_2(max(1, min(h, kvh))))
    bt = max(1, _TILE // (bh * d))
    if t and h + kvh:
        _rope_kernel[(triton.cdiv(t, bt), triton.cdiv(h, bh) + triton.cdiv(kvh, bh))](
            q, k, qo, ko, positions.contiguous(), inv_freq.contiguous(), t, h, kvh,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), norm_eps or 0.0,
            BT=bt, BH=bh, HALF=d // 2, INTERLEAVED=interleaved, NORM=norm_eps is not None,
            num_warps=min(8, max(1, bt * bh * d // 512)),
        )
    return qo, ko


def rope_reference(q, k, positions, inv_freq, interleaved: bool, norm_eps: float | None = None):
    from engine.ops import TorchOps

    ops = TorchOps()
    q, k = (ops.rope_interleaved if interleaved else ops.rope_half)(q, k, positions, inv_freq)
    if norm_eps is not None:
        q, k = ops.l2_norm(q, norm_eps), ops.l2_norm(k, norm_eps)
    return q, k
