"""Disaggregated against colocated serving on two GPUs, through the whole stack
(gateway, Redis, services), swept over request rates: the issue-6 benchmark.

    python bench/serve_sweep.py --input-len 8192 --output-len 128 --rates 1,2,4,8 [--model DIR]

Configurations, each started with `launcher.serve.Stack` (what `tandem serve` runs):
  disagg     prefill on cuda:0, decode on cuda:1, KV over NCCL; the prefill instance takes
             --prefill-chunk tokens a step (it has no decodes to protect)
  colocated  two independent decode instances, cuda:0 and cuda:1, each prefilling its own
             prompts (the gateway balances them)

The SLO comes from measured single-request latencies: each configuration first serves
requests one at a time; TTFT p90 <= 4x and TPOT p90 <= 1.5x the better configuration's
unloaded p90. Goodput (requests/s meeting both) is computed from every request's own
TTFT and TPOT. Prints one table; writes the results (per-request arrays included) to
$OUT/sweep-IN-OUT.json for plotting with `loadtest.plots.plot_sweep`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench(url: str, input_len: int, output_len: int, n: int, rate: str, concurrency: int | None, seed: int) -> dict:
    from loadtest.bench import run_benchmark
    from loadtest.cli import config_from_argv

    argv = ["--base-url", url, "--num-prompts", str(n), "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--request-rate", rate, "--seed", str(seed),
            "--vocab-size", "200000", "--disable-tqdm", "--request-timeout", "600"]
    if concurrency:
        argv += ["--max-concurrency", str(concurrency)]
    return run_benchmark(config_from_argv(argv))


def goodput(res: dict, slo_ttft_ms: float, slo_tpot_ms: float) -> float:
    good = sum(1 for t, p, e in zip(res["ttfts"], res["tpots"], res["errors"])
               if not e and t * 1e3 <= slo_ttft_ms and (p or 0) * 1e3 <= slo_tpot_ms)
    return good / res["duration"]


def p90(values: list[float]) -> float:
    import numpy as np

    vals = [v for v in values if v]
    return float(np.percentile(vals, 90)) * 1e3 if vals else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: scout-slice --layers 4, made in models/ if missing)")
    ap.add_argument("--input-len", type=int, default=8192, help="prompt tokens (default 8192)")
    ap.add_argument("--output-len", type=int, default=128, help="tokens generated per request (default 128)")
    ap.add_argument("--rates", default="1,2,4,8", help="request rates (req/s), comma-separated")
    ap.add_argument("--requests", type=int, default=32, help="requests per rate (default 32)")
    ap.add_argument("--unloaded", type=int, default=6, help="one-at-a-time requests for the SLO (default 6)")
    ap.add_argument("--configs", default="disagg,colocated", help="which configurations, in order")
    ap.add_argument("--service-args", default="--max-model-len 10240 --max-num-batched-tokens 2048 "
                                              "--gpu-memory-utilization 0.8",
                    help="flags for every prefill and decode service")
    ap.add_argument("--prefill-chunk", type=int, default=8192,
                    help="disagg: --max-num-batched-tokens of the prefill instance (default 8192)")
    ap.add_argument("--cpu", action="store_true", help="smoke test on CPU (tcp KV), e.g. with a tiny model")
    args = ap.parse_args()

    import shlex

    from launcher.serve import Stack

    model = args.model or str(ROOT / "models" / "scout-slice-L4")
    if not (Path(model) / "config.json").is_file():
        from launcher.make_model import make_model

        t = time.time()
        make_model("scout-slice", model, seed=0, layers=4)
        print(f"made {model} in {time.time() - t:.0f} s", flush=True)
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    service_args = shlex.split(args.service_args) + ["--log-level", "WARNING"]
    gpu = (lambda i: "cpu") if args.cpu else (lambda i: f"cuda:{i}")
    kv = "tcp" if args.cpu else "nccl"
    stacks = {
        "disagg": dict(prefill=1, decode=1, prefill_devices=[gpu(0)], decode_devices=[gpu(1)], kv_transport=kv,
                       prefill_args=["--max-num-batched-tokens", str(args.prefill_chunk)]),
        "colocated": dict(prefill=0, decode=2, decode_devices=[gpu(0), gpu(1)], kv_transport=kv),
    }
    results: dict[str, dict] = {}
    for name in args.configs.split(","):
        t = time.time()
        with Stack(model=model, service_args=service_args, heartbeat_ttl=10.0, log_dir=out_dir / f"logs-{name}",
                   **stacks[name]) as st:
            print(f"[{name}] stack up in {time.time() - t:.0f} s", flush=True)
            bench(st.base_url, args.input_len, args.output_len, 2, "inf", 1, seed=99)  # warm-up: CUDA, NCCL
            unloaded = bench(st.base_url, args.input_len, args.output_len, args.unloaded, "inf", 1, seed=1)
            runs = []
            for i, rate in enumerate(args.rates.split(",")):
                r = bench(st.base_url, args.input_len, args.output_len, args.requests, rate, None, seed=100 + i)
                r["request_rate"] = float(rate)
                runs.append(r)
                print(f"[{name}] rate {rate}: {r['completed']} ok, {r['failed']} failed, "
                      f"{r['request_throughput']:.2f} req/s, TTFT p90 {r['p90_ttft_ms']:.0f} ms, "
                      f"TPOT p90 {r['p90_tpot_ms']:.1f} ms", flush=True)
        results[name] = {"unloaded": unloaded, "runs": runs}

    ttft0 = min(p90(r["unloaded"]["ttfts"]) for r in results.values())
    tpot0 = min(p90(r["unloaded"]["tpots"]) for r in results.values())
    slo_ttft, slo_tpot = 4 * ttft0, 1.5 * tpot0
    print(f"\n{args.input_len} in / {args.output_len} out, {args.requests} requests per rate")
    print(f"unloaded p90 (best config): TTFT {ttft0:.0f} ms, TPOT {tpot0:.1f} ms -> "
          f"SLO TTFT <= {slo_ttft:.0f} ms, TPOT <= {slo_tpot:.1f} ms")
    for name, r in results.items():
        u = r["unloaded"]
        print(f"  {name:<10} unloaded TTFT p90 {p90(u['ttfts']):.0f} ms, TPOT p90 {p90(u['tpots']):.1f} ms")
    print(f"\n{'config':<10} {'rate':>5} {'ok':>4} {'req/s':>6} {'goodput':>8} {'TTFT p50':>9} {'TTFT p90':>9} "
          f"{'TPOT p50':>9} {'TPOT p90':>9} {'ITL p99':>8}")
    for name, r in results.items():
        for run in r["runs"]:
            run["request_goodput"] = goodput(run, slo_ttft, slo_tpot)
            print(f"{name:<10} {run['request_rate']:>5g} {run['completed']:>4} {run['request_throughput']:>6.2f} "
                  f"{run['request_goodput']:>8.2f} {run['median_ttft_ms']:>9.0f} {run['p90_ttft_ms']:>9.0f} "
                  f"{run['median_tpot_ms']:>9.1f} {run['p90_tpot_ms']:>9.1f} {run['p99_itl_ms']:>8.1f}")
    best = {name: max(run["request_goodput"] for run in r["runs"]) for name, r in results.items()}
    if "disagg" in best and "colocated" in best and best["colocated"] > 0:
        print(f"\nbest goodput: disagg {best['disagg']:.2f} req/s, colocated {best['colocated']:.2f} req/s "
              f"-> {best['disagg'] / best['colocated']:.2f}x")
    for r in results.values():
        for run in [r["unloaded"], *r["runs"]]:
            run.pop("generated_texts", None)
    path = out_dir / f"sweep-{args.input_len}-{args.output_len}.json"
    path.write_text(json.dumps({"slo_ttft_ms": slo_ttft, "slo_tpot_ms": slo_tpot, "args": vars(args),
                                "results": results}))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
