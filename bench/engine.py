"""Engine benchmark (one GPU, one device call): tandem's engine against transformers'
`generate` on the same checkpoint, with the ceilings measured in the same run.

    python bench/engine.py [--model DIR] [--layers 4] [--ops torch,triton] [--json OUT.json]

Without --model it writes `scout-slice --layers N` (random bf16 weights at Scout's real
dimensions) to /tmp first. It prints one table:
  - decode tok/s at each --batches size (steady state, prefill excluded) for both
    engines; on CUDA tandem runs with async scheduling (the next step launched while the
    GPU runs this one) and each size is timed again without it;
  - the decode roofline: weight bytes a step must read (attention, router, shared
    expert, the experts the batch touches, lm_head) over the measured copy bandwidth;
  - prefill time for an 8k-token prompt, with MFU against the measured bf16 matmul rate;
  - with several --ops, a column each, and whether their greedy tokens agree on 8 prompts
    x 64 tokens (where they part, the top-2 logit gap there: a near-tie or a real bug).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import scout_slice  # noqa: E402
from engine.config import ModelConfig  # noqa: E402


def cuda_time(fn, reps: int = 10, warmup: int = 3) -> float:
    """Median seconds of fn() measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def print_table(rows: list[tuple]) -> None:
    """Rows of cells (the first is the header) as aligned ' | '-separated columns."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def divergence(a: list[int], b: list[int], gaps_a: list[float], gaps_b: list[float], name_a: str,
               name_b: str) -> tuple[int, str]:
    """(how many leading tokens of two greedy outputs agree, and where they part the
    top-2 logit gap of each side: a near-tie, or a real difference)."""
    same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    if same == len(a):
        return same, ""
    return same, f"; at token {same} the top-2 logit gap is {gaps_a[same]:.3f} ({name_a}), {gaps_b[same]:.3f} ({name_b})"


def ceilings() -> dict:
    n = 1 << 29  # 1 GiB of bf16
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x))
    copy_bw = 2 * x.numel() * 2 / t  # bytes read + written
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b)
    return {"copy_GBps": copy_bw / 1e9, "matmul_TFLOPs": 2 * 8192**3 / t / 1e12}


def weight_bytes_per_step(cfg: ModelConfig, batch: int, elem: int = 2) -> tuple[float, float]:
    """(bytes a decode step must read, active params per token). Experts touched by a
    batch of top-1 tokens: E * (1 - (1 - 1/E)^B) under uniform routing."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    expert = 3 * h * cfg.intermediate_size
    total, active = 0.0, 0.0
    for i in range(cfg.num_layers):
        if i in cfg.moe_layers:
            e = cfg.num_experts
            touched = e * (1 - (1 - 1 / e) ** batch)
            total += attn + h * e + expert * (1 + touched)
            active += attn + h * e + 2 * expert
        else:
            mlp = 3 * h * cfg.intermediate_size_mlp
            total += attn + mlp
            active += attn + mlp
    head = cfg.vocab_size * h
    return (total + head) * elem, active + head


CHECK_PROMPTS = [list(range(1000, 1000 + n)) for n in (17, 130)]  # greedy agreement check
OPS_PROMPTS = [[(7919 * i + 104729 * j) % 200000 for j in range(n)]  # torch vs triton ops: 8 x 64 tokens
               for i, n in enumerate((9, 33, 64, 100, 257, 500, 1000, 2048))]


def bench_transformers(model_dir: str, prompt_len: int, batches: list[int], new_tokens: int, prefill_len: int) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda")
    model.eval()
    out = {"greedy": []}
    with torch.no_grad():
        for p in CHECK_PROMPTS:
            g = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=16, min_new_tokens=16,
                               do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
            out["greedy"].append(g.sequences[0, len(p):].tolist())
            top2 = [s[0].float().topk(2).values for s in g.scores]
            out.setdefault("gaps", []).append([float(t[0] - t[1]) for t in top2])
        long = torch.randint(0, 200000, (1, prefill_len), device="cuda")
        out["prefill_s"] = cuda_time(lambda: model(long, logits_to_keep=1), reps=3, warmup=1)
    print(f"  transformers prefill {prefill_len}: {out['prefill_s'] * 1e3:.1f} ms", flush=True)
    for b in batches:
        ids = torch.randint(0, 200000, (b, prompt_len), device="cuda")

        def gen(n):
            with torch.no_grad():
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        gen(2)  # warm-up
        t1 = cuda_time(lambda: gen(1), reps=2, warmup=0)
        tn = cuda_time(lambda: gen(new_tokens + 1), reps=2, warmup=0)
        out[b] = b * new_tokens / (tn - t1)
        print(f"  transformers batch {b}: {out[b]:.1f} tok/s", flush=True)
    del model
    torch.cuda.empty_cache()
    return out


def bench_tandem(model_dir: str, ops: str, prompt_len: int, batches: list[int], steps: int, prefill_len: int,
                 kv_cache_dtype: str = "auto") -> dict:
    from engine.llm import LLM
    from engine.sampling import SamplingParams

    llm = LLM(model_dir, device="cuda", dtype="bfloat16", max_model_len=max(8192, prefill_len + 1024), max_num_seqs=max(batches),
              max_num_batched_tokens=max(prefill_len, prompt_len * max(batches)), enable_prefix_caching=False, ops=ops, kv_cache_dtype=kv_cache_dtype)
    eng = llm.engine
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=2 * steps + 8, temperature=0, ignore_eos=True)
    out = {"decode": {}, "prefill_s": None}
    llm.generate(torch.randint(0, 200000, (32,), generator=g).tolist(), SamplingParams(max_tokens=4))  # warm-up
    greedy = llm.generate(CHECK_PROMPTS, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2))
    out["greedy"] = [o.token_ids for o in greedy]
    out["gaps"] = [[lp[1][0][1] - lp[1][1][1] for lp in o.logprobs] for o in greedy]
    long = llm.generate(OPS_PROMPTS, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, logprobs=2))
    out["ops_greedy"] = [o.token_ids for o in long]
    out["ops_gaps"] = [[lp[1][0][1] - lp[1][1][1] for lp in o.logprobs] for o in long]
    for b in batches:
        for _ in range(b):
            eng.add_request(torch.randint(0, 200000, (prompt_len,), generator=g).tolist(), params)
        while any(not r.output_token_ids for r in eng.scheduler.requests.values()):
            eng.step()  # prefill everyone; from here each step is a pure decode step

        def timed() -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                eng.step()
            torch.cuda.synchronize()
            return b * steps / (time.perf_counter() - t0)

        out["decode"][b] = timed()
        print(f"  tandem batch {b}: {out['decode'][b]:.1f} tok/s", flush=True)
        if eng.async_scheduling:  # the same steps, each waiting for its tokens before the next
            eng.async_scheduling = False
            out.setdefault("decode_sync", {})[b] = timed()
            eng.async_scheduling = True
            print(f"  tandem batch {b}, async scheduling off: {out['decode_sync'][b]:.1f} tok/s", flush=True)
        for rid in list(eng.scheduler.requests):
            eng.abort(rid)
    times = []
    for _ in range(6):  # single steps of ~50 ms swing by up to 50% on a card: median of five after warm-up
        eng.add_request(torch.randint(0, 200000, (prefill_len,), generator=g).tolist(), SamplingParams(max_tokens=1))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.step()  # the whole prompt in one step, plus the first token
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out["prefill_s"] = statistics.median(times[1:])
    print(f"  tandem prefill {prefill_len}: {out['prefill_s'] * 1e3:.1f} ms", flush=True)
    del llm, eng
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: write scout-slice to /tmp/scout-slice-L<layers>)")
    ap.add_argument("--layers", type=int, default=4, help="layers of scout-slice to write (default 4)")
    ap.add_argument("--ops", default="torch,triton",
                    help="engine ops backends to time, comma-separated (default torch,triton; triton replays "
                         "decode steps from CUDA graphs)")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens for the decode runs")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed per batch size")
    ap.add_argument("--hf-new-tokens", type=int, default=16, help="tokens transformers generates per timing")
    ap.add_argument("--prefill-len", type=int, default=8192, help="prompt tokens for the prefill timing")
    ap.add_argument("--batches", default="1,8,32,64", help="decode batch sizes, comma-separated")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                    help="tandem's KV cache: the model dtype (auto) or fp8 e4m3 (the roofline still counts "
                         "weight bytes only)")
    ap.add_argument("--skip-hf", action="store_true", help="do not time transformers")
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args()
    batches = [int(x) for x in args.batches.split(",")]

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    ceil = ceilings()
    print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    model_dir = scout_slice(args.model, args.layers)
    cfg = ModelConfig.from_dir(model_dir)

    hf = {} if args.skip_hf else bench_transformers(model_dir, args.prompt_len, batches, args.hf_new_tokens,
                                                    args.prefill_len)
    all_ops = args.ops.split(",")
    runs = {}
    for ops in all_ops:
        print(f"tandem --ops {ops}", flush=True)
        runs[ops] = bench_tandem(model_dir, ops, args.prompt_len, batches, args.steps, args.prefill_len,
                                 args.kv_cache_dtype)

    bw = ceil["copy_GBps"] * 1e9
    rows = []
    for b in batches:
        nbytes, _ = weight_bytes_per_step(cfg, b)
        roof = b * bw / nbytes
        for ops, ours in runs.items():
            t = ours["decode"][b]
            rows.append((f"decode batch {b}", ops, f"{t:,.1f} tok/s", f"{hf.get(b, float('nan')):,.1f} tok/s",
                         f"{roof:,.0f} tok/s ({nbytes / 1e9:.2f} GB/step)", f"{100 * t / roof:.1f}%",
                         f"{t / hf[b]:.1f}x" if b in hf else "-"))
            if b in ours.get("decode_sync", {}):
                t = ours["decode_sync"][b]
                rows.append((f"decode batch {b}, no async scheduling", ops, f"{t:,.1f} tok/s", "-", "",
                             f"{100 * t / roof:.1f}%", "-"))
    _, active = weight_bytes_per_step(cfg, 1)
    head, n = cfg.vocab_size * cfg.hidden_size, args.prefill_len
    # Linear layers for every token (lm_head only for the last), plus causal attention
    # (QK^T and PV over the lower triangle: 2 * 2 * n^2/2 * heads * head_dim per layer).
    flops = 2 * (active - head) * n + 2 * head + 2 * n * n * cfg.num_heads * cfg.head_dim * cfg.num_layers
    floor_s = flops / (ceil["matmul_TFLOPs"] * 1e12)
    hp = hf.get("prefill_s")
    for ops, ours in runs.items():
        p = ours["prefill_s"]
        rows.append((f"prefill {args.prefill_len}", ops, f"{p * 1e3:,.1f} ms", f"{hp * 1e3:,.1f} ms" if hp else "-",
                     f"{floor_s * 1e3:,.1f} ms (matmul FLOPs)", f"{100 * floor_s / p:.1f}% MFU",
                     f"{hp / p:.1f}x" if hp else "-"))
    head = ("measure", "ops", "tandem", "transformers", "ceiling", "tandem/ceiling", "tandem/transformers")
    print()
    print_table([head] + rows)
    ours = runs[all_ops[0]]
    if len(runs) > 1:
        other = runs[all_ops[1]]
        for i, (a, b) in enumerate(zip(ours["ops_greedy"], other["ops_greedy"])):
            same, gap = divergence(a, b, ours["ops_gaps"][i], other["ops_gaps"][i], all_ops[0], all_ops[1])
            print(f"ops check prompt {i} ({len(OPS_PROMPTS[i])} tokens): first {same}/{len(a)} greedy tokens of "
                  f"{all_ops[0]} and {all_ops[1]} identical{gap}")
    if hf:
        for i, (a, b) in enumerate(zip(hf["greedy"], ours["greedy"])):
            same, gap = divergence(a, b, hf["gaps"][i], ours["gaps"][i], "transformers", "tandem")
            print(f"greedy check prompt {i}: first {same}/16 tokens identical to transformers (bf16){gap}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ceilings": ceil, "transformers": hf, "tandem": runs,
                                               "device": torch.cuda.get_device_name()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
