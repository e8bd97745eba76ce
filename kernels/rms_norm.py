"""RMSNorm as one Triton kernel: a row per program, fp32 statistics, the same rounding
points as transformers (normalise in fp32, round to the input dtype, then multiply by the
weight in that dtype), so it matches `rms_norm_reference` bit for bit in fp32 and to
bf16 rounding otherwise.

Bytes: one read of x and the weight, one write: a memory-bound op whose ceiling is the
copy bandwidth (bench/kernels.py times it against the torch reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [rows, cols]
    w_ptr,  # [cols]
    out_ptr,  # [rows, cols]
    cols,
    stride_x,
    stride_out,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / cols
    normed = (x * (1.0 / tl.sqrt(var + eps))).to(out_ptr.dtype.element_ty)  # HF rounds here
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = (normed.to(tl.float32) * w.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + offs, out, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H] (last dim contiguous); weight: [H], same dtype. Returns x's shape."""
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"weight: {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    if x.dtype != weight.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} differs from x's {x.dtype}")
    if x.stride(-1) != 1 or not weight.is_contiguous():
        raise ValueError("x: last dimension must be contiguous, weight contiguous")
    rows_view = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows_view)
    cols = rows_view.shape[1]
    block = triton.next_power_of_2(cols)
    if rows_view.shape[0]:
        _rms_norm_kernel[(rows_view.shape[0],)](
            rows_view, weight, out, cols, rows_view.stride(0), out.stride(0), eps,
            BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )
    return out.view(x.shape)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)
