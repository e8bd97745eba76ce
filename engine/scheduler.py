"""Continuous batching with chunked prefill and preemption by recompute.

Queue lifecycle of a request:
  add() -> waiting -> (admitted: prefix hit + blocks) -> running -> finish() -> gone
                 ^                                          |
                 +---- preempted: blocks freed, counters ---+
                       reset, front of the waiting queue
Decode role, KV computed elsewhere:
  reserve() -> transferring (blocks held, not scheduled) -> complete_transfer() -> running
                    | first token: appended at once (the client may see it while the
                    |   KV is still arriving); if it ends the request, finish_transferring()
                    |   marks it finished, and the transfer's close frees its blocks
                    | fail_transfer(recompute): blocks freed -> waiting (prefilled here,
                    |   with its first token if it has one, as a preempted request is)
                    | finish(): aborted, blocks freed

`schedule()` spends a token budget: first on running requests in arrival order (a
decode takes one token, an unfinished prefill takes what is left of the budget), then
admits waiting requests while the budget and `max_num_seqs` allow. When a running
request cannot get blocks, the latest-admitted running request is preempted (its
blocks freed, its tokens recomputed later) until it can. The plan it returns is plain
data: which request computes which token range.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.config import SchedulerConfig
from engine.kv_cache import KVCacheManager
from engine.request import PENDING, Request, RequestStatus


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    start: int  # first token position computed (num_computed_tokens at schedule time)
    num_tokens: int
    samples: bool  # reaches the end of the request's tokens: its last logits are sampled


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kv: KVCacheManager):
        self.cfg = cfg
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.transferring: dict[str, Request] = {}
        self.requests: dict[str, Request] = {}

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def reserve(self, req: Request) -> bool:
        """Decode role: take the prefix hit and hold blocks for the rest of the prompt,
        which another instance will fill. False (nothing held) when blocks are short."""
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        hit = self.kv.acquire_prefix(req)
        req.num_computed_tokens = req.num_cached_tokens = hit
        if not self.kv.reserve(req, req.num_tokens):
            self.kv.free(req)
            req.num_computed_tokens = req.num_cached_tokens = 0
            return False
        req.status = RequestStatus.TRANSFERRING
        self.requests[req.request_id] = req
        self.transferring[req.request_id] = req
        return True

    def complete_transfer(self, req: Request) -> None:
        """The prompt's KV arrived (its first token came before): decode from here. A
        request its first token ended only gives its blocks back."""
        if req.is_finished:
            self.finish(req, req.status)
            return
        del self.transferring[req.request_id]
        start, req.num_computed_tokens = req.num_computed_tokens, req.num_prompt_tokens
        self.kv.cache_full_blocks(req, from_token=start)
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def fail_transfer(self, req: Request) -> None:
        """The transfer failed: drop the reserved blocks and prefill here instead (prompt
        and first token, if any: tokens already out are kept, as after a preemption)."""
        if req.is_finished:
            self.finish(req, req.status)
            return
        del self.transferring[req.request_id]
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def finish_transferring(self, req: Request, status: RequestStatus) -> None:
        """Its first token ended a request whose transfer is still open: it is finished
        (its output says so), but it keeps its blocks, which bytes may still land in,
        until complete_transfer or fail_transfer closes the transfer."""
        assert self.transferring.get(req.request_id) is req, req.request_id
        req.status = status

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def has_schedulable(self) -> bool:
        """Work a step can do now (requests waiting on a transfer are not)."""
        return bool(self.running or self.waiting)

    def schedule(self) -> SchedulerOutput:
        budget = self.cfg.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.last_token_pending:  # ends once its pending token is read back
                i += 1
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                chunks.append(self._chunk(req, n))
                budget -= n
                i += 1

        # No admissions in a step that had to preempt: memory is short.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            fresh = req.num_preemptions == 0
            hit = self.kv.acquire_prefix(req)
            req.num_computed_tokens = hit
            if fresh:
                req.num_cached_tokens = hit
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate_slots(req, n):
                self.kv.free(req)
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chunks.append(self._chunk(req, n))
            budget -= n
        return SchedulerOutput(tuple(chunks), tuple(preempted))

    @staticmethod
    def _chunk(req: Request, n: int) -> ScheduledChunk:
        return ScheduledChunk(req, req.num_computed_tokens, n, req.num_computed_tokens + n == req.num_tokens)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def update(self, plan: SchedulerOutput, sampled: dict[str, int] | None) -> None:
        """Advance counters after the runner computed the plan (or, with async
        scheduling, launched it); append the sampled tokens (sampled None: PENDING ones,
        which the engine replaces when the step's ids reach the host)."""
        for c in plan.chunks:
            req = c.request
            if req.is_finished:  # aborted while the step ran
                continue
            req.num_computed_tokens = c.start + c.num_tokens
            self.kv.cache_full_blocks(req, from_token=c.start)
            self.kv.release_out_of_window(req)
            if c.samples:
                req.output_token_ids.append(sampled[req.request_id] if sampled is not None else PENDING)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a request (stopped, length, aborted): release its blocks exactly once. (A
        request still here may be finished already: see finish_transferring.)"""
        if self.requests.get(req.request_id) is not req:
            return  # released before
        req.status = status
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.transferring.pop(req.request_id, None)
        self.kv.free(req)
        del self.requests[req.request_id]

    def abort(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None:
            return False
        self.finish(req, RequestStatus.FINISHED_ABORTED)
        return True

    def check_integrity(self) -> None:
        live = list(self.requests.values())
        for r in self.waiting:
            if r.status is not RequestStatus.WAITING:
                raise AssertionError(f"{r.request_id} in waiting queue with status {r.status}")
        self.kv.check_integrity(live)
