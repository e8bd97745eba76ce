"""Benchmark of the small memory-bound kernels (one GPU, one device call): fused residual
add + RMSNorm, RoPE + QK norm, and the KV-cache write, each against the torch code the
engine runs today, at decode (1, 64 tokens) and prefill (8,192 tokens) sizes with Scout's
shapes (hidden 5120; 40 q / 8 kv heads of 128), bf16.

Each time cell reads "G us (eager E)": G is the GPU time per call, replayed from a CUDA
graph of 10 calls (the kernel alone, as the engine's captured decode steps see it); E is
one eager call timed with CUDA events, which includes the Python launch path (~50-90 us,
the whole story at small sizes). GB/s and % of copy come from G. Errors are measured on
fresh random inputs first: the max relative error (norm of the difference over the norm
of the reference), or for the cache writes the number of cache bytes that differ.

    python bench/kernels_small.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import ceilings, cuda_time, print_table  # noqa: E402
from engine.ops import TorchOps  # noqa: E402
from tandem_kernels.kv_write import quantize_fp8_reference, write_kv, write_kv_reference  # noqa: E402
from tandem_kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_reference  # noqa: E402
from tandem_kernels.rope import rope, rope_reference  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 5120, 40, 8, 128
TOKENS = (1, 64, 8192)
BLOCK_SIZE, NUM_BLOCKS = 16, 4096  # a 64k-slot cache, 2 x 128 MiB in bf16
GRAPH_CALLS = 10
DEVICE = "cuda"


def graph_time(fn) -> float | None:
    """Seconds per call of fn replayed from a CUDA graph of GRAPH_CALLS calls (None when
    capture fails: the kernel is then not graph safe, which the table should show)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles here) off the default stream, as capture wants
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
    except RuntimeError as e:
        print(f"capture failed: {e}", file=sys.stderr)
        return None
    t = cuda_time(graph.replay, reps=20) / GRAPH_CALLS
    del graph
    return t


def _cell(fn) -> tuple[str, float | None]:
    g, e = graph_time(fn), cuda_time(fn, reps=20)
    return (f"{g * 1e6:.1f} us" if g else "no graph") + f" (eager {e * 1e6:.1f})", g or e


def _row(name: str, shape: str, err: str, fn, ref_fn, nbytes: int, copy_gbps: float) -> tuple[str, ...]:
    tt_cell, tt = _cell(fn)
    tr_cell, _ = _cell(ref_fn)
    gbps = nbytes / tt / 1e9
    return (name, shape, err, tt_cell, tr_cell, f"{gbps:.0f}", f"{100 * gbps / copy_gbps:.0f}%")


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def norm_rows(copy_gbps: float) -> list[tuple[str, ...]]:
    rows = []
    for t in TOKENS:
        x = torch.randn(t, HIDDEN, device=DEVICE, dtype=torch.bfloat16)
        res = torch.randn(t, HIDDEN, device=DEVICE, dtype=torch.bfloat16) * 3
        w = (1 + 0.1 * torch.randn(HIDDEN, device=DEVICE)).to(torch.bfloat16)
        (out, h), (ref_out, ref_h) = fused_add_rms_norm(x, res, w, 1e-5), fused_add_rms_norm_reference(x, res, w, 1e-5)
        err = f"{_rel(out, ref_out):.1e}, sum {'exact' if torch.equal(h, ref_h) else f'{_rel(h, ref_h):.1e}'}"
        nbytes = 4 * x.numel() * 2 + w.numel() * 2  # read x, residual; write out, sum
        rows.append(_row("fused_add_rms_norm", f"[{t}, {HIDDEN}] bf16", err,
                         lambda: fused_add_rms_norm(x, res, w, 1e-5),
                         lambda: fused_add_rms_norm_reference(x, res, w, 1e-5), nbytes, copy_gbps))
    return rows


def rope_rows(copy_gbps: float) -> list[tuple[str, ...]]:
    rows = []
    inv_freq = 1.0 / (500000 ** (torch.arange(0, HEAD_DIM, 2, device=DEVICE).float() / HEAD_DIM))
    for t in TOKENS:
        q = torch.randn(t, HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
        k = torch.randn(t, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
        pos = torch.randint(0, 8192, (t,), device=DEVICE)
        got, ref = rope(q, k, pos, inv_freq, True, 1e-5), rope_reference(q, k, pos, inv_freq, True, 1e-5)
        err = f"{max(_rel(a, b) for a, b in zip(got, ref)):.1e}"
        nbytes = 2 * (q.numel() + k.numel()) * 2
        rows.append(_row("rope+qk_norm", f"q[{t}, {HEADS}, {HEAD_DIM}] k[{t}, {KV_HEADS}, {HEAD_DIM}]", err,
                         lambda: rope(q, k, pos, inv_freq, True, 1e-5),
                         lambda: rope_reference(q, k, pos, inv_freq, True, 1e-5), nbytes, copy_gbps))
    return rows


def kv_write_rows(copy_gbps: float) -> list[tuple[str, ...]]:
    """Distinct random slots (a real batch scatters over blocks); the 1- and 64-token cases
    pad to 8 / 72 rows with -1 slots, as a CUDA-graph batch does. The fp8 row quantises
    with a per-tensor scale; its torch time is the reference's divide, clamp, cast and scatter."""
    rows = []
    ops = TorchOps()
    num_slots = NUM_BLOCKS * BLOCK_SIZE
    shape = (2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    for t, fp8 in [(t, False) for t in TOKENS] + [(TOKENS[-1], True)]:
        pad = 0 if t == TOKENS[-1] else 8
        k = torch.randn(t + pad, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        slots = torch.randperm(num_slots, device=DEVICE)[: t + pad]
        slots[t:] = -1
        live = slice(0, t)  # the torch path has no skip: it gets the real rows only
        if fp8:
            scale = torch.tensor([0.02, 0.02], device=DEVICE)
            cache = torch.zeros(shape, device=DEVICE, dtype=torch.uint8).view(torch.float8_e4m3fn)
            want = cache.clone()
            write_kv(cache, k, v, slots, scale)
            write_kv_reference(want, k, v, slots, scale)

            def torch_path():  # scattered as bytes: index_put need not know fp8
                qk = quantize_fp8_reference(k[live], scale[0]).view(torch.uint8)
                qv = quantize_fp8_reference(v[live], scale[1]).view(torch.uint8)
                ops.write_kv(want.view(torch.uint8), qk, qv, slots[live])
        else:
            scale = None
            cache = torch.zeros(shape, device=DEVICE, dtype=torch.bfloat16)
            want = cache.clone()
            write_kv(cache, k, v, slots)
            write_kv_reference(want, k, v, slots)

            def torch_path():
                ops.write_kv(want, k[live], v[live], slots[live])
        diff = int((cache.view(torch.uint8) != want.view(torch.uint8)).sum())
        err = "exact" if diff == 0 else f"{diff} bytes differ"
        nbytes = 2 * t * KV_HEADS * HEAD_DIM * (2 + (1 if fp8 else 2))  # read k, v; write both
        rows.append(_row("kv write fp8" if fp8 else "kv write", f"[{t}, {KV_HEADS}, {HEAD_DIM}] x2"
                         + (f" +{pad} skipped" if pad else "") + (" -> e4m3" if fp8 else " bf16"), err,
                         lambda: write_kv(cache, k, v, slots, scale), torch_path, nbytes, copy_gbps))
    return rows


def rows(copy_GBps: float) -> list[tuple[str, ...]]:
    """Seven strings a row: kernel, shape, rel err, triton time, torch ref time, GB/s, % of copy."""
    return norm_rows(copy_GBps) + rope_rows(copy_GBps) + kv_write_rows(copy_GBps)


def main() -> int:
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    bw = ceilings()["copy_GBps"]
    print(f"copy ceiling {bw:.0f} GB/s")
    table = [("kernel", "shape", "rel err", "triton", "torch ref", "triton GB/s", "% of copy")] + rows(bw)
    print_table(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
