"""The engine loop and the offline API.

    plan = scheduler.schedule()      # which request computes which tokens
    out = runner.run(plan)           # tensors, model, sampler
    scheduler.update(plan, out)      # counters, appended tokens
    ... then stop checks and outputs.

Async scheduling (on CUDA by default) overlaps the host's share of a step with the
GPU's: step N+1 is scheduled and launched before step N's sampled ids are read back.

    plan = scheduler.schedule()      # step N+1; step N's tokens are still PENDING
    launched = runner.launch(plan)   # PENDING inputs are copied from step N's ids on the GPU
    read back step N's ids           # waits for step N only; N+1 is already queued
    ... stop checks and outputs of step N
    scheduler.update(plan, None)     # step N+1's tokens appended as PENDING

So outputs come one step later, and a request that stops at step N (EOS, a stop
string) has computed step N+1 too: that token is dropped, its KV slot freed with the
request's blocks. One that must end at step N (max_tokens, max_model_len) is not
scheduled again. A step that samples a prompt's first token is read back at once, so
time to first token does not wait a step. Greedy results are the same either way; a
sampled request can part in the last bits where a stopped request's extra row changed
the batch its logits were computed in.

`LLMEngine` is the step-by-step interface the services drive; `LLM` is the offline
batch API (`LLM(model_dir).generate(prompts, SamplingParams(...))`).
"""

from __future__ import annotations

import itertools
import logging
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.kv_cache import KVCacheManager
from engine.ops import make_ops
from engine.output import OutputProcessor, RequestOutput
from engine.request import PENDING, Request, RequestStatus
from engine.runner import LaunchedStep, ModelRunner, RunnerOutput, min_local_blocks
from engine.sampling import SamplingParams, make_generator, skip_draw
from engine.scheduler import Scheduler, SchedulerOutput

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, ops: str = "auto", check_integrity: bool = False):
        self.config = config
        self.check_integrity_each_step = check_integrity
        torch.manual_seed(config.seed)
        from engine.tokenizer import Tokenizer

        tok_file = Path(config.model_dir) / "tokenizer.json"
        self.tokenizer = Tokenizer.from_dir(config.model_dir) if tok_file.is_file() else None
        eos = set(config.model.eos_token_ids)
        if self.tokenizer is not None:
            eos |= set(self.tokenizer.eos_token_ids)
        self.eos_token_ids = tuple(sorted(eos))
        if config.device.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device: {config.device.device} requested but CUDA is not available here")
        self.runner = ModelRunner(config, make_ops(ops, config.device.device))
        self.max_model_len = config.max_model_len
        cache_tokens = self.runner.num_blocks * config.cache.block_size
        if cache_tokens < self.max_model_len:
            if config.scheduler.max_model_len is not None:
                raise ValueError(
                    f"max_model_len {self.max_model_len} does not fit the KV cache ({cache_tokens} tokens)"
                )
            self.max_model_len = cache_tokens
            log.warning("max_model_len lowered to %d to fit the KV cache", cache_tokens)
        local = self.runner.num_local_blocks
        if local is not None:
            need = min_local_blocks(config)
            if local < need:
                raise ValueError(
                    f"num_local_blocks {local} cannot hold one chunk plus one step's tokens ({need} blocks)"
                )
        self.kv = KVCacheManager(
            config.cache.block_size, self.runner.num_blocks, self.runner.num_local_blocks,
            config.model.attention_chunk_size, config.cache.enable_prefix_caching,
        )
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.outputs = OutputProcessor(self.tokenizer, self.max_model_len)
        self._ids = itertools.count()
        a = config.device.async_scheduling
        self.async_scheduling = self.runner.device.type == "cuda" if a is None else a
        self._inflight: tuple[SchedulerOutput, LaunchedStep] | None = None  # launched, not yet read back
        if self.runner.wants_graphs:  # last: a configuration error must not wait for the capture
            self.runner.enable_decode_graphs(capture=True, max_len=self.max_model_len)

    # -- requests ------------------------------------------------------------------------
    def validate_prompt(self, prompt: str | Sequence[int] | array) -> list[int]:
        """Token ids for a prompt, or ValueError naming the field. An `array.array` of
        ids (what the services unpack from the wire) is checked in one vectorised pass:
        its items are integers by construction, and the per-id loop a list needs costs
        ~0.1 us an id (~1 ms for an 8,000-token prompt, on the way to the first token)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            if self.tokenizer is None:
                raise ValueError("prompt: this model folder has no tokenizer; pass prompt_token_ids")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, array):
            ids = self._check_packed(prompt)
        else:
            if not isinstance(prompt, Sequence):
                raise ValueError(f"prompt: expected text or a list of token ids, got {type(prompt).__name__}")
            ids = list(prompt)
            if not ids:
                raise ValueError("prompt_token_ids: must not be empty")
            vocab = self.config.model.vocab_size
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, int):
                    raise ValueError(f"prompt_token_ids: {t!r} is not an int")
                if not 0 <= t < vocab:
                    raise ValueError(f"prompt_token_ids: token id {t} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(ids)} tokens leave no room to generate within max_model_len {self.max_model_len}"
            )
        if not self.kv.can_fit(len(ids) + 1):
            raise ValueError(f"prompt: {len(ids)} tokens do not fit the KV cache")
        return ids

    def _check_packed(self, prompt: array) -> list[int]:
        if prompt.typecode not in "bBhHiIlLqQ":
            raise ValueError(f"prompt_token_ids: an array of typecode {prompt.typecode!r} holds no integer ids")
        if not prompt:
            raise ValueError("prompt_token_ids: must not be empty")
        vocab = self.config.model.vocab_size
        packed = np.frombuffer(prompt, dtype=prompt.typecode)
        lo, hi = int(packed.min()), int(packed.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"prompt_token_ids: token id {lo if lo < 0 else hi} is outside the vocabulary "
                             f"[0, {vocab})")
        return prompt.tolist()

    def _make_request(self, prompt, params, request_id) -> Request:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        ids = self.validate_prompt(prompt)
        vocab = self.config.model.vocab_size
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids: {bad} outside the vocabulary [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer (this model folder has none); use stop_token_ids")
        if request_id is not None:
            if not isinstance(request_id, str) or not request_id:
                raise ValueError(f"request_id: must be a non-empty string, got {request_id!r}")
            if request_id in self.scheduler.requests:
                raise ValueError(f"request_id: {request_id!r} is already in use")
        else:
            request_id = str(next(self._ids))
            while request_id in self.scheduler.requests:  # a caller chose this one
                request_id = str(next(self._ids))
        gen = make_generator(params.seed, self.runner.device) if params.seed is not None else None
        return Request(request_id, ids, params, eos_token_ids=self.eos_token_ids, generator=gen)

    def add_request(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Validate and queue a request. Nothing is allocated until it is admitted, so a
        rejected request leaves no trace."""
        return self.enqueue(self._make_request(prompt, params, request_id))

    def enqueue(self, req: Request) -> str:
        """Queue a request built (and validated) by `_make_request`."""
        self.scheduler.add(req)
        self.outputs.add(req)
        return req.request_id

    # -- decode role: the prompt's KV is computed by a prefill instance ---------------
    def reserve(
        self, prompt: Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> Request | None:
        """Hold blocks for a prompt whose KV another instance will push. Returns the
        request (its `num_cached_tokens` and `block_tables` say what to send where), or
        None when the cache is short right now (nothing is held then)."""
        req = self._make_request(prompt, params, request_id)
        if self._inflight is not None:
            # A launched step may still write the last slot of a request that has ended
            # meanwhile; its blocks must not go to a transfer, written from another stream,
            # before that step is done.
            self._inflight[1].wait()
        if not self.scheduler.reserve(req):
            return None
        self.outputs.add(req)
        return req

    def first_token(
        self, request_id: str, token: int, logprobs: tuple[float, list[tuple[int, float]]] | None = None
    ) -> RequestOutput:
        """Prefill sampled the prompt's first token; its KV may still be arriving. The
        output can go to the client at once. The request stays transferring (blocks held,
        not scheduled) until `complete_transfer` or `fail_transfer`; if this token ends it
        (a stop id, max_tokens=1), the output is its last, and the transfer's close only
        gives its blocks back."""
        req = self._transferring(request_id)
        if req.output_token_ids:
            raise ValueError(f"first_token: request {request_id!r} has its first token already")
        vocab = self.config.model.vocab_size
        if not 0 <= token < vocab:
            raise ValueError(f"first_token: token id {token} is outside the vocabulary [0, {vocab})")
        req.output_token_ids.append(token)
        if req.generator is not None and not req.sampling_params.greedy:
            skip_draw(req.generator, vocab)  # prefill drew the first token
        if logprobs is not None and req.sampling_params.logprobs is not None:
            req.logprobs.append(logprobs)
        status = self.outputs.check_stop(req)
        if status is not None:
            self.scheduler.finish_transferring(req, status)
        return self.outputs.make_output(req)

    def complete_transfer(
        self, request_id: str, first_token: int | None = None,
        logprobs: tuple[float, list[tuple[int, float]]] | None = None,
    ) -> RequestOutput | None:
        """The prompt's KV arrived: the request joins the batch (one its first token
        ended gives its blocks back). With `first_token`, that token is recorded first
        (`first_token()`, for a caller that learns both at once) and its output returned."""
        out = None if first_token is None else self.first_token(request_id, first_token, logprobs)
        req = self._transferring(request_id)
        if not req.output_token_ids:
            raise ValueError(f"first_token: request {request_id!r} has none yet; pass it, or call first_token()")
        self.scheduler.complete_transfer(req)
        return out

    def fail_transfer(self, request_id: str) -> None:
        """The transfer failed or was aborted (call it once no byte can land any more):
        the reserved blocks go back and the request queues for a local prefill of its
        prompt and first token, if it has one (recompute, as after a preemption: the
        client has that token, and gets only the ones after it). One its first token
        ended is gone then."""
        self.scheduler.fail_transfer(self._transferring(request_id))

    def _transferring(self, request_id: str) -> Request:
        req = self.scheduler.transferring.get(request_id)
        if req is None:
            raise KeyError(f"request {request_id!r} is not waiting for a transfer (aborted?)")
        return req

    def abort(self, request_id: str) -> bool:
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return False
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        self.outputs.states.pop(request_id, None)
        return True

    @property
    def has_unfinished(self) -> bool:
        """A request is live (an in-flight step whose requests all ended is not one)."""
        return self.scheduler.has_unfinished

    @property
    def has_work(self) -> bool:
        """A step now would do something: compute, or read back a launched step."""
        return self.scheduler.has_schedulable or self._inflight is not None

    # -- the step --------------------------------------------------------------------------
    def step(self, hook=None) -> list[RequestOutput]:
        """hook (optional): `hook.begin(plan)` returns an on_layer(i) callback run as each
        layer finishes; `hook.end()` runs after the forward (the prefill role's KV push).
        Steps with a hook are never overlapped."""
        if hook is not None or not self.async_scheduling:
            return self._step_sync(hook)
        plan = self.scheduler.schedule()
        if plan.empty:
            return self._read_back()
        # A prompt's first token goes out at once, not a step late (it samples with no output yet).
        first_token = any(c.samples and not c.request.output_token_ids for c in plan.chunks)
        launched = self.runner.launch(plan)
        results = self._read_back()  # the previous step's tokens, while this one runs
        self.scheduler.update(plan, None)
        for c in plan.chunks:
            req = c.request
            if c.samples and not req.is_finished:
                p = req.sampling_params
                req.last_token_pending = (len(req.output_token_ids) >= p.max_tokens
                                          or req.num_tokens >= self.max_model_len)
        self._inflight = (plan, launched)
        if first_token:
            results += self._read_back()
        elif self.check_integrity_each_step:
            self.scheduler.check_integrity()
        return results

    def _step_sync(self, hook) -> list[RequestOutput]:
        results = self._read_back()
        plan = self.scheduler.schedule()
        if plan.empty:
            return results
        out = self.runner.run(plan, on_layer=hook.begin(plan) if hook is not None else None)
        if hook is not None:
            hook.end()
        self.scheduler.update(plan, out.sampled)
        for c in plan.chunks:
            if c.samples and not c.request.is_finished:
                results.append(self._after_token(c.request, out))
        if self.check_integrity_each_step:
            self.scheduler.check_integrity()
        return results

    def _read_back(self) -> list[RequestOutput]:
        """Wait for the launched step's sampled ids; put them in place of its PENDING
        tokens; stop checks and outputs."""
        if self._inflight is None:
            return []
        plan, launched = self._inflight
        self._inflight = None
        out = launched.result()
        results = []
        for c in plan.chunks:
            req = c.request
            if not c.samples or req.is_finished:  # finished: a step late, or aborted
                continue
            assert req.output_token_ids[-1] == PENDING, req.request_id
            req.output_token_ids[-1] = out.sampled[req.request_id]
            req.last_token_pending = False
            results.append(self._after_token(req, out))
        if self.check_integrity_each_step:
            self.scheduler.check_integrity()
        return results

    def _after_token(self, req: Request, out: RunnerOutput) -> RequestOutput:
        if req.request_id in out.logprobs:
            req.logprobs.append(out.logprobs[req.request_id])
        status = self.outputs.check_stop(req)
        if status is not None:
            self.scheduler.finish(req, status)
        return self.outputs.make_output(req)

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def prompt_logits(self, prompt: Sequence[int]) -> torch.Tensor:
        """Every position's logits [len(prompt), vocab] (fp32) for one prompt, computed
        through the scheduler as any request is (chunked under the token budget). For
        parity checks and scoring; run it on an idle engine."""
        if self._inflight is not None:
            if self.scheduler.has_unfinished:
                raise RuntimeError("prompt_logits: requests are running; run it on an idle engine")
            self._read_back()  # a step of requests that have all ended (stopped a step late)
        rid = self.add_request(prompt, SamplingParams(max_tokens=1, temperature=0))
        req = self.scheduler.requests[rid]
        rows = []
        while rid in self.scheduler.requests:
            plan = self.scheduler.schedule()
            out = self.runner.run(plan, all_logits=True)
            self.scheduler.update(plan, out.sampled)
            rows.append(out.all_logits)
            if req.output_token_ids:
                self.scheduler.finish(req, RequestStatus.FINISHED_LENGTH)
            if self.check_integrity_each_step:
                self.check_integrity()
        self.outputs.states.pop(rid, None)
        return torch.cat(rows)


class LLM:
    """Offline generation. Keyword arguments are the engine's settings (see `tandem
    generate --help` for what each does)."""

    def __init__(
        self,
        model: str | Path,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        block_size: int = 16,
        num_blocks: int | None = None,
        num_local_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        kv_cache_dtype: str = "auto",
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        seed: int = 0,
        ops: str = "auto",
        enforce_eager: bool = False,
        async_scheduling: bool | None = None,
        check_integrity: bool = False,
    ):
        cfg = EngineConfig(
            model_dir=str(model),
            model=ModelConfig.from_dir(model),
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, num_local_blocks=num_local_blocks,
                              enable_prefix_caching=enable_prefix_caching, kv_cache_dtype=kv_cache_dtype),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      max_model_len=max_model_len),
            device=DeviceConfig(device=device, dtype=dtype, cuda_graphs=not enforce_eager,
                                async_scheduling=async_scheduling),
            seed=seed,
        )
        self.engine = LLMEngine(cfg, ops=ops, check_integrity=check_integrity)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. A prompt is text or a list of token ids."""
        if not isinstance(prompts, (str, Sequence)):
            raise ValueError(f"prompts: expected text, token ids or a list of them, got {type(prompts).__name__}")
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts: must not be empty")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params: {len(sampling_params)} given for {len(prompts)} prompts")
        # Validate everything before queueing anything: all or nothing.
        reqs = []
        for p, sp in zip(prompts, sampling_params):
            req = self.engine._make_request(p, sp, None)
            req.request_id = f"{req.request_id}-{len(reqs)}"  # unique within this call too
            reqs.append(req)
        ids = [self.engine.enqueue(r) for r in reqs]
        return self._run(ids, use_tqdm)

    def chat(
        self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        if self.tokenizer is None:
            raise ValueError("messages: this model folder has no tokenizer")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode_chat(c) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="generating", disable=not use_tqdm)
        while len(done) < len(ids):
            for o in self.engine.step():
                if o.finished and o.request_id in wanted:
                    done[o.request_id] = o
                    bar.update(1)
        bar.close()
        return [done[i] for i in ids]
