"""Disaggregated vs colocated time-to-first-token on two GPUs, with the real services.

    python bench/disagg.py [--model DIR] [--prompt-len 8000] [--requests 8] [--ops triton] [--cpu|--one-gpu]

Prefill service on cuda:0, decode service on cuda:1, KV over the nccl backend, model
scout-slice --layers 4 (written to /tmp if --model is not given). With --one-gpu both
services share cuda:0 and the KV goes over tcp (through host memory): the first token
does not wait for the KV, so TTFT still shows the services' own overheads. For each prompt:
  - disaggregated: Generate on decode with prefill_address = the prefill service;
  - colocated: the same decode service prefills it itself (no prefill_address).
TTFT is measured by the client (request sent -> first token received); the handoff is
the gap between the first and the second token of a disaggregated request (prefill
done -> first decode step), beside the steady decode step time.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EARLY_PREFILL_TOKENS = 1024  # decode's --early-prefill-tokens default: longer prompts go to prefill first
sys.path.insert(0, str(ROOT))

from bench import scout_slice  # noqa: E402


def start(module: str, *args: str) -> tuple[subprocess.Popen, str, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{module} exited:\n{''.join(log[-40:])}")
        log.append(line)
        m = re.search(r"listening on (\S+?):(\d+)", line)
        if m:
            address = f"{m.group(1)}:{m.group(2)}"
            break
    threading.Thread(target=lambda: [log.append(x) for x in proc.stdout], daemon=True).start()
    return proc, address, log


class GpuWarmer:
    """Keeps the given GPUs busy for `ms` milliseconds, then returns with them idle: run
    right before a timed request, every mode starts from the same (busy) power state."""

    def __init__(self, devices: list[str], ms: float):
        import torch

        self.torch, self.seconds = torch, ms / 1e3
        self.xs = [torch.randn(2048, 2048, device=d) for d in devices]

    def __call__(self) -> None:
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            for x in self.xs:
                self.torch.mm(x, x)
            for x in self.xs:
                self.torch.cuda.synchronize(x.device)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: scout-slice --layers 4 in /tmp)")
    ap.add_argument("--prompt-len", type=int, default=8000, help="prompt tokens (default 8000)")
    ap.add_argument("--requests", type=int, default=8, help="timed requests per mode (default 8)")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens generated per request")
    ap.add_argument("--ops", default="triton", choices=["torch", "triton"],
                    help="engine ops of both services (default triton: Triton kernels and decode CUDA graphs)")
    ap.add_argument("--cpu", action="store_true",
                    help="both services on the CPU, KV over tcp (needs --model: a small one, e.g. made by "
                         "`python -m launcher.make_model tiny-llama4 DIR`); measures the service overheads "
                         "without a GPU")
    ap.add_argument("--one-gpu", action="store_true",
                    help="every service on cuda:0, KV over tcp (NCCL cannot pair a GPU with itself): for a "
                         "machine with one GPU; the transfer is slower, but the first token does not wait for it")
    ap.add_argument("--colocated-on-prefill-gpu", action="store_true",
                    help="also time colocated TTFT on the prefill's GPU (a decode service on cuda:0 beside the "
                         "prefill service): two GPUs of one kind can differ by a few percent, and this baseline "
                         "runs on the GPU that computes the disaggregated prefill")
    ap.add_argument("--background", type=int, default=0, metavar="N",
                    help="keep N short requests generating on each decode service while timing (64-token prompts "
                         "prefilled there, 256 tokens each, restarted as they end): the decode engines then run "
                         "steps all the time, as under load, and a request that reserves first waits for the "
                         "step in flight")
    ap.add_argument("--reserve-first-too", action="store_true",
                    help="also time the disaggregated path with decode reserving the blocks before it calls prefill "
                         "(a second decode service with --early-prefill-tokens 0, same GPU), for every prompt")
    ap.add_argument("--destination-delay", type=float, default=0.0, metavar="SECONDS",
                    help="the prompt-first decode waits this long between reserving and SetDestination "
                         "(--test-destination-delay): prefill computes layers before their blocks are known, "
                         "defers them and pins their sources; outputs must not change")
    ap.add_argument("--warm-gpus-ms", type=float, default=0.0, metavar="MS",
                    help="before each timed request, keep the services' GPUs busy this long (matmuls from this "
                         "client): a GPU that idled runs the next prefill up to ~35 ms slower (bench/idle_gpu.py), "
                         "and the modes would differ by which GPU idled (default 0: off; e.g. 30)")
    ap.add_argument("--trace", metavar="CSV",
                    help="write every timed request (mode, index, wall-clock send time, TTFT) to this file, to "
                         "line requests up with a GPU clock log (e.g. nvidia-smi --query-gpu=timestamp,clocks.sm)")
    args = ap.parse_args()
    if args.cpu and not args.model:
        ap.error("--cpu needs --model (scout-slice does not fit a CPU run)")
    if args.cpu and args.one_gpu:
        ap.error("--cpu and --one-gpu exclude each other")
    if args.warm_gpus_ms < 0 or (args.warm_gpus_ms and args.cpu):
        ap.error("--warm-gpus-ms: must be >= 0, and needs GPUs")
    if args.destination_delay and args.prompt_len < EARLY_PREFILL_TOKENS:
        ap.error(f"--destination-delay: prompts under {EARLY_PREFILL_TOKENS} tokens reserve first (decode's "
                 "--early-prefill-tokens), so nothing would be late")

    import grpc

    from protos import decode_pb2, decode_pb2_grpc
    from protos.convert import pack_token_ids, sampling_to_pb
    from protos import grpc_server
    from protos.grpc_server import wait_healthy
    from engine.sampling import SamplingParams

    model = scout_slice(args.model)
    common = ["--model", model, "--port", "0", "--kv-transport", "tcp" if args.cpu or args.one_gpu else "nccl",
              "--max-model-len", "16384", "--max-num-batched-tokens", "8192", "--no-prefix-caching",
              "--log-level", "WARNING", "--ops", "torch" if args.cpu else args.ops]
    if args.cpu:
        common += ["--num-blocks", str(2 * -(-16384 // 16))]
    elif args.one_gpu:  # a share of the GPU is a share of its total memory: a fixed cache for each service
        common += ["--num-blocks", "4096"]
    else:
        common += ["--gpu-memory-utilization", "0.5"]
    devices = ("cpu", "cpu") if args.cpu else ("cuda:0", "cuda:0") if args.one_gpu else ("cuda:0", "cuda:1")
    # INFO: each service logs one line per request with where its time went (parsed below).
    p, p_addr, p_log = start("prefill_service", *common, "--device", devices[0], "--log-level", "INFO")
    procs = [p]
    decode = [*common, "--device", devices[1], "--local-prefill-threshold", "0", "--log-level", "INFO"]
    shared_gpu = args.reserve_first_too or args.colocated_on_prefill_gpu
    if shared_gpu and not args.cpu and not args.one_gpu:  # two services on one GPU: a fixed cache per decode
        decode += ["--num-blocks", "4096"]
    delay = ["--test-destination-delay", str(args.destination_delay)] if args.destination_delay else []
    d, d_addr, d_log = start("decode_service", *decode, *delay)
    procs.append(d)
    stubs = {"disaggregated": d_addr}
    baselines = {}
    if args.reserve_first_too:
        d2, d2_addr, _ = start("decode_service", *decode, "--early-prefill-tokens", "0")
        procs.append(d2)
        stubs["disaggregated, reserve first"] = d2_addr
    if args.colocated_on_prefill_gpu:
        d3, d3_addr, _ = start("decode_service", *decode, "--device", devices[0])
        procs.append(d3)
        baselines["colocated on the prefill's GPU"] = d3_addr
    try:
        for address in [p_addr, *stubs.values(), *baselines.values()]:
            wait_healthy(address)
        stubs = {k: decode_pb2_grpc.DecodeServiceStub(grpc.insecure_channel(a)) for k, a in stubs.items()}
        baselines = {k: decode_pb2_grpc.DecodeServiceStub(grpc.insecure_channel(a)) for k, a in baselines.items()}
        stub = stubs["disaggregated"]
        sp = sampling_to_pb(SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True))
        rng = random.Random(0)

        sent_at: dict[str, float] = {}  # request id -> when the client sent it (CLOCK_MONOTONIC)

        warm = GpuWarmer(sorted(set(devices)), args.warm_gpus_ms) if args.warm_gpus_ms else None

        def run(prompt, prefill_address, rid="", via=None):
            if warm is not None:
                warm()
            req = decode_pb2.GenerateRequest(packed_prompt_token_ids=pack_token_ids(array("I", prompt)), sampling=sp,
                                             prefill_address=prefill_address, request_id=rid)
            t0 = time.perf_counter()
            sent_at[rid] = t0
            wall = time.time()  # for --trace, beside other clocks' logs
            stamps, tokens, last = [], [], None
            for r in (via or stub).Generate(req, timeout=600):
                stamps.append(time.perf_counter() - t0)
                tokens.extend(r.token_ids)
                last = r
            return stamps, tokens, last, wall

        for mode in ("", p_addr):  # warm-up both paths (NCCL pair set-up, kernels)
            for via in stubs.values():
                run([rng.randrange(200000) for _ in range(args.prompt_len)], mode, via=via)
        for via in baselines.values():
            run([rng.randrange(200000) for _ in range(args.prompt_len)], "", via=via)
        stop = threading.Event()

        def keep_busy(via, seed):
            r = random.Random(seed)
            busy = sampling_to_pb(SamplingParams(max_tokens=256, temperature=0, ignore_eos=True))
            while not stop.is_set():
                req = decode_pb2.GenerateRequest(sampling=busy, packed_prompt_token_ids=pack_token_ids(
                    array("I", [r.randrange(200000) for _ in range(64)])))
                for _ in via.Generate(req, timeout=600):
                    if stop.is_set():
                        break

        busy_threads = [threading.Thread(target=keep_busy, args=(via, 1000 * j + n), daemon=True)
                        for j, via in enumerate([*stubs.values(), *baselines.values()]) for n in range(args.background)]
        for t in busy_threads:
            t.start()
        time.sleep(2.0 if busy_threads else 0.0)  # let the batches fill
        grpc_server.quiet_gc()  # as the services do: a collection must not land inside a timed request unseen
        res = {"colocated": [], **{k: [] for k in baselines}, **{k: [] for k in stubs}}
        same = 0
        mismatches: list[str] = []
        for i in range(args.requests):
            prompt = [rng.randrange(200000) for _ in range(args.prompt_len)]
            c = run(prompt, "")
            res["colocated"].append(c)
            for k, via in baselines.items():
                res[k].append(run(prompt, "", via=via))
            for k, via in stubs.items():
                g = run(prompt, p_addr, f"disagg-{i}" if k == "disaggregated" else f"{k[-5:]}-{i}", via=via)
                res[k].append(g)
                same += c[1] == g[1]
                if c[1] != g[1]:
                    at = next(j for j, (a, b) in enumerate(zip(c[1] + [None], g[1] + [None])) if a != b)
                    mismatches.append(f"{k} request {i}: first differs at token {at} of {len(c[1])}")
                assert g[2].num_transferred_tokens == args.prompt_len, g[2]
        stop.set()
        if args.trace:
            with open(args.trace, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["mode", "index", "wall_time", "ttft_ms"])
                for k, v in res.items():
                    for i, (s, _, _, wall) in enumerate(v):
                        w.writerow([k, i, f"{wall:.6f}", f"{1e3 * s[0]:.3f}"])
        ttft = {k: [s[0] for s, *_ in v] for k, v in res.items()}
        handoff = [s[1] - s[0] for s, *_ in res["disaggregated"]]
        step = [statistics.median([b - a for a, b in zip(s[1:], s[2:])]) for s, *_ in res["disaggregated"]]
        c50 = statistics.median(ttft["colocated"])
        print(f"\nprompt {args.prompt_len} tokens, {args.requests} requests per mode"
              + (f", {args.background} background requests generating on each decode" if args.background else "")
              + f"; greedy outputs identical in {same}/{args.requests * len(stubs)}")
        for m in mismatches:
            print(f"  greedy output differs from colocated: {m}")
        if args.destination_delay:
            print(f"  (disaggregated: decode sent each request's blocks {1e3 * args.destination_delay:.0f} ms late, "
                  "on purpose: its TTFT includes that wait)")
        print("| measure | p50 | p99 |\n|---|---|---|")
        for k in res:
            print(f"| TTFT {k} | {1e3 * statistics.median(ttft[k]):.1f} ms | {1e3 * pct(ttft[k], 0.99):.1f} ms |")
        for k in stubs:
            print(f"| TTFT {k} / colocated | {statistics.median(ttft[k]) / c50:.3f} | |")
            for b in baselines:
                print(f"| TTFT {k} / {b} | {statistics.median(ttft[k]) / statistics.median(ttft[b]):.3f} | |")
        print(f"| handoff (first -> second token, disaggregated) | {1e3 * statistics.median(handoff):.1f} ms | "
              f"{1e3 * pct(handoff, 0.99):.1f} ms |")
        print(f"| decode step (steady) | {1e3 * statistics.median(step):.1f} ms | |")
        # Where the disaggregated TTFT goes: decode's wait on the Prefill RPC (prefill's
        # queueing + compute + the transfer's tail + finish round trip), the rest is decode's.
        waits = [r[2].prefill_seconds for r in res["disaggregated"]]
        print(f"| disaggregated: decode waiting on Prefill RPC | {1e3 * statistics.median(waits):.1f} ms | "
              f"{1e3 * pct(waits, 0.99):.1f} ms |")
        rest = [s[0] - last.prefill_seconds for s, _, last, _ in res["disaggregated"]]
        print(f"| disaggregated: TTFT minus that wait | {1e3 * statistics.median(rest):.1f} ms | "
              f"{1e3 * pct(rest, 0.99):.1f} ms |")
        time.sleep(0.5)  # the services' last log lines
        parts = [m.groups() for m in (re.search(r"reserve \+ request ([\d.]+) ms, Prefill RPC ([\d.]+) ms(?: \([^)]*\))?, "
                                                r"transfer close ([\d.]+) ms, first token out ([\d.]+) ms", x) for x in d_log) if m]
        pushed = [float(m.group(1)) for m in (re.search(r"pushed from position \d+ in ([\d.]+) ms", x) for x in p_log) if m]
        names = ("decode: Generate in -> Prefill RPC sent", "decode: Prefill RPC", "decode: close the transfer",
                 "decode: publish the first token")
        for k, name in enumerate(names):
            xs = [float(g[k]) for g in parts[-args.requests:]]
            if xs:
                print(f"| {name} | {statistics.median(xs):.1f} ms | {pct(xs, 0.99):.1f} ms |")
        eng = [tuple(map(float, m.groups())) for m in (re.search(
            r"prefill disagg-\d+:.*queued -> first token ([\d.]+) ms \(its first step began after ([\d.]+) ms; "
            r"the KV push took ([\d.]+) ms", x) for x in p_log) if m]
        for k, name in enumerate(("prefill: queued -> first token", "prefill: queued -> its first step begins",
                                  "prefill: the KV push, on the engine thread")):
            xs = [e[k] for e in eng]
            if xs:
                print(f"| {name} | {statistics.median(xs):.2f} ms | {pct(xs, 0.99):.2f} ms |")
        if pushed:
            xs = pushed[-args.requests:]
            print(f"| prefill service: request in -> transfer DONE | {statistics.median(xs):.1f} ms | "
                  f"{pct(xs, 0.99):.1f} ms |")
        # One clock for all three processes (perf_counter is CLOCK_MONOTONIC on Linux):
        # the way of a disaggregated request from the client to its first token.
        d_at = {m.group(1): (float(m.group(2)), float(m.group(3)), float(m.group(4))) for m in (
            re.search(r"request (\S+):.*reserve \+ request ([\d.]+) ms.*CLOCK_MONOTONIC: sent ([\d.]+), answer ([\d.]+)",
                      x) for x in d_log) if m}
        p_at = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in (
            re.search(r"prefill (\S+):.*CLOCK_MONOTONIC: in ([\d.]+), answer ([\d.]+)", x) for x in p_log) if m}
        hops = []
        for i, (s, *_) in enumerate(res["disaggregated"]):
            rid = f"disagg-{i}"
            if rid in d_at and rid in p_at:
                reserve_ms, d_sent, d_answer = d_at[rid]
                p_in, p_answer = p_at[rid]
                t0 = sent_at[rid]
                hops.append(((d_sent - 1e-3 * reserve_ms) - t0, p_in - d_sent, p_answer - p_in, d_answer - p_answer,
                             t0 + s[0] - d_answer))
        if hops:
            names = ("client -> decode's Generate", "decode -> prefill's Prefill (gRPC, one way)",
                     "prefill's handler (in -> answer)", "prefill -> decode (the answer, one way)",
                     "decode's answer -> client's first token")
            for k, name in enumerate(names):
                xs = [h[k] for h in hops]
                print(f"| on one clock: {name} | {1e3 * statistics.median(xs):.2f} ms | {1e3 * pct(xs, 0.99):.2f} ms |")
        # The shape of each mode's TTFT (two runs of the same code have shown p50s of 49
        # and 72 ms), and the services' garbage-collection pauses over 2 ms.
        for k, xs in ttft.items():
            print(f"  TTFT {k}, sorted (ms): " + " ".join(f"{1e3 * x:.0f}" for x in sorted(xs)))
        pauses = list(grpc_server.gc_pauses)
        print(f"  client gc pauses over 2 ms: {len(pauses)}"
              + (": " + ", ".join(f"gen {g} {ms:.0f} ms" for g, ms in pauses[-8:]) if pauses else ""))
        for name, lines in (("prefill", p_log), ("decode", d_log)):
            gcs = [x.strip().split(": ", 2)[-1] for x in lines if " gc: " in x]
            print(f"  {name} gc pauses over 2 ms: {len(gcs)}" + (f", e.g. {gcs[-1]}" if gcs else ""))
        # The services' own lines for the last request: the finer split (prefill: in ->
        # queued -> first token -> answer; decode: the KV's DONE after the first token).
        for x in [x for x in d_log if "reserve + request" in x][-1:] + [x for x in p_log if "prefill " in x][-1:]:
            print("  " + x.strip().split(": ", 1)[-1])
    finally:
        for proc in procs[::-1]:
            proc.terminate()
        for proc in procs[::-1]:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        tail = [x for x in (p_log + d_log) if "Traceback" in x or "ERROR" in x or " WARNING " in x]
        if tail:
            print("service log lines:", "".join(tail[-20:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
