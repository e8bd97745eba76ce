"""RMSNorm, and RMSNorm fused with the residual add before it, as Triton kernels.

    rms_norm(x, w):                  out = w * round(x * rsqrt(mean(x^2) + eps))
    fused_add_rms_norm(x, res, w):   h = round(res + x);  out = rms_norm(h, w);  returns (out, h)

The rounding points are transformers' (and `engine.ops.TorchOps`'): statistics and the
normalisation in fp32, rounded to the input dtype, then times the weight in that dtype
(fp32 math, one rounding); the residual sum is rounded once, as torch's `h + y` does, and
the norm reads the rounded sum. So both match their references bit for bit in fp32 up to
the order of the sum of squares, and to one bf16 rounding of the weight product otherwise.

Layout: x, residual [rows, H] (any row stride, last dim contiguous; [..., H] is flattened),
weight [H]. Outputs are fresh contiguous tensors: nothing passed in is written.

Programs: one per ROWS consecutive rows; a program holds its [ROWS, BLOCK] tile
(BLOCK = next power of two >= H, masked) in registers, so each element is read once and
written once. ROWS grows as H shrinks (tiles of ~4k elements), num_warps with the tile
(~16 elements a thread): Llama 4's H = 5120 is one row of 8,192 lanes on 16 warps,
SmolLM2's H = 576 four rows of 1,024 on 8 warps.

Bytes: rms_norm reads x and writes out (2 * rows * H * elem); the fused kernel reads x
and residual and writes out and h (4 * rows * H * elem), which is one full read and write
of the hidden state less than the unfused add + norm. The weight comes from L2. Both are
memory-bound: the ceiling is the copy bandwidth (bench/kernels_small.py).
No host synchronisation, so both can be captured in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE = 4096  # elements a program aims to hold


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [rows, H]
    res_ptr,  # [rows, H] residual (read only when ADD)
    w_ptr,  # [H]
    out_ptr,  # [rows, H] contiguous
    h_ptr,  # [rows, H] contiguous: residual + x (written only when ADD)
    rows,
    cols,
    stride_x,
    stride_res,
    eps,
    ROWS: tl.constexpr,  # rows per program
    BLOCK: tl.constexpr,  # next power of two >= cols
    ADD: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    col = tl.arange(0, BLOCK)  # [BLOCK]
    # An `&` of a row and a column mask: Triton 3.9 keeps 16-byte vector loads for this
    # form but not for `col < where(row < rows, cols, 0)` (checked on sm_90 PTX).
    mask = (row < rows)[:, None] & (col < cols)[None, :]  # [ROWS, BLOCK]
    row = row.to(tl.int64)  # rows * H can pass 2^31
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row[:, None] * stride_x + col[None, :], mask=mask, other=0.0)
    out_offs = row[:, None] * cols + col[None, :]
    if ADD:
        res = tl.load(res_ptr + row[:, None] * stride_res + col[None, :], mask=mask, other=0.0)
        x = (res.to(tl.float32) + x.to(tl.float32)).to(dtype)  # torch's `h + y`: one rounding
        tl.store(h_ptr + out_offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / cols + eps)  # [ROWS]
    normed = (xf * inv_rms[:, None]).to(dtype)  # HF rounds here, before the weight
    w = tl.load(w_ptr + col, mask=col < cols, other=0.0)
    out = (normed.to(tl.float32) * w.to(tl.float32)[None, :]).to(dtype)
    tl.store(out_ptr + out_offs, out, mask=mask)


def _check(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] != weight.shape[0] or weight.dim() != 1:
        raise ValueError(f"weight: {tuple(weight.shape)} does not match hidden size of {name} {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name}: dtype {x.dtype} not supported (float32, bfloat16, float16)")
    if x.dtype != weight.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} differs from {name}'s {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"weight: on {weight.device}, {name} on {x.device}")
    if x.stride(-1) != 1 or not weight.is_contiguous():
        raise ValueError(f"{name}: last dimension must be contiguous, weight contiguous")


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    cols = x.shape[-1]
    x2 = x.reshape(-1, cols)  # a view whenever the leading dims merge
    r2 = residual.reshape(-1, cols) if residual is not None else x2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty_like(out) if residual is not None else out
    block = triton.next_power_of_2(cols)
    rows_per_program = max(1, _TILE // block)
    if x2.shape[0] and cols:
        _rms_norm_kernel[(triton.cdiv(x2.shape[0], rows_per_program),)](
            x2, r2, weight, out, h, x2.shape[0], cols, x2.stride(0), r2.stride(0), eps,
            ROWS=rows_per_program, BLOCK=block, ADD=residual is not None,
            num_warps=min(16, max(1, rows_per_program * block // 512)),
        )
    return out, h


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H] (last dim contiguous); weight: [H], same dtype. Returns x's shape."""
    _check("x", x, weight)
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [..., H], same shape and dtype; weight: [H]. Returns
    (rms_norm(residual + x), residual + x), both new tensors; the inputs are not written.
    The decoder layer's `h = h + attn(...); y = norm(h)` becomes `y, h = fused(attn(...), h)`."""
    _check("x", x, weight)
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual: {tuple(residual.shape)} {residual.dtype} on {residual.device} "
                         f"must match x {tuple(x.shape)} {x.dtype} on {x.device}")
    if residual.stride(-1) != 1:
        raise ValueError("residual: last dimension must be contiguous")
    return _launch(x, residual, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = residual + x
    return rms_norm_reference(h, weight, eps), h
