"""KV transfer throughput on two GPUs: our NCCL backend against raw NCCL send/recv,
both timed in this call.

    python bench/kv_transfer.py [--tokens 32000] [--layers 48]

The workload is one Scout-shaped prompt of --tokens tokens: 8 KV heads x 128 x bf16,
16-token blocks (64 KiB a block per layer). Global layers (every 4th) carry every block;
the 36 chunked-local layers only the last 8192-token chunk's blocks — what prefill
pushes to decode. Sender on cuda:0, receiver on cuda:1, each its own process.
Raw baseline: one 2-rank NCCL group, the same per-layer message sizes sent back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BS, KVH, HD, CHUNK = 16, 8, 128, 8192


def plan(tokens: int, layers: int) -> dict[int, int]:
    """layer -> number of blocks pushed."""
    total = -(-tokens // BS)
    first_local = (tokens // CHUNK) * CHUNK // BS
    return {i: (total if (i + 1) % 4 == 0 else total - first_local) for i in range(layers)}


def caches(blocks: dict[int, int], device: str):
    return [torch.randn(2, n + 8, BS, KVH, HD, device=device, dtype=torch.bfloat16) for n in blocks.values()]


def raw_nccl(rank: int, blocks: dict[int, int], port: int, reps: int, out):
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    bufs = [torch.empty(2, n, BS, KVH, HD, device=f"cuda:{rank}", dtype=torch.bfloat16) for n in blocks.values()]
    times = []
    for r in range(reps + 1):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in bufs:
            (dist.send if rank == 0 else dist.recv)(b, 1 - rank)
        torch.cuda.synchronize()
        if r:
            times.append(time.perf_counter() - t0)
    if rank == 1:
        out.put(statistics.median(times))
    dist.destroy_process_group()


STAGES: dict[str, float] = {}


def timed(cls, name: str) -> None:
    """Wrap cls.name to add its wall time to STAGES (per process; --stages prints them)."""
    fn = getattr(cls, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            STAGES[f"{cls.__name__}.{name}"] = STAGES.get(f"{cls.__name__}.{name}", 0.0) + time.perf_counter() - t0

    setattr(cls, name, wrapper)


def receiver(blocks, reps, q_addr, q_out, q_done, read_ahead=True, profile=False):
    from kv_transfer import CacheLayout, make_receiver
    from kv_transfer.nccl import NcclReceiver

    NcclReceiver.read_ahead = read_ahead
    for name in ("_next_header", "_receive_payload", "_write", "_reply", "_layer_problem"):
        timed(NcclReceiver, name)

    kv = caches(blocks, "cuda:1")
    layout = CacheLayout.from_caches("bench", kv)
    rx = make_receiver("nccl", layout, kv, host="127.0.0.1", port=0)
    q_addr.put(rx.address)
    prof = None
    for r in range(reps + 1):
        tid = f"t{r}"
        rx.expect(tid, {i: list(range(n)) for i, n in blocks.items()})
        if r == reps and profile:  # trace the last transfer (all threads)
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
        q_addr.put("ready")
        st = rx.wait(tid, 120)
        if prof is not None:
            torch.cuda.synchronize()
            prof.__exit__(None, None, None)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8), flush=True)
        q_out.put(("rx", r, st.name, time.time()))
        q_done.get()  # release only after the sender's finish was answered
        rx.release(tid)
    q_out.put(("stages", "rx", {k: v / (reps + 1) for k, v in STAGES.items()}))
    time.sleep(1)
    rx.close()


def sender(blocks, reps, q_addr, q_out, q_done):
    from kv_transfer import CacheLayout, make_sender
    from kv_transfer.nccl import NcclSender

    for name in ("send_layer", "_stage", "_transmit"):
        timed(NcclSender, name)

    kv = caches(blocks, "cuda:0")
    layout = CacheLayout.from_caches("bench", kv)
    tx = make_sender("nccl", layout, kv)
    address = q_addr.get()
    tx.connect(address)
    for r in range(reps + 1):
        assert q_addr.get() == "ready"
        torch.cuda.synchronize()
        t0 = time.time()
        for i, n in blocks.items():  # src blocks shuffled-ish: every other block, then the rest
            src = list(range(0, n, 2)) + list(range(1, n, 2))
            tx.send_layer(address, f"t{r}", i, src, list(range(n)))
        tx.finish(address, f"t{r}", len(blocks))
        st = tx.wait(f"t{r}", 120)
        q_out.put(("tx", r, st.name + (f" ({tx.reason(f't{r}')})" if st.name != "DONE" else ""), t0, time.time()))
        q_done.put(r)
        tx.release(f"t{r}")
    q_out.put(("stages", "tx", {k: v / (reps + 1) for k, v in STAGES.items()}))
    tx.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32000, help="prompt tokens whose KV moves (default 32000)")
    ap.add_argument("--layers", type=int, default=48, help="layers (default 48, Scout)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (after one warm-up)")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of the receiver's last transfer")
    args = ap.parse_args()
    blocks = plan(args.tokens, args.layers)
    nbytes = sum(blocks.values()) * 2 * BS * KVH * HD * 2
    print(f"{torch.cuda.device_count()} GPUs: {torch.cuda.get_device_name(0)}; {args.tokens} tokens, "
          f"{args.layers} layers, {nbytes / 1e9:.2f} GB in {len(blocks)} layer messages", flush=True)
    ctx = mp.get_context("spawn")

    out = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    ps = [ctx.Process(target=raw_nccl, args=(r, blocks, port, args.reps, out)) for r in (0, 1)]
    for p in ps:
        p.start()
    raw_s = out.get(timeout=300)
    for p in ps:
        p.join()
    print(f"raw NCCL send/recv: {raw_s * 1e3:.1f} ms, {nbytes / raw_s / 1e9:.1f} GB/s", flush=True)

    results = {}
    for read_ahead in (True, False):
        q_addr, q_out, q_done = ctx.Queue(), ctx.Queue(), ctx.Queue()
        rx = ctx.Process(target=receiver, args=(blocks, args.reps, q_addr, q_out, q_done, read_ahead, args.profile))
        rx.start()
        tx = ctx.Process(target=sender, args=(blocks, args.reps, q_addr, q_out, q_done))
        tx.start()
        rows = {}
        for _ in range(2 * (args.reps + 1) + 2):
            m = q_out.get(timeout=600)
            if m[0] == "stages":
                print(f"  {m[1]} stage seconds per transfer: " +
                      ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in sorted(m[2].items())), flush=True)
                continue
            rows.setdefault(m[1], {})[m[0]] = m
        tx.join()
        rx.join()
        times, states = [], []
        for r in range(1, args.reps + 1):
            t = rows[r]
            states.append((t["tx"][2], t["rx"][2]))
            times.append(max(t["tx"][4], t["rx"][3]) - t["tx"][3])
        results[read_ahead] = (statistics.median(times), states)
        print(f"tandem kv_transfer (nccl, read_ahead={read_ahead}): {results[read_ahead][0] * 1e3:.1f} ms; "
              f"states {set(states)}", flush=True)
    print("\n| what | time | GB/s | vs raw |\n|---|---|---|---|")
    print(f"| raw NCCL send/recv | {raw_s * 1e3:.1f} ms | {nbytes / raw_s / 1e9:.1f} | 100% |")
    for ra, (t, _) in results.items():
        print(f"| tandem nccl backend, read-ahead {'on' if ra else 'off'} | {t * 1e3:.1f} ms | {nbytes / t / 1e9:.1f} | "
              f"{100 * raw_s / t:.0f}% |")
    ours, states = results[True]
    if args.json:
        Path(args.json).write_text(json.dumps({"bytes": nbytes, "raw_s": raw_s, "ours_s": ours, "states": states}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
