"""Does a request's greedy output depend on what runs beside it? (one GPU)

    python bench/batch_variance.py [--model DIR] [--prompts 16] [--background 16] [--prompt-len 8000]

Each random prompt is generated twice with greedy sampling: alone, then while
--background other requests decode in the same steps (its prefill shares a step with
their decode rows, and its decode steps run in their batch). On CPU in fp32 the tests
find the outputs identical; bf16 GPU kernels round differently with the number of rows
(another GEMM tiling, another reduction order), so a near-tie between the top two
tokens may flip. Per prompt: whether the outputs agree, where they first part, the
largest logprob difference before that, and the top-two gap where they part.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import scout_slice  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: scout-slice --layers 4 in /tmp, written if missing)")
    ap.add_argument("--prompts", type=int, default=16, help="random prompts (default 16)")
    ap.add_argument("--background", type=int, default=16, help="requests decoding beside the second run (default 16)")
    ap.add_argument("--prompt-len", type=int, default=8000, help="prompt tokens (default 8000)")
    ap.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per run (default 32)")
    ap.add_argument("--device", default="cuda", help="default cuda (cpu works with a small --model)")
    args = ap.parse_args()

    from engine.llm import LLM
    from engine.sampling import SamplingParams

    model = scout_slice(args.model)
    llm = LLM(model, device=args.device, ops="triton" if args.device.startswith("cuda") else "torch",
              num_blocks=8192, max_model_len=args.prompt_len + 2048, max_num_batched_tokens=max(8192, args.prompt_len),
              enable_prefix_caching=False)
    eng = llm.engine
    rng = random.Random(0)

    def run(prompt, background: int, tag: str):
        busy = SamplingParams(max_tokens=100_000 // 64, temperature=0, ignore_eos=True)
        for j in range(background):
            eng.add_request([rng.randrange(200000) for _ in range(64)], busy, f"{tag}-bg{j}")
        for _ in range(3):  # they are decoding when the prompt comes
            eng.step()
        eng.add_request(prompt, SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True,
                                               logprobs=2), tag)
        out = None
        while out is None:
            out = next((o for o in eng.step() if o.request_id == tag and o.finished), None)
        for j in range(background):
            eng.abort(f"{tag}-bg{j}")
        while eng.has_work:
            eng.step()
        return out

    same = first_same = 0
    print(f"\n{args.prompts} prompts of {args.prompt_len} tokens, {args.max_tokens} greedy tokens, alone vs beside "
          f"{args.background} decoding requests")
    print("| prompt | identical | first differs at | max abs logprob diff before | top two there |\n|---|---|---|---|---|")
    for i in range(args.prompts):
        prompt = [rng.randrange(200000) for _ in range(args.prompt_len)]
        a, b = run(prompt, 0, f"alone-{i}"), run(prompt, args.background, f"beside-{i}")
        same += a.token_ids == b.token_ids
        first_same += a.token_ids[:1] == b.token_ids[:1]
        at = next((j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
        diffs = [abs(x[0] - y[0]) for x, y in zip(a.logprobs, b.logprobs)]
        before = diffs[:at] if at is not None else diffs
        top = a.logprobs[at][1] if at is not None else None
        top_s = "" if top is None else ", ".join(f"{t}: {lp:.3f}" for t, lp in top)
        print(f"| {i} | {a.token_ids == b.token_ids} | {'' if at is None else at} | "
              f"{max(before or [0.0]):.2e} | {top_s} |")
    print(f"\nidentical: {same}/{args.prompts}; first token the same: {first_same}/{args.prompts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
