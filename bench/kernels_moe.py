"""Fused MoE benchmark (one GPU, one device call): `fused_moe` against the engine's torch
path (`TorchOps.moe`) at Scout's expert sizes (H 5120, I 8192, 16 experts, bf16, random
weights), correctness first, then time, with the ceilings measured in the same call.

    python bench/kernels_moe.py            # the table
    python bench/kernels_moe.py --sweep    # also time a few tile shapes per batch size

Decode rows (T = 1, 8, 64): the ceiling is the bytes of the experts the batch touches
(3 * H * I * 2 each) at the copy bandwidth. Each is timed eagerly and as a CUDA-graph
replay: eager launches of Triton kernels cost tens of microseconds of CPU each, more than
the kernel itself at T = 1, and the engine will replay decode steps from graphs. The
prefill row (T = 8192): the ceiling is 2 * T * H * 3I FLOPs at the measured bf16 matmul
rate. The torch path syncs (`.tolist()`), so it is only ever timed eagerly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import ceilings, cuda_time, print_table  # noqa: E402
from engine.ops import TorchOps  # noqa: E402
from tandem_kernels.moe import GemmTiles, MoeTiles, fused_moe, fused_moe_reference  # noqa: E402

H, I, E = 5120, 8192, 16  # Llama 4 Scout
DECODE, PREFILL = (1, 8, 64), 8192


def scout_experts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router, gate_up, down like a real checkpoint's scale (4 GB of bf16). A random
    router over random activations routes about uniformly."""
    torch.manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16).mul_(0.02)  # noqa: E731
    return make(E, H), make(E, H, 2 * I), make(E, I, H)


def graph_time(fn, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Capture fn(x) in a CUDA graph (after warm-up on a side stream, as torch requires);
    returns (median replay seconds, the replay's output)."""
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_x)
    t = cuda_time(graph.replay, reps=50)
    return t, static_out


def _rows_at(t: int, weights: tuple, copy_GBps: float, matmul_TFLOPs: float) -> list[tuple[str, ...]]:
    """The row(s) for batch size t: eager, and at decode a CUDA-graph replay too."""
    router, gate_up, down = weights
    x = torch.randn(t, H, device="cuda", dtype=torch.bfloat16)
    moe = lambda x: fused_moe(x, router, gate_up, down)  # noqa: E731
    got, ref = moe(x), fused_moe_reference(x, router, gate_up, down)
    err = f"{((got.float() - ref.float()).norm() / ref.float().norm()).item():.1e}"
    reps = 20 if t < PREFILL else 5
    tt = cuda_time(lambda: moe(x), reps=reps)
    tr = cuda_time(lambda: TorchOps().moe(x, router, gate_up, down), reps=reps)
    if t >= PREFILL:
        flops = 2 * t * H * 3 * I
        return [("fused_moe", f"T={t} (prefill)", err, f"{tt * 1e6:.0f} us", f"{tr * 1e6:.0f} us",
                 f"{flops / tt / 1e12:.0f} TFLOP/s", f"{100 * flops / tt / 1e12 / matmul_TFLOPs:.0f}%")]
    touched = F.linear(x, router).argmax(-1).unique().numel()
    nbytes = touched * 3 * H * I * 2
    shape = f"T={t}, {touched} expert(s) touched"
    out = [("fused_moe", shape, err, f"{tt * 1e6:.1f} us", f"{tr * 1e6:.1f} us",
            f"{nbytes / tt / 1e9:.0f} GB/s", f"{100 * nbytes / tt / 1e9 / copy_GBps:.0f}%")]
    try:
        tg, replayed = graph_time(moe, x)
    except Exception as exc:  # a capture failure is a finding, not a reason to lose the table
        return out + [("fused_moe graph", f"T={t}: capture failed", type(exc).__name__, str(exc)[:60], "-", "-", "-")]
    same = "bit-equal" if torch.equal(replayed, got) else "DIFFERS from eager"
    return out + [("fused_moe graph", f"{shape}, replay {same}", err, f"{tg * 1e6:.1f} us",
                   f"{tr * 1e6:.1f} us (eager)", f"{nbytes / tg / 1e9:.0f} GB/s",
                   f"{100 * nbytes / tg / 1e9 / copy_GBps:.0f}%")]


def rows(copy_GBps: float, matmul_TFLOPs: float) -> list[tuple[str, ...]]:
    """Rows of (kernel, shape, rel err vs reference, triton time, torch-path time,
    achieved, % of ceiling), as bench/kernels.py prints them. Holds 4 GB of weights while
    it runs and frees them before it returns."""
    weights = scout_experts()
    out = [row for t in DECODE + (PREFILL,) for row in _rows_at(t, weights, copy_GBps, matmul_TFLOPs)]
    del weights
    torch.cuda.empty_cache()
    return out


def sweep_candidates(t: int) -> list[MoeTiles]:
    """A few tile shapes around the defaults of `choose_tiles` for batch size t."""
    if t <= 64:
        return ([MoeTiles(GemmTiles(16, bn, bk, 4, 4), GemmTiles(16, 64, 128, 4, 4, 3 if t == 1 else 1))
                 for bn in (32, 64, 128) for bk in (64, 128, 256) if bn * bk <= 16384]  # fits shared memory
                + [MoeTiles(GemmTiles(16, 64, 128, 4, 4), GemmTiles(16, bn, 128, 4, stages, split))
                   for bn in (64, 128) for split in (1, 2, 3, 4, 6) for stages in (3, 5)])
    return ([MoeTiles(GemmTiles(bm, bn, 64, 8, stages), GemmTiles(128, 128, 64, 8, 4))
             for bm in (64, 128) for bn in (64, 128) for stages in (3, 4)]
            + [MoeTiles(GemmTiles(128, 64, 64, 8, 4), GemmTiles(bm, bn, 64, 8, stages))
               for bm in (64, 128) for bn in (128, 256) for stages in (3, 4)])


def _sweep_at(t: int, weights: tuple) -> None:
    router, gate_up, down = weights
    x = torch.randn(t, H, device="cuda", dtype=torch.bfloat16)
    ref = fused_moe_reference(x, router, gate_up, down).float()
    timed = []
    for tiles in sweep_candidates(t):
        fn = lambda x, tiles=tiles: fused_moe(x, router, gate_up, down, tiles=tiles)  # noqa: E731
        try:
            err = ((fn(x).float() - ref).norm() / ref.norm()).item()
            sec = graph_time(fn, x)[0] if t < PREFILL else cuda_time(lambda: fn(x), reps=5)
        except Exception as exc:  # e.g. out of shared memory for a big tile
            print(f"  T={t} {tiles}: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        timed.append((sec, err, tiles))
    print(f"sweep T={t} ({'graph replay' if t < PREFILL else 'eager'}), fastest first:")
    for sec, err, tiles in sorted(timed, key=lambda r: r[0])[:6]:
        g, d = tiles.gate_up, tiles.down
        print(f"  {sec * 1e6:9.1f} us  err {err:.1e}  gate_up {g.block_m}x{g.block_n}x{g.block_k} "
              f"w{g.num_warps} s{g.num_stages} | down {d.block_m}x{d.block_n}x{d.block_k} "
              f"w{d.num_warps} s{d.num_stages} split {d.split_k}", flush=True)


def sweep() -> None:
    """Times each candidate of `sweep_candidates` (CUDA-graph replay at decode, eager at
    prefill) and prints the fastest: input for `choose_tiles`."""
    weights = scout_experts()
    for t in DECODE + (PREFILL,):
        _sweep_at(t, weights)
    del weights
    torch.cuda.empty_cache()


def main() -> int:
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    ceil = ceilings()
    print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    table = [("kernel", "shape", "rel err", "triton", "torch path", "achieved", "% of ceiling")]
    table += rows(ceil["copy_GBps"], ceil["matmul_TFLOPs"])
    print_table(table)
    if "--sweep" in sys.argv[1:]:
        sweep()
    return 0


if __name__ == "__main__":
    sys.exit(main())
