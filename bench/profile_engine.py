"""Where does a decode step's time go? cProfile (Python side) and torch.profiler
(kernels) over a few steady-state decode steps of the engine, on one GPU.

    python bench/profile_engine.py [--model DIR] [--layers 4] [--batch 1] [--steps 8] [--prompt-len 128]

With --mixed, it then adds one more prompt of --prompt-len tokens and times each step
while that prompt is prefilled in --max-num-batched-tokens chunks beside the decodes
(what a colocated instance does under load).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import scout_slice  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: scout-slice in /tmp, written if missing)")
    ap.add_argument("--layers", type=int, default=4, help="scout-slice layers when writing it")
    ap.add_argument("--batch", type=int, default=1, help="requests decoding together")
    ap.add_argument("--steps", type=int, default=8, help="decode steps profiled")
    ap.add_argument("--ops", default="auto", help="engine ops backend (default auto: triton + decode CUDA graphs on CUDA)")
    ap.add_argument("--prompt-len", type=int, default=128, help="context of each decoding request")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048, help="prefill chunk per step")
    ap.add_argument("--mixed", action="store_true", help="also time steps that prefill a chunk beside the decodes")
    args = ap.parse_args()
    from engine.llm import LLM
    from engine.sampling import SamplingParams

    model_dir = scout_slice(args.model, args.layers)
    import time

    n = args.prompt_len
    llm = LLM(model_dir, device="cuda", dtype="bfloat16", max_model_len=max(4096, n + 1100),
              max_num_seqs=max(args.batch + 1, 8), enable_prefix_caching=False, ops=args.ops,
              max_num_batched_tokens=args.max_num_batched_tokens)
    eng = llm.engine
    for i in range(args.batch):
        eng.add_request(list(range(1000 + i, 1000 + n + i)), SamplingParams(max_tokens=1000, temperature=0,
                                                                            ignore_eos=True))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    for _ in range(4):
        eng.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        eng.step()
    torch.cuda.synchronize()
    print(f"decode step, batch {args.batch} x context {n}: {1e3 * (time.perf_counter() - t) / args.steps:.2f} ms")
    graphs = eng.runner.graphs
    if graphs is not None and graphs.graphs:
        # The GPU work of a step alone: replay the last step's graph (it rewrites the same
        # KV slots with the same values). Step time minus this is the host's share.
        from bench.engine import cuda_time

        b = next(s for s in graphs.sizes if s >= args.batch)
        replay = cuda_time(graphs.graphs[b].replay, reps=20)
        print(f"graph replay alone (batch padded to {b}): {1e3 * replay:.2f} ms")
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        eng.step()
    torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as p:
        for _ in range(args.steps):
            eng.step()
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=20))
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    if args.mixed:
        eng.add_request(list(range(50000, 50000 + n)), SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        times = []
        while eng.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running):
            torch.cuda.synchronize()
            t = time.perf_counter()
            eng.step()
            torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t))
        print(f"steps prefilling a {n}-token prompt in {args.max_num_batched_tokens}-token chunks beside "
              f"{args.batch} decodes (ms): {', '.join(f'{x:.1f}' for x in times)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
