"""RoPE (+ Llama 4's weightless QK L2 norm) for q and k in one Triton launch.

Two pairings: `interleaved` (Llama 4: (x[2i], x[2i+1]) is one complex number) and
rotate-half (Llama 3 in HF layout: (x[i], x[i + D/2])). The rounding points follow
transformers: Llama 4 rotates in fp32 and rounds once (then the norm works on the rounded
values in fp32 and rounds again); Llama 3 multiplies in the model dtype with cos/sin
rounded to it. One program per (token, head), q heads first, then k heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr,  # [T, H, D], [T, KVH, D] (last dim contiguous)
    qo_ptr, ko_ptr,  # outputs, same shapes, contiguous
    pos_ptr,  # [T] int64
    inv_freq_ptr,  # [D/2] fp32
    H, KVH,
    stride_qt, stride_qh, stride_kt, stride_kh,
    eps,
    HALF: tl.constexpr,  # D / 2
    INTERLEAVED: tl.constexpr,
    NORM: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    is_q = h < H
    i = tl.arange(0, HALF)
    if INTERLEAVED:
        a_off, b_off = 2 * i, 2 * i + 1
    else:
        a_off, b_off = i, i + HALF
    if is_q:
        src = q_ptr + t * stride_qt + h * stride_qh
        dst = qo_ptr + (t * H + h) * 2 * HALF
    else:
        src = k_ptr + t * stride_kt + (h - H) * stride_kh
        dst = ko_ptr + (t * KVH + (h - H)) * 2 * HALF
    a_raw = tl.load(src + a_off)
    b_raw = tl.load(src + b_off)
    dtype = a_raw.dtype
    freq = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_freq_ptr + i)
    cos, sin = tl.cos(freq), tl.sin(freq)
    if INTERLEAVED:  # complex multiply in fp32, one rounding
        a, b = a_raw.to(tl.float32), b_raw.to(tl.float32)
        ra = (a * cos - b * sin).to(dtype)
        rb = (a * sin + b * cos).to(dtype)
    else:  # HF Llama: x*cos + rotate_half(x)*sin, every op rounded to the model dtype
        c, s = cos.to(dtype).to(tl.float32), sin.to(dtype).to(tl.float32)
        a, b = a_raw.to(tl.float32), b_raw.to(tl.float32)
        ra = ((a * c).to(dtype).to(tl.float32) + (-b * s).to(dtype).to(tl.float32)).to(dtype)
        rb = ((b * c).to(dtype).to(tl.float32) + (a * s).to(dtype).to(tl.float32)).to(dtype)
    if NORM:
        fa, fb = ra.to(tl.float32), rb.to(tl.float32)
        inv = 1.0 / tl.sqrt((tl.sum(fa * fa, axis=0) + tl.sum(fb * fb, axis=0)) / (2 * HALF) + eps)
        ra, rb = (fa * inv).to(dtype), (fb * inv).to(dtype)
    tl.store(dst + a_off, ra)
    tl.store(dst + b_off, rb)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
         interleaved: bool, norm_eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, KVH, D], positions: [T] int, inv_freq: [D/2] fp32.
    norm_eps: apply the weightless L2 (RMS) norm after RoPE (Llama 4 RoPE layers)."""
    t, h, d = q.shape
    if k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"k: shape {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if d % 2 or (d // 2) & (d // 2 - 1):
        raise ValueError(f"head_dim {d}: must be twice a power of two")
    if inv_freq.shape != (d // 2,) or inv_freq.dtype != torch.float32:
        raise ValueError(f"inv_freq: want [{d // 2}] float32, got {tuple(inv_freq.shape)} {inv_freq.dtype}")
    if positions.shape != (t,):
        raise ValueError(f"positions: want [{t}], got {tuple(positions.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q, k: the head dimension must be contiguous")
    qo, ko = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t:
        _rope_kernel[(t, h + k.shape[1])](
            q, k, qo, ko, positions.contiguous(), inv_freq.contiguous(), h, k.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), norm_eps or 0.0,
            HALF=d // 2, INTERLEAVED=interleaved, NORM=norm_eps is not None,
        )
    return qo, ko


def rope_reference(q, k, positions, inv_freq, interleaved: bool, norm_eps: float | None = None):
    from engine.ops import TorchOps

    ops = TorchOps()
    q, k = (ops.rope_interleaved if interleaved else ops.rope_half)(q, k, positions, inv_freq)
    if norm_eps is not None:
        q, k = ops.l2_norm(q, norm_eps), ops.l2_norm(k, norm_eps)
    return q, k
