"""The tcp sender's send_layer on a GPU cache: how long prefill's engine thread waits in
it, with and without pinned host staging (one GPU).

    python bench/tcp_send.py [--requests 12] [--blocks 500] [--staging-mb 0,512]

A receiver process and this sender share cuda:0 (Scout's cache layout: 8 KV heads x
128, bf16, 16-token blocks, 4 layers). Each request sends --blocks blocks of each
layer, with ~10 ms of matmuls between layers as a prefill's compute would put there,
then waits for DONE. On a CUDA cache the TCP data plane copies each part into pinned
host memory on the caller's thread (kv_transfer/staging.py): from memory pinned at
start-up (--staging-mb > 0), or pinned per part by torch's caching host allocator (0),
which pins fresh memory whenever more parts are queued than ever before (~0.5 ms a
MiB). Prints per staging size the send_layer p50 / p99 / max, the staging misses, and
the median time from finish() to DONE (the link: tcp over loopback, through host memory).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM = 4, 4096, 16, 8, 128
DST0 = 1000  # the receiver's blocks start here


def caches(device: str) -> list[torch.Tensor]:
    return [torch.zeros(2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=device)
            for _ in range(LAYERS)]


def receiver(q, tids: list[str], blocks: int) -> None:
    from kv_transfer import CacheLayout, TransferStatus, make_receiver

    c = caches("cuda:0")
    rx = make_receiver("tcp", CacheLayout.from_caches("bench-tcp", c), c)
    for tid in tids:
        rx.expect(tid, {layer: list(range(DST0, DST0 + blocks)) for layer in range(LAYERS)})
    q.put(rx.address)
    for tid in tids:
        status = rx.wait(tid, 120)
        if status != TransferStatus.DONE:
            q.put(f"{tid} ended {status.name}")
            return
    q.put("done")
    rx.close()


def run(staging_mb: int, requests: int, blocks: int) -> dict:
    from kv_transfer import CacheLayout, make_sender

    tids = [f"s{staging_mb}-r{r}" for r in range(requests)]
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=receiver, args=(q, tids, blocks))
    p.start()
    address = q.get(timeout=300)
    c = caches("cuda:0")
    tx = make_sender("tcp", CacheLayout.from_caches("bench-tcp", c), c, host_staging_bytes=staging_mb << 20)
    tx.connect(address)
    x = torch.randn(8192, 8192, device="cuda:0", dtype=torch.bfloat16)
    calls, tails = [], []
    for tid in tids:
        for layer in range(LAYERS):
            for _ in range(8):  # ~10 ms of GPU work, as a layer's compute
                x = (x @ x).clamp_(-1, 1)
            t = time.perf_counter()
            tx.send_layer(address, tid, layer, list(range(blocks)), list(range(DST0, DST0 + blocks)))
            calls.append(1e3 * (time.perf_counter() - t))
        tx.finish(address, tid, LAYERS)
        torch.cuda.synchronize()
        t = time.perf_counter()
        tx.wait(tid, 120)
        tails.append(1e3 * (time.perf_counter() - t))
    end = q.get(timeout=300)
    p.join(30)
    misses = tx.stats()["host_staging_misses"]
    tx.close()
    if end != "done":
        raise RuntimeError(end)
    calls.sort()
    return dict(p50=statistics.median(calls), p99=calls[int(0.99 * (len(calls) - 1))], max=calls[-1],
                misses=misses, tail=statistics.median(tails))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=12, help="transfers per staging size (default 12)")
    ap.add_argument("--blocks", type=int, default=500, help="blocks per layer (default 500: an 8k prompt)")
    ap.add_argument("--staging-mb", default="0,512",
                    help="host staging sizes to compare, MiB, comma-separated (default 0,512; 0: pin per part)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a GPU")
    mib = 2 * args.blocks * BLOCK * KV_HEADS * HEAD_DIM * 2 / 2**20  # K and V, bf16
    print(f"\n{args.requests} transfers x {LAYERS} layers x {args.blocks} blocks ({mib:.0f} MiB a layer) on "
          f"{torch.cuda.get_device_name()}")
    print("| host staging | send_layer p50 | p99 | max | staging misses | finish -> DONE p50 |\n|---|---|---|---|---|---|")
    for mb in (int(v) for v in args.staging_mb.split(",")):
        r = run(mb, args.requests, args.blocks)
        name = f"{mb} MiB pinned at start-up" if mb else "none (pinned per part)"
        print(f"| {name} | {r['p50']:.2f} ms | {r['p99']:.2f} ms | {r['max']:.2f} ms | {r['misses']} | "
              f"{r['tail']:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
