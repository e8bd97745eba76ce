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
    cache manager never hands out, attend to that one key, and their logits are dropped;
  - an fp8 cache's `kv_scale` is the runner's own tensor, in every step's metadata at
    capture and so at replay: the kernels read the scales from its memory on the device.

Only steps where every row decodes one token run from a graph; prefills and mixed steps
run eagerly. The ops must not sync the host inside a step (`ops.graph_safe`): TritonOps
with the fused MoE. `capture=False` runs the very same padded, static-buffer path
without graphs: CPU tests check it against the eager engine token for token.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.attention import AttentionMetadata, DecodeBatch, SeqSpan
from engine.kv_cache import LOCAL

log = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], layer_group: list[str], chunk: int | None,
                 block_size: int, scratch: dict[str, int], max_len: int, sizes: list[int], capture: bool = True,
                 kv_scale: torch.Tensor | None = None):
        """scratch: group -> a block id of that group's pool that nothing else uses.
        max_len: the longest sequence (sizes the block tables' width). kv_scale: an fp8
        cache's [2] (K, V) scales, the very tensor the eager steps use (None otherwise)."""
        self.model, self.kv_caches, self.layer_group = model, kv_caches, layer_group
        self.chunk, self.block_size, self.sizes = chunk, block_size, sorted(sizes)
        self.capture, self.kv_scale = capture, kv_scale
        self.device = kv_caches[0].device
        self.max_batch = self.sizes[-1]
        self.width = -(-max_len // block_size) + 1
        self.groups = sorted(set(layer_group))
        self.scratch = scratch
        # The static inputs, as views of three buffers so that a step fills them with
        # 2 + (number of groups) host-to-device copies:
        #   long  [2 + G, max_batch]: token ids, positions, then each group's slot mapping;
        #   int32 [2G, max_batch]: each group's kv_start and kv_len;
        #   int32 [max_batch, width] per group: block tables.
        g = len(self.groups)
        self.longs = torch.zeros(2 + g, self.max_batch, dtype=torch.long, device=self.device)
        self.ints = torch.zeros(2 * g, self.max_batch, dtype=torch.int32, device=self.device)
        self.input_ids, self.positions = self.longs[0], self.longs[1]
        self.slots = {grp: self.longs[2 + k] for k, grp in enumerate(self.groups)}
        self.kv_start = {grp: self.ints[2 * k] for k, grp in enumerate(self.groups)}
        self.kv_len = {grp: self.ints[2 * k + 1] for k, grp in enumerate(self.groups)}
        self.tables = {grp: torch.full((self.max_batch, self.width), -1, dtype=torch.int32, device=self.device)
                       for grp in self.groups}
        self.rows = torch.arange(self.max_batch, device=self.device)
        self._fill([], [], {grp: [] for grp in self.groups}, self.max_batch)  # every row padding
        # Every graph writes its logits into rows of this one buffer, so the graphs' outputs
        # do not each hold [b, vocab] of the shared pool.
        self.logits: torch.Tensor | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if capture:
            self._capture_all()

    def _meta(self, grp: str, b: int) -> AttentionMetadata:
        dec = DecodeBatch(self.rows[:b], self.tables[grp][:b], self.kv_start[grp][:b], self.kv_len[grp][:b],
                          self.width * self.block_size)
        return AttentionMetadata(self.slots[grp][:b], dec, [], self.kv_scale)

    def _fill(self, ids: list[int], positions: list[int], spans: dict[str, list[SeqSpan]], b: int) -> None:
        """Copy a step's numbers into rows [0, n) of the static buffers, and make rows
        [n, b) padding: token 0 at position 0, one key, in the group's scratch block."""
        n, bs = len(ids), self.block_size
        pad = b - n
        longs, ints, tables = [ids + [0] * pad, positions + [0] * pad], [], {}
        for grp in self.groups:
            chunk = self.chunk if grp == LOCAL else None
            rows, slots, starts, lens = [], [], [], []
            for sp in spans[grp]:
                pos, bt = sp.q_start, sp.block_table
                first = (pos // chunk) * chunk if chunk is not None else 0
                if None in bt[first // bs : pos // bs + 1]:
                    raise RuntimeError("attention touches a released block")
                slots.append(bt[pos // bs] * bs + pos % bs)
                starts.append(first)
                lens.append(pos + 1 - first)
                # Released entries (None) lie before `first` and are never read.
                rows.append([-1 if x is None else x for x in bt])
            width = max((len(r) for r in rows), default=1)
            rows = [r + [-1] * (width - len(r)) for r in rows] + [[self.scratch[grp]] + [-1] * (width - 1)] * pad
            tables[grp] = rows
            longs.append(slots + [self.scratch[grp] * bs] * pad)
            ints += [starts + [0] * pad, lens + [1] * pad]
        pin = self.device.type == "cuda"

        def put(dst: torch.Tensor, values, dtype) -> None:
            src = torch.tensor(values, dtype=dtype)
            dst.copy_(src.pin_memory() if pin else src, non_blocking=True)

        put(self.longs[:, :b], longs, torch.long)
        put(self.ints[:, :b], ints, torch.int32)
        for grp, rows in tables.items():
            # Columns past a row's last block are never read, so stale ones may stay.
            put(self.tables[grp][:b, : len(rows[0])], rows, torch.int32)

    def fits(self, num_rows: int) -> bool:
        return 0 < num_rows <= self.max_batch

    def _forward(self, b: int) -> torch.Tensor:
        metas = {g: self._meta(g, b) for g in self.groups}
        hidden = self.model(self.input_ids[:b], self.positions[:b], self.kv_caches,
                            [metas[g] for g in self.layer_group])
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for b in reversed(self.sizes):  # largest first: later graphs reuse its pool memory
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up (Triton compiles here, not in the capture)
                for _ in range(2):
                    logits = self._forward(b)
            torch.cuda.current_stream().wait_stream(stream)
            if self.logits is None:
                self.logits = torch.empty(self.max_batch, logits.shape[1], dtype=torch.float32, device=self.device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: another thread of a service (gRPC, KV transfer) must not spoil the capture.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.logits[:b].copy_(self._forward(b))
            self.graphs[b] = graph
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch %s) in %.1f s", len(self.sizes),
                 ",".join(map(str, self.sizes)), time.perf_counter() - t0)

    def prepare(self, ids: list[int], positions: list[int], spans: dict[str, list[SeqSpan]]) -> int | None:
        """Fill the static buffers for a step where every row decodes one token; returns
        the padded batch size to replay, or None when the step does not fit the buffers
        (the caller runs it eagerly). The caller may still change `input_ids[:len(ids)]`
        on the device before `replay`."""
        n = len(ids)
        if not self.fits(n) or any(len(s.block_table) > self.width for g in spans.values() for s in g):
            return None
        if any(s.num_tokens != 1 for g in spans.values() for s in g):
            raise ValueError("spans: a graph step decodes exactly one token per row")
        b = next(s for s in self.sizes if s >= n)
        self._fill(ids, positions, spans, b)
        return b

    def replay(self, b: int, n: int) -> torch.Tensor:
        """Logits [n, vocab] (fp32) of the prepared step."""
        if not self.capture:
            return self._forward(b)[:n].float()
        self.graphs[b].replay()
        return self.logits[:n]
