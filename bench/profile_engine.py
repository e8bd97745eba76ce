"""Where does a decode step's time go? cProfile (Python side) and torch.profiler
(kernels) over a few steady-state decode steps of the engine, on one GPU.

    python bench/profile_engine.py [--model DIR] [--layers 4] [--batch 1] [--steps 8]
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: scout-slice in /tmp, written if missing)")
    ap.add_argument("--layers", type=int, default=4, help="scout-slice layers when writing it")
    ap.add_argument("--batch", type=int, default=1, help="requests decoding together")
    ap.add_argument("--steps", type=int, default=8, help="decode steps profiled")
    ap.add_argument("--ops", default="torch", help="engine ops backend")
    args = ap.parse_args()
    from engine.llm import LLM
    from engine.sampling import SamplingParams

    model_dir = args.model or f"/tmp/scout-slice-L{args.layers}"
    if not (Path(model_dir) / "config.json").is_file():
        from launcher.make_model import make_model

        make_model("scout-slice", model_dir, seed=0, layers=args.layers)
    llm = LLM(model_dir, device="cuda", dtype="bfloat16", max_model_len=4096, max_num_seqs=max(args.batch, 8),
              enable_prefix_caching=False, ops=args.ops)
    eng = llm.engine
    for i in range(args.batch):
        eng.add_request(list(range(1000 + i, 1128 + i)), SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True))
    for _ in range(4):
        eng.step()
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
