"""Llama 4 top-1 MoE experts as two grouped Triton GEMMs (the router stays in torch).

    logits = x @ router.T                 x [T, H], router [E, H]
    top, e = logits.max(-1)               one expert per token
    xs = x * sigmoid(top)                 the router weight scales the expert's INPUT
    g, u = xs @ gate_up[e]                gate_up [E, H, 2I]: gate columns, then up columns
    out = (silu(g) * u) @ down[e]         down [E, I, H]

Grouping (torch, on the device, no host sync): tokens are sorted by expert (stable), and
`bounds[e]:bounds[e + 1]` is expert e's run of sorted rows. An M-tile is BLOCK_M sorted
rows of one expert; each expert's runs are cut into ceil(rows / BLOCK_M) tiles, numbered
expert by expert. A program finds its tile's expert and rows from `bounds` itself
(`_tile_rows`), so the grid depends on shapes only: at most
(T + min(E, T) * (BLOCK_M - 1)) // BLOCK_M tiles, and the programs past the last real
tile return at once. That keeps the launch CUDA-graph safe.

    kernel 1, program (m_tile, n_tile): rows of the tile, gathered from x and scaled by
      their router score, times the expert's gate and up column tiles [H, BLOCK_N] each;
      SiLU(gate) * up in the epilogue; writes the intermediate [T, I] in sorted order.
    kernel 2, program (m_tile, n_tile, k_split): intermediate rows times down[e]; each row
      goes straight to its token's output row (top-1: one writer per row, no atomics).
      With split_k > 1 (decode, where H / BLOCK_N programs cannot fill the GPU) each split
      writes an fp32 partial and `_sum_splits_kernel` adds them in a fixed order.
    Both grids are flat over (m_tile, n_tile) in `_tile_order`'s grouped order: a few
    neighbouring M-tiles sweep all N-tiles together, so at prefill their rows stay in L2
    and each weight tile comes from HBM about once.

Rounding follows `TorchOps.moe` (engine/ops.py), whose greedy tokens the engine compares
with this path's: xs, g, u, silu(g) and silu(g) * u are each rounded to x's dtype where
torch rounds them; the dots accumulate in fp32 (the interpreter needs help for that:
see `_round`). Nothing is atomic and the tile shapes
are a function of the shapes, so the same input gives the same bits.

Bound: at decode each touched expert's weights are read once, 3 * H * I * dtype bytes
(Scout, bf16: 252 MB per expert), so the ceiling is HBM bandwidth; at prefill it is
2 * T * H * 3I FLOPs of bf16 tensor-core matmul. bench/kernels_moe.py measures both.

Tile shapes come from `choose_tiles` (a heuristic keyed on tokens per expert, no
autotuning); a caller may pass its own `MoeTiles`. Each distinct shape compiles once on
first use, so run one call per batch-size bucket before capturing a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _round(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 x rounded to dtype, to nearest even, as torch rounds. Compiled casts do this;
    the interpreter's fp32 -> bf16 cast truncates (Triton 3.6 and 3.9), so there the bits
    are rounded first and the cast then drops only zeros."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tile_order(pid, m_tiles, N_TILES: tl.constexpr, GROUP_M: tl.constexpr):
    """(m_tile, n_tile) of program pid: GROUP_M neighbouring M-tiles (mostly one expert)
    run across all N-tiles before the next group starts, so their input rows stay in L2
    while each weight tile is fetched once from HBM for all of them."""
    per_group = GROUP_M * N_TILES
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(m_tiles - first_m, GROUP_M)
    within = pid % per_group
    return first_m + within % group_rows, within // group_rows


@triton.jit
def _tile_rows(bounds_ptr, m, E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first sorted row, end row) of M-tile m; expert == E past the last tile."""
    ids = tl.arange(0, E_PAD)
    lo = tl.load(bounds_ptr + ids, mask=ids < E, other=0)  # [E_PAD] first row of each expert
    hi = tl.load(bounds_ptr + ids + 1, mask=ids < E, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)  # tiles of experts 0..e together
    e = tl.sum((tile_end <= m).to(tl.int32), 0)
    mine = ids == e
    first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), 0)
    start = tl.sum(tl.where(mine, lo, 0), 0) + (m - first_tile) * BLOCK_M
    end = tl.sum(tl.where(mine, hi, 0), 0)
    return e, start, end


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, H]
    top_ptr,  # [T] each token's top router logit, x's dtype
    order_ptr,  # [T] int64 token of each sorted row
    bounds_ptr,  # [E + 1] int32 first sorted row of each expert
    w_ptr,  # [E, H, 2I] gate columns [0, I), up columns [I, 2I)
    out_ptr,  # [T, I] SiLU(gate) * up, rows in sorted order
    m_tiles,  # the grid's M-tile bound
    H: tl.constexpr, I: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (torch's fp32 matmul is not tf32)
    INTERPRET: tl.constexpr,  # CPU interpreter: fp32 dot operands (its bf16 dot is wrong), `_round`
):
    m, n = _tile_order(tl.program_id(0), m_tiles, (I + BLOCK_N - 1) // BLOCK_N, GROUP_M)
    e, start, end = _tile_rows(bounds_ptr, m, E, E_PAD, BLOCK_M)
    if e >= E:
        return
    dtype = out_ptr.dtype.element_ty
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tok = tl.load(order_ptr + rows, mask=row_ok, other=0)
    # torch: sigmoid(top.float()).to(dtype), then x * score rounded to dtype.
    score = _round(tl.sigmoid(tl.load(top_ptr + tok, mask=row_ok, other=0.0).to(tl.float32)), dtype, INTERPRET)
    cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    w_expert = w_ptr + e.to(tl.int64) * (H * 2 * I)

    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(x_ptr + tok[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a = _round(a.to(tl.float32) * score[:, None].to(tl.float32), dtype, INTERPRET)
        w_off = ks[:, None] * (2 * I) + cols[None, :]
        w_ok = k_ok[:, None] & col_ok[None, :]
        wg = tl.load(w_expert + w_off, mask=w_ok, other=0.0)
        wu = tl.load(w_expert + I + w_off, mask=w_ok, other=0.0)
        if INTERPRET:
            a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, wu, acc_u, input_precision=PRECISION)

    g = _round(acc_g, dtype, INTERPRET).to(tl.float32)
    u = _round(acc_u, dtype, INTERPRET).to(tl.float32)
    act = _round(g / (1.0 + tl.exp(-g)), dtype, INTERPRET).to(tl.float32)  # F.silu rounds here
    out = _round(act * u, dtype, INTERPRET)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * I + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr,  # [T, I] intermediate, rows in sorted order
    order_ptr,  # [T] int64 token of each sorted row
    bounds_ptr,  # [E + 1] int32
    w_ptr,  # [E, I, H]
    out_ptr,  # [T, H] x's dtype, or [SPLIT_K, T, H] fp32 partials when SPLIT_K > 1
    m_tiles,  # the grid's M-tile bound
    split_stride,  # T * H: elements between two splits' partials
    H: tl.constexpr, I: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, K_PER_SPLIT: tl.constexpr,  # a multiple of BLOCK_K
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    m, n = _tile_order(tl.program_id(0), m_tiles, (H + BLOCK_N - 1) // BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    e, start, end = _tile_rows(bounds_ptr, m, E, E_PAD, BLOCK_M)
    if e >= E:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tok = tl.load(order_ptr + rows, mask=row_ok, other=0)
    cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * I
    w_expert = w_ptr + e.to(tl.int64) * (I * H)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        ks = split * K_PER_SPLIT + kk + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_expert + ks[:, None] * H + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if INTERPRET:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)

    dst = tok[:, None] * H + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + dst, _round(acc, out_ptr.dtype.element_ty, INTERPRET), mask=ok)
    else:
        tl.store(out_ptr + split.to(tl.int64) * split_stride + dst, acc, mask=ok)


@triton.jit
def _sum_splits_kernel(
    part_ptr,  # [SPLIT_K, n] fp32
    out_ptr,  # [n]
    n,
    SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLIT_K):  # always split 0 first, then 1, ...: deterministic
        acc += tl.load(part_ptr + s * n + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, _round(acc, out_ptr.dtype.element_ty, INTERPRET), mask=ok)


@dataclass(frozen=True)
class GemmTiles:
    """Launch shape of one grouped GEMM. For the gate/up GEMM block_n is the width of the
    gate tile and of the up tile alike (a program reads 2 * block_n weight columns)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # the down GEMM only
    group_m: int = 8  # M-tiles that sweep the N-tiles together (`_tile_order`)

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}: must be a power of two >= 16, got {v}")
        if self.split_k < 1 or self.group_m < 1:
            raise ValueError(f"split_k, group_m: must be >= 1, got {self.split_k}, {self.group_m}")


@dataclass(frozen=True)
class MoeTiles:
    """One launch shape per kernel: they may differ (e.g. split-K for the down GEMM only)."""

    gate_up: GemmTiles
    down: GemmTiles

    def __post_init__(self):
        if self.gate_up.split_k != 1:
            raise ValueError("gate_up: split_k must be 1 (SiLU needs the whole sum)")


def choose_tiles(num_tokens: int, num_experts: int, hidden: int, inter: int, num_sms: int) -> MoeTiles:
    """Tile shapes by tokens per touched expert, from `bench/kernels_moe.py --sweep` on an
    H100 (2026-11-28, Scout's experts). Decode (<= 16 rows an expert), where the weight
    bytes bound the time: 16-row tiles; one expert (T = 1) reads 64 gate and 64 up columns
    a program and splits the down GEMM's K until there is about one program per SM (its
    40 column tiles of 128 alone would leave most of an H100's 132 SMs idle); several
    experts take 128 gate/up columns a program and need no split. Prefill: 128 x 128
    tensor-core tiles, 4 stages (13% faster than 128 x 64 at 8k tokens)."""
    rows = -(-num_tokens // max(1, min(num_tokens, num_experts)))

    def fit(block: int, dim: int) -> int:  # no wider than the (small test) dimension
        return min(block, max(16, triton.next_power_of_2(dim)))

    if rows <= 16:
        touched = max(1, min(num_tokens, num_experts))
        one = touched == 1
        down_n = fit(128 if one else 64, hidden)
        want = num_sms // (touched * -(-hidden // down_n))
        split = max(1, min(8, want, -(-inter // 1024)))  # no split shorter than 1024 rows
        return MoeTiles(GemmTiles(16, fit(64 if one else 128, inter), fit(128, hidden), 4, 4),
                        GemmTiles(16, down_n, fit(128, inter), 4, 3 if one else 4, split))
    if rows <= 64:
        return MoeTiles(GemmTiles(64, fit(64, inter), fit(64, hidden), 4, 4),
                        GemmTiles(64, fit(128, hidden), fit(64, inter), 4, 4))
    return MoeTiles(GemmTiles(128, fit(128, inter), fit(64, hidden), 8, 4),
                    GemmTiles(128, fit(128, hidden), fit(64, inter), 8, 4))


def _check(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """Shapes, dtypes, devices and strides only: nothing that reads values (no sync)."""
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"x: a contiguous [T, H] tensor expected, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x: dtype must be float16, bfloat16 or float32, got {x.dtype}")
    h = x.shape[1]
    if router.dim() != 2 or router.shape[1] != h or router.shape[0] < 1:
        raise ValueError(f"router: [E, {h}] expected, got {tuple(router.shape)}")
    e = router.shape[0]
    if gate_up.dim() != 3 or gate_up.shape[:2] != (e, h) or gate_up.shape[2] % 2 or gate_up.shape[2] < 2:
        raise ValueError(f"gate_up: [{e}, {h}, 2I] expected, got {tuple(gate_up.shape)}")
    i = gate_up.shape[2] // 2
    if down.shape != (e, i, h):
        raise ValueError(f"down: [{e}, {i}, {h}] expected, got {tuple(down.shape)}")
    for name, t in (("router", router), ("gate_up", gate_up), ("down", down)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from x's {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, x on {x.device}")
    for name, t in (("gate_up", gate_up), ("down", down)):
        if not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous")


def fused_moe(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
              tiles: MoeTiles | None = None) -> torch.Tensor:
    """x: [T, H]; router: [E, H]; gate_up: [E, H, 2I] (gate first); down: [E, I, H]; all
    one dtype and device. Returns [T, H] in x's dtype: `TorchOps.moe` (engine/ops.py).
    tiles: launch shapes (default `choose_tiles`). No host sync on CUDA."""
    _check(x, router, gate_up, down)
    t, h = x.shape
    e, i = router.shape[0], down.shape[1]
    if t == 0:
        return torch.empty_like(x)
    on_cpu = x.device.type == "cpu"
    if tiles is None:
        sms = 1 if on_cpu else torch.cuda.get_device_properties(x.device).multi_processor_count
        tiles = choose_tiles(t, e, h, i, sms)

    top, expert = F.linear(x, router).max(dim=-1)  # [T] each
    sorted_expert, order = torch.sort(expert, stable=True)
    bounds = torch.searchsorted(sorted_expert, torch.arange(e + 1, device=x.device), out_int32=True)

    common = dict(E=e, E_PAD=max(16, triton.next_power_of_2(e)), H=h, I=i,
                  PRECISION="ieee" if x.dtype == torch.float32 else "tf32", INTERPRET=on_cpu)

    def m_tiles(block_m: int) -> int:  # upper bound: each touched expert wastes < 1 tile
        return (t + min(e, t) * (block_m - 1)) // block_m

    gu = tiles.gate_up
    inter = torch.empty(t, i, device=x.device, dtype=x.dtype)
    gu_m = m_tiles(gu.block_m)
    _gate_up_kernel[(gu_m * triton.cdiv(i, gu.block_n),)](
        x, top, order, bounds, gate_up, inter, gu_m,
        BLOCK_M=gu.block_m, BLOCK_N=gu.block_n, BLOCK_K=gu.block_k, GROUP_M=gu.group_m,
        num_warps=gu.num_warps, num_stages=gu.num_stages, **common,
    )

    dn = tiles.down
    k_per_split = triton.cdiv(triton.cdiv(i, dn.split_k), dn.block_k) * dn.block_k
    split = triton.cdiv(i, k_per_split)  # no empty split
    if split > 1 and split * t * h >= 2**31:  # the partials are indexed in int32
        raise ValueError(f"tiles: split_k {split} is for small batches, not {t} tokens")
    out = torch.empty_like(x)
    dst = out if split == 1 else torch.empty(split, t, h, device=x.device, dtype=torch.float32)
    dn_m = m_tiles(dn.block_m)
    _down_kernel[(dn_m * triton.cdiv(h, dn.block_n), split)](
        inter, order, bounds, down, dst, dn_m, t * h,
        BLOCK_M=dn.block_m, BLOCK_N=dn.block_n, BLOCK_K=dn.block_k, GROUP_M=dn.group_m,
        SPLIT_K=split, K_PER_SPLIT=k_per_split,
        num_warps=dn.num_warps, num_stages=dn.num_stages, **common,
    )
    if split > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(t * h, block),)](dst, out, t * h, SPLIT_K=split, BLOCK=block,
                                                           INTERPRET=on_cpu)
    return out


def fused_moe_reference(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor,
                        down: torch.Tensor) -> torch.Tensor:
    """Plain torch, expert by expert, rounding where `TorchOps.moe` rounds."""
    top, expert = F.linear(x, router).max(dim=-1)
    xs = x * torch.sigmoid(top.float()).to(x.dtype)[:, None]
    out = torch.zeros_like(x)
    for e in range(router.shape[0]):
        mine = expert == e
        g, u = (xs[mine] @ gate_up[e]).chunk(2, dim=-1)
        out[mine] = (F.silu(g) * u) @ down[e]
    return out
