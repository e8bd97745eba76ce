"""Decode steps replayed from CUDA graphs.

A decode step of a small batch is launch-bound: the GPU work of a batch-1 step on
scout-slice is ~2.3 ms, but launching its ~270 kernels from Python takes ~8 ms
(BENCHMARKS.md). A CUDA graph records a step's launches once and replays them with one
call. A graph fixes shapes and addresses, so:

  - one graph per padded batch size (1, 2, 4, 8, then steps of 16 up to max_num_seqs),
    captured at start-up, largest first, all sharing one memory pool;
  - the inputs live in static buffers that every replay reads: token ids, positions and,
    per layer group, the slot mapping, block tables `[max_batch, W]` (int32), kv_start
    and kv_len. A step copies its numbers into their first rows;
  - rows past the real batch are padding: they write their K/V into a scratch block the
    cache manager never hands out, attend to that one key, and their logits are dropped.

Only steps where every row decodes one token run from a graph; prefills and mixed steps
run eagerly. The ops must not sync the host inside a step (`ops.graph_safe`): TritonOps
with the fused MoE. `capture=False` runs the very same padded, static-buffer path
without graphs: CPU tests check it against the eager engine token for token.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.attention import AttentionMetadata, DecodeBatch, SeqSpan, host_tables
from engine.kv_cache import LOCAL

log = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class _GroupBuffers:
    """One layer group's static attention inputs."""

    def __init__(self, max_batch: int, width: int, scratch_block: int, device: torch.device):
        self.scratch_block = scratch_block
        self.slots = torch.empty(max_batch, dtype=torch.long, device=device)
        self.tables = torch.full((max_batch, width), -1, dtype=torch.int32, device=device)
        self.kv_start = torch.empty(max_batch, dtype=torch.int32, device=device)
        self.kv_len = torch.empty(max_batch, dtype=torch.int32, device=device)

    def pad(self, lo: int, hi: int, block_size: int) -> None:
        """Rows [lo, hi) become padding: one key, in the scratch block."""
        self.slots[lo:hi] = self.scratch_block * block_size
        self.tables[lo:hi, 0] = self.scratch_block
        self.kv_start[lo:hi] = 0
        self.kv_len[lo:hi] = 1

    def meta(self, b: int, width: int, block_size: int, rows: torch.Tensor) -> AttentionMetadata:
        dec = DecodeBatch(rows[:b], self.tables[:b], self.kv_start[:b], self.kv_len[:b], width * block_size)
        return AttentionMetadata(self.slots[:b], dec, [])


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], layer_group: list[str], chunk: int | None,
                 block_size: int, scratch: dict[str, int], max_len: int, sizes: list[int], capture: bool = True):
        """scratch: group -> a block id of that group's pool that nothing else uses.
        max_len: the longest sequence (sizes the block tables' width)."""
        self.model, self.kv_caches, self.layer_group = model, kv_caches, layer_group
        self.chunk, self.block_size, self.sizes = chunk, block_size, sorted(sizes)
        self.capture = capture
        device = kv_caches[0].device
        self.max_batch = self.sizes[-1]
        self.width = -(-max_len // block_size) + 1
        self.input_ids = torch.zeros(self.max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.max_batch, dtype=torch.long, device=device)
        self.rows = torch.arange(self.max_batch, device=device)
        self.groups = {g: _GroupBuffers(self.max_batch, self.width, scratch[g], device) for g in set(layer_group)}
        for buf in self.groups.values():
            buf.pad(0, self.max_batch, block_size)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        if capture:
            self._capture_all()

    def fits(self, num_rows: int) -> bool:
        return 0 < num_rows <= self.max_batch

    def _forward(self, b: int) -> torch.Tensor:
        metas = {g: buf.meta(b, self.width, self.block_size, self.rows) for g, buf in self.groups.items()}
        hidden = self.model(self.input_ids[:b], self.positions[:b], self.kv_caches,
                            [metas[g] for g in self.layer_group])
        return self.model.compute_logits(hidden).float()

    @torch.inference_mode()
    def _capture_all(self) -> None:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.kv_caches[0].device)
        for b in reversed(self.sizes):  # largest first: later graphs reuse its pool memory
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up (Triton compiles here, not in the capture)
                for _ in range(2):
                    self._forward(b)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: another thread of a service (gRPC, KV transfer) must not spoil the capture.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = self._forward(b)
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch %s) in %.1f s", len(self.sizes),
                 ",".join(map(str, self.sizes)), time.perf_counter() - t0)

    def run(self, ids: list[int], positions: list[int], spans: dict[str, list[SeqSpan]]) -> torch.Tensor | None:
        """Logits [B, vocab] (fp32) of a step where every row decodes one token; None when
        the step does not fit the buffers (the caller runs it eagerly)."""
        n = len(ids)
        if not self.fits(n) or any(len(s.block_table) > self.width for g in spans.values() for s in g):
            return None
        b = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(torch.tensor(ids), non_blocking=True)
        self.positions[:n].copy_(torch.tensor(positions), non_blocking=True)
        self.input_ids[n:b] = 0
        self.positions[n:b] = 0
        for g, buf in self.groups.items():
            h = host_tables(spans[g], self.block_size, self.chunk if g == LOCAL else None)
            kv_len = h.q_start + 1 - h.kv_first
            # Columns past a row's last block are never read, so stale ones may stay.
            buf.tables[:n, : h.table.shape[1]].copy_(h.table.to(torch.int32), non_blocking=True)
            buf.kv_start[:n].copy_(h.kv_first.to(torch.int32), non_blocking=True)
            buf.kv_len[:n].copy_(kv_len.to(torch.int32), non_blocking=True)
            buf.slots[:n].copy_(h.slot_mapping, non_blocking=True)
            buf.pad(n, b, self.block_size)
        if not self.capture:
            return self._forward(b)[:n]
        graph, out = self.graphs[b]
        graph.replay()
        return out[:n]
