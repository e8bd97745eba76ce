"""The request pipeline both front ends share (REST shim and gRPC API):

    prepare_*  validate and tokenize (chat template, session history) -> Job, or GatewayError 4xx
    run(job)   admit -> route -> stream from decode -> record, metrics, session; yields Chunks

One request's record in Redis goes queued -> running -> finished | aborted | failed.
A decode instance that cannot be reached before it sent anything is marked suspect and
the request goes to another one (--retries); once tokens have streamed, a failure ends
the request with an error (resuming it from its record is later work).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from gateway.config import GatewayConfig
from gateway.errors import GatewayError, bad_request, from_value_error
from gateway.metrics import Metrics
from gateway.router import Route, Router, RouteRequest
from gateway.state import Session, StateStore, RECORD_EVERY
from protos import common_pb2, decode_pb2, decode_pb2_grpc
from protos.convert import pack_token_ids

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A validated request, ready to route."""

    request_id: str
    kind: str  # "completion" | "chat"
    prompt_ids: list[int]
    sampling: common_pb2.SamplingParams
    session_id: str | None = None
    session: Session | None = None
    new_messages: list[dict] = field(default_factory=list)  # chat: what this turn adds to the session
    arrival: float = field(default_factory=time.perf_counter)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Chunk:
    token_ids: list[int]
    text: str
    logprobs: list = field(default_factory=list)  # common_pb2.Logprobs, one per token
    finished: bool = False
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class LocalRequest:
    """A request this replica runs: where it was routed, and whether someone aborted
    it. The flag is read before routing and after every response from decode, so an
    abort that lands in any gap (queued, routing, before decode has the request) still
    ends the request."""

    route: Route | None = None
    aborted: bool = False


class Admission:
    """At most `max_active` requests stream; up to `max_queue` more wait (FIFO) for up to
    `timeout` seconds; anything beyond is refused at once with a 429."""

    def __init__(self, max_active: int, max_queue: int, timeout: float, metrics: Metrics):
        self.sem = asyncio.Semaphore(max_active)
        self.max_queue = max_queue
        self.timeout = timeout
        self.waiting = 0
        self.metrics = metrics

    @contextlib.asynccontextmanager
    async def slot(self):
        t0 = time.perf_counter()
        if self.sem.locked() and self.waiting >= self.max_queue:
            raise GatewayError(429, f"too many requests: {self.waiting} already waiting; retry later",
                               code="rate_limit_exceeded", retry_after=1.0)
        self.waiting += 1
        self.metrics.queued.set(self.waiting)
        try:
            await asyncio.wait_for(self.sem.acquire(), self.timeout)
        except TimeoutError:
            raise GatewayError(429, f"no slot freed within {self.timeout:.0f} s; retry later",
                               code="rate_limit_exceeded", retry_after=2.0) from None
        finally:
            self.waiting -= 1
            self.metrics.queued.set(self.waiting)
        self.metrics.queue_time.observe(time.perf_counter() - t0)
        self.metrics.active.inc()
        try:
            yield
        finally:
            self.metrics.active.dec()
            self.sem.release()


class _Progress:
    """What one request has streamed so far, and the bookkeeping every decode response
    brings: TTFT / ITL / TPOT / E2E metrics, token counters, and the record in Redis
    (tokens appended as they come, counts at most every RECORD_EVERY seconds)."""

    def __init__(self, job: Job, metrics: Metrics, state: StateStore):
        self.job, self.m, self.state = job, metrics, state
        self.out_ids: list[int] = []
        self._text: list[str] = []
        self.first: float | None = None  # perf_counter of the first token
        self.last: float | None = None
        self.cached = 0
        self._recorded = 0.0

    @property
    def text(self) -> str:
        return "".join(self._text)

    def add(self, resp, now: float) -> None:
        rid, m = self.job.request_id, self.m
        if resp.token_ids:
            if self.first is None:
                self.first = now
                self.cached = resp.num_cached_tokens
                m.ttft.observe(now - self.job.arrival)
                m.prompt_tokens.inc(len(self.job.prompt_ids))
                m.cached_tokens.inc(resp.num_cached_tokens)
                if resp.num_transferred_tokens:
                    m.transfer_tokens.inc(resp.num_transferred_tokens)
                    m.transfer_bytes.inc(resp.bytes_transferred)
                    m.transfer_seconds.observe(resp.prefill_seconds)
                self.state.record(rid, ttft=now - self.job.arrival, cached_tokens=resp.num_cached_tokens,
                                  transferred_tokens=resp.num_transferred_tokens)
            else:
                m.itl.observe(now - self.last)
            self.last = now
            m.generation_tokens.inc(len(resp.token_ids))
            self.state.append_tokens(rid, resp.token_ids)
            self.out_ids.extend(resp.token_ids)
        self._text.append(resp.text)
        if not resp.finished and now - self._recorded > RECORD_EVERY:
            self._recorded = now
            self.state.record(rid, output_tokens=len(self.out_ids))

    def usage(self) -> Usage:
        return Usage(len(self.job.prompt_ids), len(self.out_ids), self.cached)

    def done(self, reason: str) -> None:
        now = time.perf_counter()
        e2e = now - self.job.arrival
        self.m.e2e.observe(e2e)
        if self.first is not None and len(self.out_ids) > 1:
            self.m.tpot.observe((self.last - self.first) / (len(self.out_ids) - 1))
        self.state.record(self.job.request_id, status="aborted" if reason == "abort" else "finished",
                          finish_reason=reason, output_tokens=len(self.out_ids), e2e=e2e, finished_at=time.time())


def _model_limits(model_dir: str) -> tuple[int, int]:
    """(max_model_len, vocab_size) from config.json (text_config for multimodal Llama 4)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    return int(cfg.get("max_position_embeddings", 2048)), int(cfg["vocab_size"])


class Gateway:
    def __init__(self, cfg: GatewayConfig, tokenizer, router: Router, state: StateStore, metrics: Metrics):
        self.cfg = cfg
        self.tok = tokenizer
        self.router = router
        self.state = state
        self.metrics = metrics
        self.admission = Admission(cfg.max_concurrent, cfg.max_queue, cfg.queue_timeout, metrics)
        self.config_max_len, self.vocab_size = _model_limits(cfg.model_dir)
        self.created = int(time.time())
        self._channels: dict[str, tuple[grpc.aio.Channel, decode_pb2_grpc.DecodeServiceStub]] = {}
        self.local: dict[str, LocalRequest] = {}  # request id -> its state, for requests this replica runs

    # -- limits --------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        lens = [i.max_model_len for i in self.router.live("decode") if i.max_model_len]
        return min(lens) if lens else self.config_max_len

    def check_api_key(self, authorization: str) -> None:
        """`authorization`: the 'Authorization' header (REST) or metadata (gRPC) value."""
        if not self.cfg.api_keys:
            return
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self.cfg.api_keys:
            raise GatewayError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.cfg.served_model_name:
            raise GatewayError(404, f"The model `{model}` does not exist; this server serves "
                                    f"`{self.cfg.served_model_name}`", param="model", code="model_not_found")

    def _check_prompt(self, ids: list[int], sampling: common_pb2.SamplingParams, default_max: int | None) -> None:
        if not ids:
            raise bad_request("prompt: must not be empty", "prompt")
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"prompt: token id {bad} is outside the vocabulary [0, {self.vocab_size})", "prompt")
        limit = self.max_model_len
        max_prompt = min(self.cfg.max_prompt_tokens or limit, limit - 1)
        if len(ids) > max_prompt:
            raise GatewayError(400, f"prompt: {len(ids)} tokens is more than the {max_prompt} allowed",
                               param="prompt", code="context_length_exceeded")
        if not sampling.max_tokens:
            sampling.max_tokens = default_max if default_max is not None else limit - len(ids)
            if self.cfg.max_tokens_limit:
                sampling.max_tokens = min(sampling.max_tokens, self.cfg.max_tokens_limit)
        if self.cfg.max_tokens_limit and sampling.max_tokens > self.cfg.max_tokens_limit:
            raise bad_request(f"max_tokens: {sampling.max_tokens} is more than the {self.cfg.max_tokens_limit} "
                              f"allowed", "max_tokens")
        if len(ids) + sampling.max_tokens > limit:
            raise GatewayError(400, f"max_tokens: the prompt ({len(ids)} tokens) plus max_tokens "
                                    f"({sampling.max_tokens}) is more than the model's {limit}-token context",
                               param="max_tokens", code="context_length_exceeded")

    # -- preparing -----------------------------------------------------------------------
    async def _session(self, sid: str | None, kind: str) -> Session | None:
        """The session's state, with its turn lock held (released when the job ends:
        two turns at once would each append to the history the other did not see)."""
        if not sid:
            return None
        if not await self.state.lock_session(sid, self.cfg.request_timeout):
            raise GatewayError(409, f"session_id: another turn of session {sid!r} is still running",
                               param="session_id", code="session_busy")
        try:
            s = await self.state.load_session(sid)
            if s is not None and s.kind != kind:
                raise bad_request(f"session_id: session {sid!r} holds a {s.kind}, not a {kind}", "session_id")
        except BaseException:
            await self.state.unlock_session(sid)
            raise
        return s

    @contextlib.asynccontextmanager
    async def _unlock_on_error(self, sid: str | None):
        try:
            yield
        except BaseException:
            if sid:
                await self.state.unlock_session(sid)
            raise

    async def prepare_completion(self, prompt: str | list[int], sampling: common_pb2.SamplingParams, *,
                                 request_id: str | None = None, session_id: str | None = None) -> Job:
        session = await self._session(session_id, "completion")
        async with self._unlock_on_error(session_id):
            history = session.token_ids if session else []
            try:
                if isinstance(prompt, str):
                    ids = self.tok.encode(prompt, add_special_tokens=not history)
                else:
                    ids = list(prompt)
            except ValueError as e:
                raise from_value_error(e) from None
            ids = history + ids
            self._check_prompt(ids, sampling, 16)
            return Job(request_id or f"cmpl-{uuid.uuid4().hex}", "completion", ids, sampling, session_id, session)

    async def prepare_chat(self, messages: list[dict], sampling: common_pb2.SamplingParams, *,
                           request_id: str | None = None, session_id: str | None = None) -> Job:
        session = await self._session(session_id, "chat")
        async with self._unlock_on_error(session_id):
            history = session.messages if session else []
            try:
                ids = self.tok.encode_chat(history + messages)
            except ValueError as e:
                raise from_value_error(e) from None
            self._check_prompt(ids, sampling, None)
            return Job(request_id or f"chatcmpl-{uuid.uuid4().hex}", "chat", ids, sampling, session_id, session,
                       new_messages=messages)

    # -- running -------------------------------------------------------------------------
    def _stub(self, address: str) -> decode_pb2_grpc.DecodeServiceStub:
        if address not in self._channels:
            ch = grpc.aio.insecure_channel(address)
            self._channels[address] = (ch, decode_pb2_grpc.DecodeServiceStub(ch))
        return self._channels[address][1]

    async def close(self) -> None:
        for ch, _ in self._channels.values():
            await ch.close()

    async def run(self, job: Job) -> AsyncIterator[Chunk]:
        """Stream a job's output. The caller must close the generator (`aclose`) when its
        client goes away: that cancels the decode call, which aborts the request there."""
        rid, m = job.request_id, self.metrics
        if rid in self.local:
            if job.session_id:  # its prepare took the session's turn lock
                await self.state.unlock_session(job.session_id)
            raise bad_request(f"request_id: {rid!r} is already running", "request_id")
        self.local[rid] = LocalRequest()
        outcome = "failed"
        try:
            self.state.record(rid, status="queued", kind=job.kind, model=self.cfg.served_model_name,
                              prompt_tokens=len(job.prompt_ids), session_id=job.session_id or "",
                              max_tokens=job.sampling.max_tokens, created_at=time.time())
            async with self.admission.slot():
                async for chunk in self._stream(job):
                    if chunk.finished:
                        outcome = "aborted" if chunk.finish_reason == "abort" else "finished"
                    yield chunk
        except GatewayError as e:
            outcome = "rejected" if e.status < 500 else "failed"
            self.state.record(rid, status=outcome, error=e.message)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        finally:
            self.local.pop(rid, None)
            m.requests.labels(outcome).inc()
            if outcome in ("cancelled", "failed"):
                self.state.record(rid, status=outcome)
            if job.session_id:  # after the session was saved: the next turn sees this one
                await self.state.unlock_session(job.session_id)

    async def _stream(self, job: Job) -> AsyncIterator[Chunk]:
        rid, m = job.request_id, self.metrics
        rreq = RouteRequest(len(job.prompt_ids),
                            session_decode=job.session.decode if job.session else None,
                            prefix_holders=tuple(await self.state.prefix_holders(job.prompt_ids, self._block_size())))
        tried: set[str] = set()
        for attempt in range(self.cfg.retries + 1):
            if self.local[rid].aborted:  # while it waited for a slot or for the prefix lookup
                self.state.record(rid, status="aborted", finish_reason="abort")
                yield Chunk([], "", finished=True, finish_reason="abort", usage=Usage(len(job.prompt_ids), 0, 0))
                return
            route = self.router.route(rreq, exclude=tried)
            self.local[rid].route = route  # no await since the check: an abort from here on reaches decode
            m.routed.labels(route.reason).inc()
            try:
                async for chunk in self._on_decode(job, route):
                    yield chunk
                return
            except _Unreachable as e:
                tried.add(route.decode.id)
                self.router.mark_failed(route.decode)
                log.warning("request %s: decode %s unreachable (%s); attempt %d of %d", rid, route.decode.id, e,
                            attempt + 1, self.cfg.retries + 1)
        raise GatewayError(503, f"no decode instance could take the request after {len(tried)} tries",
                           code="no_instance", retry_after=1.0)

    def _block_size(self) -> int:
        decodes = self.router.live("decode")
        return decodes[0].block_size if decodes else 16

    async def _on_decode(self, job: Job, route: Route) -> AsyncIterator[Chunk]:
        """Stream one attempt on `route.decode`. The router's load counters count the
        request while it runs (and its prompt on the prefill until the first token)."""
        rid, r = job.request_id, self.router
        # Packed (4 bytes an id): decode parses it without a Python int per id.
        req = decode_pb2.GenerateRequest(request_id=rid, sampling=job.sampling,
                                         packed_prompt_token_ids=pack_token_ids(array("I", job.prompt_ids)),
                                         prefill_address=route.prefill.address if route.prefill else "")
        self.state.record(rid, status="running", decode=route.decode.id, route_reason=route.reason,
                          prefill=route.prefill.id if route.prefill else "")
        mine, progress = self.local[rid], _Progress(job, self.metrics, self.state)
        r.inflight[route.decode.id] += 1
        prefill_tokens = len(job.prompt_ids) if route.prefill else 0
        if prefill_tokens:
            r.queued_prefill[route.prefill.id] += prefill_tokens
        call = self._stub(route.decode.address).Generate(req, timeout=self.cfg.request_timeout)
        finished = False
        try:
            try:
                async for resp in call:
                    progress.add(resp, time.perf_counter())
                    if progress.first is not None and prefill_tokens:  # prefill's part is done
                        r.queued_prefill[route.prefill.id] -= prefill_tokens
                        prefill_tokens = 0
                    finished = resp.finished or mine.aborted
                    if mine.aborted and not resp.finished:  # aborted here or via another replica
                        call.cancel()
                        yield Chunk(list(resp.token_ids), resp.text, list(resp.logprobs))
                        resp = decode_pb2.GenerateResponse(finished=True, finish_reason="abort")
                    if finished:
                        await self._finish(job, route, progress, resp.finish_reason)
                    yield Chunk(list(resp.token_ids), resp.text, list(resp.logprobs), finished,
                                resp.finish_reason or None, progress.usage() if finished else None)
                    if finished:
                        return
            except grpc.aio.AioRpcError as e:
                raise _translate(e, nothing_sent=not progress.out_ids) from None
            raise GatewayError(503, f"decode {route.decode.id} ended the stream without finishing")
        finally:
            r.inflight[route.decode.id] -= 1
            if prefill_tokens:
                r.queued_prefill[route.prefill.id] -= prefill_tokens
            if not finished:
                call.cancel()  # decode sees the cancellation and aborts the request, freeing its blocks

    async def _finish(self, job: Job, route: Route, progress: _Progress, reason: str) -> None:
        """The request's last response: final metrics and record; then, unless aborted,
        the prefix index and the session learn what decode now holds."""
        progress.done(reason)
        if reason == "abort":
            return
        full = job.prompt_ids + progress.out_ids
        self.state.remember_prefix(full, route.decode.block_size, route.decode.id)
        if job.session_id:
            s = job.session or Session(kind=job.kind)
            if job.kind == "chat":
                s.messages = s.messages + job.new_messages + [{"role": "assistant", "content": progress.text}]
            else:
                s.token_ids = full
            s.decode, s.turns = route.decode.id, s.turns + 1
            await self.state.save_session(job.session_id, s)

    # -- aborting ------------------------------------------------------------------------
    async def abort(self, rid: str) -> bool:
        """Abort a request wherever it runs: this replica's queue, or the decode instance
        its record names (so any replica can abort any request)."""
        mine = self.local.get(rid)
        if mine is not None:
            mine.aborted = True
            if mine.route is None:  # waiting for a slot here, not routed yet
                return True
        address = mine.route.decode.address if mine is not None else None
        if address is None:
            rec = await self.state.read_record(rid)
            if rec.get("status") not in ("queued", "running"):
                return False
            inst = self.router.by_id(rec.get("decode", ""))
            address = inst.address if inst else None
        if address is None:
            return False
        try:
            resp = await self._stub(address).Abort(common_pb2.AbortRequest(request_id=rid), timeout=5)
        except grpc.aio.AioRpcError as e:
            if mine is not None:
                return True  # the flag ends it here whatever decode says
            raise GatewayError(503, f"abort: decode at {address} did not answer: {e.details()}") from None
        return resp.found or mine is not None


class _Unreachable(Exception):
    pass


def _translate(e: grpc.aio.AioRpcError, nothing_sent: bool) -> Exception:
    code = e.code()
    if code == grpc.StatusCode.UNAVAILABLE and nothing_sent and "prefill" not in (e.details() or ""):
        return _Unreachable(e.details())
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return from_value_error(ValueError(e.details()))
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return GatewayError(429, e.details() or "decode is full", code="rate_limit_exceeded", retry_after=1.0)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return GatewayError(504, "the request ran past --request-timeout")
    return GatewayError(503, f"decode failed: {code.name}: {e.details()}")
