"""Does an 8k-token prefill slow down after the GPU idled? (one GPU, no services)

    python bench/idle_gpu.py [--model DIR] [--requests 36] [--gap 0.15] [--prompt-len 8000]

Several sessions saw some requests take ~80 ms instead of ~48 (scout-slice, 4 layers),
in every mode of bench/disagg.py, colocated included. This runs the engine in this
process and times one prefill (max_tokens=1) after each of four kinds of pause:
  none    back to back;
  sleep   the host sleeps --gap seconds (the GPU idles too);
  spin    the host spins --gap seconds (the GPU idles, the CPU stays busy);
  busy    small matmuls on a side stream keep the GPU busy for --gap seconds.
It prints, per pause, how many requests took over 1.15x the median of "none", and the
slowest ones. Slow requests after sleep and spin but not after busy point at the GPU's
idle power state, not the host or our code.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import scout_slice  # noqa: E402


def pause(kind: str, seconds: float, side: torch.cuda.Stream, x: torch.Tensor) -> None:
    end = time.perf_counter() + seconds
    if kind == "sleep":
        time.sleep(seconds)
    elif kind == "spin":
        while time.perf_counter() < end:
            pass
    elif kind == "busy":
        with torch.cuda.stream(side):
            while time.perf_counter() < end:
                for _ in range(50):
                    x = (x @ x).clamp_(-1, 1)
                time.sleep(0.002)
        side.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: scout-slice --layers 4 in /tmp, written if missing)")
    ap.add_argument("--requests", type=int, default=36, help="timed prefills per kind of pause (default 36)")
    ap.add_argument("--gap", type=float, default=0.15, help="seconds of each pause (default 0.15)")
    ap.add_argument("--prompt-len", type=int, default=8000, help="prompt tokens (default 8000)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a GPU")

    from engine.llm import LLM
    from engine.sampling import SamplingParams

    model = scout_slice(args.model)
    llm = LLM(model, device="cuda", ops="triton", num_blocks=4096, max_model_len=16384,
              max_num_batched_tokens=max(8192, args.prompt_len), enable_prefix_caching=False)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=1, temperature=0)
    side, x = torch.cuda.Stream(), torch.randn(256, 256, device="cuda")
    times: dict[str, list[float]] = {}
    for kind in ("none", "sleep", "spin", "busy"):
        times[kind] = []
        for i in range(args.requests + 3):  # three untimed first
            prompt = [rng.randrange(200000) for _ in range(args.prompt_len)]
            pause(kind, 0.0 if kind == "none" else args.gap, side, x)
            t = time.perf_counter()
            llm.generate([prompt], params)
            torch.cuda.synchronize()
            if i >= 3:
                times[kind].append(1e3 * (time.perf_counter() - t))
    base = statistics.median(times["none"])
    print(f"\n{args.prompt_len}-token prefill on {torch.cuda.get_device_name()}, {args.requests} per kind, "
          f"pauses of {1e3 * args.gap:.0f} ms; slow = over {1.15 * base:.1f} ms (1.15x the back-to-back median)")
    print("| before each request | median | slow | slowest (ms) |\n|---|---|---|---|")
    for kind, xs in times.items():
        slow = sum(v > 1.15 * base for v in xs)
        tail = " ".join(f"{v:.0f}" for v in sorted(xs)[-4:])
        print(f"| {kind} | {statistics.median(xs):.1f} ms | {slow}/{len(xs)} | {tail} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
