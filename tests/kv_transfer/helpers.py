"""Shared by the kv_transfer tests and the peer process (peer.py)."""

from __future__ import annotations

import json
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from kv_transfer import CacheLayout, NcclReceiver, NcclSender, TcpReceiver, TcpSender
from kv_transfer.base import direct_runs


class GlooSender(NcclSender):
    """The NCCL backend's exact control flow, its pair's group built by gloo on CPU tensors."""
    pg_backend = "gloo"


class GlooReceiver(NcclReceiver):
    pg_backend = "gloo"


class GroupedGlooSender(NcclSender):
    """The grouped flow: gloo taking NCCL's grouping calls (kv_transfer.nccl)."""
    pg_backend = "gloo-grouped"


class GroupedGlooReceiver(NcclReceiver):
    pg_backend = "gloo-grouped"


BACKENDS = {"tcp": (TcpSender, TcpReceiver), "gloo": (GlooSender, GlooReceiver)}  # what the CPU tests run
# ...and for the direct path, the NCCL flow with grouped ops too
DIRECT_BACKENDS = {**BACKENDS, "gloo-grouped": (GroupedGlooSender, GroupedGlooReceiver)}


class GatedWriter:
    """Sender mixin: the writer takes nothing from its queue until `gate` is set, so all
    parts queued before fill one message (up to max_message_bytes). No inline writes:
    only the writer thread sends."""

    write_inline = False

    def __init__(self, *args, **kwargs):
        self.gate = threading.Event()
        super().__init__(*args, **kwargs)

    def _wait_for_work(self, peer):
        self.gate.wait()
        super()._wait_for_work(peer)


class GatedCompleter:
    """Receiver mixin: the completer handles no message until `gate` is set (the reader
    still reads headers and starts the data moving)."""

    def __init__(self, *args, **kwargs):
        self.gate = threading.Event()
        super().__init__(*args, **kwargs)

    def _complete(self, conn, msg):
        self.gate.wait()
        return super()._complete(conn, msg)


def gated(sender_cls, receiver_cls):
    return (type("GatedSender", (GatedWriter, sender_cls), {}),
            type("GatedReceiver", (GatedCompleter, receiver_cls), {}))

REPO = Path(__file__).resolve().parents[2]
NUM_BLOCKS = (24, 16, 24, 16)  # two layer groups with separate pools, as in Llama 4
BLOCK_SIZE, KV_HEADS, HEAD_DIM = 4, 2, 8
POISON = -77.0  # never produced by randn at these sizes


def make_caches(dtype: torch.dtype, seed: int | None, num_blocks=NUM_BLOCKS,
                block_size=BLOCK_SIZE, kv_heads=KV_HEADS, head_dim=HEAD_DIM) -> list[torch.Tensor]:
    """Random caches (seed given) or caches full of POISON (seed None)."""
    gen = torch.Generator().manual_seed(seed or 0)
    out = []
    for n in num_blocks:
        shape = (2, n, block_size, kv_heads, head_dim)
        t = torch.randn(shape, generator=gen) if seed is not None else torch.full(shape, POISON)
        out.append(t.to(dtype))
    return out


def layout_of(caches, model="tiny-llama4", **kw) -> CacheLayout:
    return CacheLayout.from_caches(model, caches, **kw)


def make_plan(seed: int, layers=(0, 1, 2, 3), num_blocks=NUM_BLOCKS, n=5,
              exclude: dict[int, set[int]] | None = None) -> dict[int, tuple[list[int], list[int]]]:
    """layer -> (src_blocks, dst_blocks), random and non-contiguous; dst avoids `exclude`."""
    rng = random.Random(seed)
    plan = {}
    for layer in layers:
        nb = num_blocks[layer]
        free = [b for b in range(nb) if b not in (exclude or {}).get(layer, set())]
        plan[layer] = (rng.sample(range(nb), n), rng.sample(free, n))
    return plan


def segments(rng: random.Random, ids: range, lengths) -> list[int]:
    """One segment of consecutive ids per length, listed in the order of `lengths`, laid
    out in `ids` in a random order with random gaps between them."""
    place = list(range(len(lengths)))
    rng.shuffle(place)
    cuts = sorted(rng.randint(0, len(ids) - sum(lengths)) for _ in lengths)  # gaps so far, before each segment
    segs, at, prev = [None] * len(lengths), 0, 0
    for cut, i in zip(cuts, place):
        at += cut - prev
        prev = cut
        segs[i] = list(ids[at:at + lengths[i]])
        at += lengths[i]
    return [b for seg in segs for b in seg]


def run_plan(seed: int, lengths=(4, 1, 3, 1, 2), layers=(0, 1, 2, 3), num_blocks=NUM_BLOCKS,
             dst_range: tuple[float, float] = (0.0, 1.0)) -> dict[int, tuple[list[int], list[int]]]:
    """layer -> (src_blocks, dst_blocks) made of segments of the given lengths (in a random
    order), consecutive on both sides, placed independently on each side (dst within the
    given fraction of each pool): so runs long and short."""
    rng = random.Random(seed)
    plan = {}
    for layer in layers:
        nb = num_blocks[layer]
        lens = list(lengths)
        rng.shuffle(lens)
        lo, hi = int(dst_range[0] * nb), int(dst_range[1] * nb)
        plan[layer] = (segments(rng, range(nb), lens), segments(rng, range(lo, hi), lens))
    return plan


def count_blocks(plans, min_blocks: int) -> tuple[int, int]:
    """(direct, staged) blocks of the plans' parts, by the sender's rule."""
    direct = total = 0
    for plan in plans:
        for src, dst in plan.values():
            runs = direct_runs(torch.tensor(src), torch.tensor(dst), min_blocks)
            direct += sum(n for _, n in runs)
            total += len(src)
    return direct, total - direct


def dst_of(plan) -> dict[int, list[int]]:
    return {layer: dst for layer, (_, dst) in plan.items()}


def send_plan(tx, rx, plan, transfer_id: str = "t") -> None:
    """The receiver expects the plan's destination blocks; the sender sends each layer."""
    rx.expect(transfer_id, dst_of(plan))
    tx.connect(rx.address)
    for layer, (s, d) in plan.items():
        tx.send_layer(rx.address, transfer_id, layer, s, d)


def plan_to_json(plan) -> str:
    return json.dumps({str(k): v for k, v in plan.items()})


def plan_from_json(s: str):
    return {int(k): tuple(v) for k, v in json.loads(s).items()}


def check_written(dst_caches, before, src_caches, plans, layers_written=None) -> None:
    """Every planned (layer, block) holds the source data; every other block is unchanged."""
    touched = [set() for _ in dst_caches]
    for plan in plans:
        for layer, (src, dst) in plan.items():
            if layers_written is not None and layer not in layers_written:
                continue
            assert torch.equal(dst_caches[layer][:, dst], src_caches[layer][:, src]), f"layer {layer}"
            touched[layer].update(dst)
    for layer, (cache, old) in enumerate(zip(dst_caches, before)):
        rest = [b for b in range(cache.shape[1]) if b not in touched[layer]]
        assert torch.equal(cache[:, rest], old[:, rest]), f"layer {layer}: unlisted blocks changed"


def eventually(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Peer:
    """A peer.py child process with line-based stdout."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.kv_transfer.peer", *args], cwd=REPO,
                                     stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("<EOF>")

    def expect_line(self, prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line[len(prefix):].strip()
            if line == "<EOF>":
                raise AssertionError(f"peer exited ({self.proc.wait()}) before printing {prefix!r}")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
