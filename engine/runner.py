"""The model runner: turns a scheduler plan into tensors, runs the model, samples.

It owns the device side: the model's weights and the per-layer KV cache tensors
(`[2, num_blocks, block_size, kv_heads, head_dim]`, one pool per layer group). The
scheduler and the KV cache manager never see a tensor.

The caches hold the model's dtype, or with `kv_cache_dtype="fp8"` e4m3 (float8_e4m3fn)
read and written with one `[2]` fp32 (K scale, V scale) device tensor, `kv_scale`, that
every layer's attention metadata carries: a cache entry is e4m3(clamp(x / scale, +-448))
and reads back as entry * scale (tandem_kernels/kv_write.py). Half the bytes of bf16: twice the
blocks in the same memory, half the bytes a decode step's attention reads.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention import SeqSpan, build_metadata
from engine.config import EngineConfig, cdiv
from engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from engine.kv_cache import GLOBAL, LOCAL
from engine.loader import DTYPES, load_model
from engine.request import PENDING
from engine.sampling import Sampler
from engine.scheduler import SchedulerOutput

log = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    sampled: dict[str, int]  # request id -> new token, for chunks that sample
    logprobs: dict[str, tuple[float, list[tuple[int, float]]]]  # when asked
    all_logits: torch.Tensor | None = None  # [T, vocab] fp32, only for run(all_logits=True)


@dataclass
class LaunchedStep:
    """A step whose GPU work is queued: its sampled ids reach the host when `result()`
    is called (which waits for them), so the host can prepare the next step meanwhile."""

    requests: list  # the requests that sample, in row order
    token_ids: torch.Tensor  # [n] int64 on the host (pinned on CUDA), filled by a queued copy
    done: torch.cuda.Event | None  # recorded after that copy (None: already on the host)
    logprobs: dict[str, tuple[float, list[tuple[int, float]]]]
    all_logits: torch.Tensor | None = None

    def wait(self) -> None:
        """Until the step's GPU work (every kernel queued before the copy) is done."""
        if self.done is not None:
            self.done.synchronize()

    def result(self) -> RunnerOutput:
        self.wait()
        ids = self.token_ids.tolist()
        return RunnerOutput({r.request_id: t for r, t in zip(self.requests, ids)}, self.logprobs, self.all_logits)


def min_local_blocks(cfg: EngineConfig) -> int:
    """The local pool must hold one request's window plus one step's new tokens."""
    bs = cfg.cache.block_size
    window = min(cfg.model.attention_chunk_size, cfg.max_model_len)
    return cdiv(window, bs) + cdiv(cfg.scheduler.max_num_batched_tokens, bs) + 1


def plan_cache_blocks(cfg: EngineConfig, available_bytes: int) -> tuple[int, int | None]:
    """Split a byte budget between the global and local pools. The local pool needs at
    most a chunk (plus one step's new tokens) per running request; the rest is global."""
    m, cc, sc = cfg.model, cfg.cache, cfg.scheduler
    elem = getattr(torch, cfg.kv_cache_dtype_name).itemsize  # 1 for fp8: twice the blocks of bf16
    per_layer_block = 2 * cc.block_size * m.num_kv_heads * m.head_dim * elem
    n_local, n_global = len(m.local_layers), len(m.global_layers)
    local = None
    if n_local:
        window = min(m.attention_chunk_size, cfg.max_model_len)
        local = cc.num_local_blocks or (
            sc.max_num_seqs * (cdiv(window, cc.block_size) + 1) + cdiv(sc.max_num_batched_tokens, cc.block_size) + 1
        )
    glob = cc.num_blocks
    if glob is None:
        glob = (available_bytes - (local or 0) * n_local * per_layer_block) // max(1, n_global * per_layer_block)
    return int(glob), local


class ModelRunner:
    def __init__(self, cfg: EngineConfig, ops):
        self.cfg = cfg
        self.device = torch.device(cfg.device.device)
        self.dtype = DTYPES[cfg.device.torch_dtype_name]  # the weights' and activations'
        self.cache_dtype = getattr(torch, cfg.kv_cache_dtype_name)
        # An fp8 cache's (K, V) scales, one pair for every layer, read on the device by the
        # kernels (so a CUDA graph replays with them; update in place, never rebind). 1.0:
        # the cache holds K and V themselves rounded to e4m3, uncalibrated, as vLLM does
        # for a checkpoint without calibrated scales. e4m3 reaches +-448 (anything beyond
        # saturates) with 3 mantissa bits (up to 6.25% rounding error a value; below 2^-6
        # the step is a fixed 2^-9). Llama 4's RoPE layers L2-normalise k, so their keys
        # are O(1); other keys and the values are the projections' own outputs.
        self.kv_scale = (torch.ones(2, dtype=torch.float32, device=self.device)
                         if cfg.cache.kv_cache_dtype == "fp8" else None)
        self.model = load_model(cfg.model, cfg.model_dir, cfg.device.device, cfg.device.torch_dtype_name, ops)
        self.sampler = Sampler()
        self.num_blocks, self.num_local_blocks = plan_cache_blocks(cfg, self._available_cache_bytes())
        if self.num_blocks < 1:
            raise ValueError("not enough memory for a single KV block after loading the model")
        self.layer_group = [LOCAL if cfg.model.is_local_layer(i) else GLOBAL for i in range(cfg.model.num_layers)]
        m, bs = cfg.model, cfg.cache.block_size
        # Each pool has one block more than the cache manager hands out: the scratch block
        # that padding rows of a CUDA-graph batch write into. kv_transfer's block checks
        # would accept its id, but a receiver writes only blocks decode's own manager
        # listed in expect(), and a sender reads only blocks prefill's manager handed out.
        self.scratch_block = {g: self.num_blocks if g == GLOBAL else self.num_local_blocks
                              for g in set(self.layer_group)}
        # fp8 caches start as zero bytes (+0.0 in e4m3): filling an fp8 tensor need not be
        # supported on every device.
        alloc = torch.uint8 if self.kv_scale is not None else self.cache_dtype
        self.kv_caches = [
            torch.zeros(2, self.scratch_block[g] + 1, bs, m.num_kv_heads, m.head_dim,
                        device=self.device, dtype=alloc).view(self.cache_dtype)
            for g in self.layer_group
        ]
        log.info("KV cache: %d global blocks%s of %d tokens, %s", self.num_blocks,
                 f" + {self.num_local_blocks} local" if self.num_local_blocks else "", bs, cfg.kv_cache_dtype_name)
        self.graphs: DecodeGraphs | None = None
        # The last launched step's sampled ids, on the device, and each request's row in
        # them: a PENDING input token (async scheduling) is read from there.
        self._last_tokens: torch.Tensor | None = None
        self._last_rows: dict[str, int] = {}
        # Captured by the engine once it has checked the configuration (capture_graphs).
        self.wants_graphs = self.device.type == "cuda" and cfg.device.cuda_graphs and getattr(ops, "graph_safe", False)

    def enable_decode_graphs(self, capture: bool = True, max_len: int | None = None) -> None:
        """Serve all-decode steps of up to max_num_seqs rows from captured CUDA graphs;
        capture=False runs the same padded static-buffer path eagerly (CPU tests)."""
        cfg = self.cfg
        max_len = max_len or min(cfg.max_model_len, self.num_blocks * cfg.cache.block_size)
        with self._on_device():
            self.graphs = DecodeGraphs(self.model, self.kv_caches, self.layer_group, cfg.model.attention_chunk_size,
                                       cfg.cache.block_size, self.scratch_block, max_len,
                                       graph_batch_sizes(min(cfg.scheduler.max_num_seqs, cfg.scheduler.max_num_batched_tokens)),
                                       capture=capture, kv_scale=self.kv_scale)

    def _available_cache_bytes(self) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = total * (1 - self.cfg.cache.gpu_memory_utilization)
            return int(max(0, free - reserve - (2 << 30)))  # 2 GiB for activations
        return int(self.cfg.cache.cpu_cache_gib * (1 << 30))

    def _on_device(self):
        """Make the runner's GPU current for this thread. Triton launches on the current
        device (not the tensors'), and a CUDA graph captures the current device's stream;
        a service's engine thread on cuda:1 would start out on cuda:0."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @torch.inference_mode()
    def run(self, plan: SchedulerOutput, all_logits: bool = False,
            on_layer: Callable[[int], None] | None = None) -> RunnerOutput:
        """all_logits: also return every row's logits (parity tests compare them).
        on_layer(i): called as soon as layer i's KV for this step is in the cache (the
        prefill role pushes it to decode from there, overlapping the next layer)."""
        return self.launch(plan, all_logits, on_layer).result()

    @torch.inference_mode()
    def launch(self, plan: SchedulerOutput, all_logits: bool = False,
               on_layer: Callable[[int], None] | None = None) -> LaunchedStep:
        """Queue the step's GPU work and return without waiting for it (unless an op or
        logprobs need the host). A PENDING input token must be one the previous launch
        sampled: it is copied from that launch's ids on the device."""
        with self._on_device():
            return self._launch(plan, all_logits, on_layer)

    def _launch(self, plan: SchedulerOutput, all_logits: bool,
                on_layer: Callable[[int], None] | None) -> LaunchedStep:
        ids, pos, sample_rows, sampled_reqs = [], [], [], []
        pending_rows, pending_src = [], []
        spans = {g: [] for g in set(self.layer_group)}
        row = 0
        for c in plan.chunks:
            req = c.request
            ids.extend(req.token_ids(c.start, c.num_tokens))
            if ids[-1] == PENDING:  # only ever a chunk's last token: the one being sampled
                pending_rows.append(row + c.num_tokens - 1)
                pending_src.append(self._last_rows[req.request_id])
            pos.extend(range(c.start, c.start + c.num_tokens))
            for g in spans:
                spans[g].append(SeqSpan(row, c.start, c.num_tokens, tuple(req.block_tables[g])))
            row += c.num_tokens
            if c.samples:
                sample_rows.append(row - 1)
                sampled_reqs.append(req)
        all_decode = all(c.num_tokens == 1 and c.samples for c in plan.chunks)
        if self.graphs is not None and all_decode and not all_logits and on_layer is None:
            b = self.graphs.prepare(ids, pos, spans)  # None: too many rows or too long a table
            if b is not None:
                self._fill_pending(self.graphs.input_ids, pending_rows, pending_src)
                return self._sample(self.graphs.replay(b, len(ids)), sampled_reqs, None)
        chunk = self.cfg.model.attention_chunk_size
        metas = {
            g: build_metadata(s, self.cfg.cache.block_size, chunk if g == LOCAL else None, self.device,
                              kv_scale=self.kv_scale)
            for g, s in spans.items()
        }
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        self._fill_pending(input_ids, pending_rows, pending_src)
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, positions, self.kv_caches, [metas[g] for g in self.layer_group], on_layer)
        every = self.model.compute_logits(hidden).float() if all_logits else None
        if not sampled_reqs:  # still an event: reserve() waits for this step's KV writes
            return LaunchedStep([], torch.zeros(0, dtype=torch.long), self._step_done(), {}, every)
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)]).float()
        return self._sample(logits, sampled_reqs, every)

    def _step_done(self) -> torch.cuda.Event | None:
        """An event after everything queued so far (None on CPU, where nothing is queued)."""
        if self.device.type != "cuda":
            return None
        done = torch.cuda.Event()
        done.record()
        return done

    def _fill_pending(self, input_ids: torch.Tensor, rows: list[int], src: list[int]) -> None:
        """input_ids[rows] = the last launch's sampled ids[src], on the device."""
        if not rows:
            return
        last = self._last_tokens
        k = len(rows)
        if rows == src and rows[-1] == k - 1:  # steady decode: the same requests in the same rows
            input_ids[:k].copy_(last[:k])
            return
        index = torch.tensor(rows + src, dtype=torch.long)
        index = (index.pin_memory() if self.device.type == "cuda" else index).to(self.device, non_blocking=True)
        input_ids.index_copy_(0, index[:k], last.index_select(0, index[k:]))

    def _sample(self, logits: torch.Tensor, sampled_reqs: list, every: torch.Tensor | None) -> LaunchedStep:
        out = self.sampler(logits, [r.sampling_params for r in sampled_reqs], [r.generator for r in sampled_reqs],
                           keep_on_device=True)
        tokens = out.token_ids
        self._last_tokens = tokens.to(self.device, non_blocking=True)
        self._last_rows = {r.request_id: i for i, r in enumerate(sampled_reqs)}
        done = None
        if tokens.device.type == "cuda":
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            done = self._step_done()
            tokens = host
        logprobs = {}
        if out.logprobs is not None:
            for i, r in enumerate(sampled_reqs):
                if r.sampling_params.logprobs is not None:
                    logprobs[r.request_id] = (float(out.logprobs[i]), out.top_logprobs[i] or [])
        return LaunchedStep(sampled_reqs, tokens, done, logprobs, every)
