"""The OpenAI-compatible REST shim: /v1/completions, /v1/chat/completions, /v1/models,
/health, /metrics (and FastAPI's /openapi.json and /docs).

Every error is OpenAI-shaped JSON (`{"error": {message, type, param, code}}`): a
malformed or ill-typed body is a 400 naming the field (never FastAPI's 422), an unknown
model 404, a missing or wrong key 401, overload 429 with Retry-After. A streamed
request's errors that happen before its first token get their real status too: the
response starts only once the first output arrived. A client that goes away aborts its
request everywhere (streaming: the response is cancelled; otherwise a watcher sees the
disconnect).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.core import Chunk, Gateway, Job, Usage
from gateway.errors import GatewayError
from gateway.protocol import ChatCompletionRequest, CompletionRequest


def error_response(e: GatewayError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(e.retry_after)))} if e.retry_after else None
    return JSONResponse(e.to_openai(), status_code=e.status, headers=headers)


# pydantic names a union's branch in the error location ("prompt.list[int].0"): not a field
_UNION_BRANCH = re.compile(r"str|int|float|bool|none|[a-z-]+\[.*\]|[A-Z]\w*")


def _validation_error(exc: RequestValidationError) -> GatewayError:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return GatewayError(400, f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}",
                            code="invalid_json")
    msg = err.get("msg", "invalid value")
    if err.get("type") == "value_error":  # our validators say "field: why"
        msg = msg.removeprefix("Value error, ")
        field, sep, _ = msg.partition(":")
        if sep and " " not in field:
            return GatewayError(400, msg, param=field, code="invalid_value")
    # Unions report one error per branch; name the field, and say what was wrong.
    param = ".".join(p for p in loc if not _UNION_BRANCH.fullmatch(p))
    if err.get("type") == "missing":
        return GatewayError(400, f"{param}: is required", param=param, code="missing_field")
    return GatewayError(400, f"{param or 'body'}: {msg}", param=param or None, code="invalid_value")


def make_app(gw: Gateway) -> FastAPI:
    app = FastAPI(title="tandem", version="0.1.0",
                  description="OpenAI-compatible API of tandem's gateway (disaggregated prefill/decode serving).")

    @app.exception_handler(GatewayError)
    async def _gateway_error(request, exc: GatewayError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(GatewayError(exc.status_code, str(exc.detail), code=code).to_openai(),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):  # a bug must still answer in the API's shape
        return error_response(GatewayError(500, f"internal error: {type(exc).__name__}: {exc}"))

    async def authorized(request: Request) -> None:
        gw.check_api_key(request.headers.get("authorization", ""))

    @app.get("/health")
    async def health():
        """200 when at least one decode instance is registered and live; 503 otherwise."""
        n = len(gw.router.live("decode"))
        body = {"status": "ok" if n else "no decode instance", "decode": n, "prefill": len(gw.router.live("prefill"))}
        return JSONResponse(body, status_code=200 if n else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(gw.metrics.render(gw.router.instances),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [_model_card(gw)]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    async def model(model_id: str):
        gw.check_model(model_id)
        return _model_card(gw)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        gw.check_model(body.model)
        session = body.session_id or request.headers.get("x-session-id") or None
        sampling = body.sampling_pb(body.max_tokens, body.logprobs)
        jobs = []
        for p in body.prompts():
            s = type(sampling)()
            s.CopyFrom(sampling)
            jobs.append(await gw.prepare_completion(p, s, session_id=session))
        fmt = _CompletionFormat(gw, jobs[0].request_id, body.logprobs is not None)
        return await _respond(request, gw, jobs, fmt, body.stream,
                              bool(body.stream_options and body.stream_options.include_usage))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatCompletionRequest, request: Request):
        gw.check_model(body.model)
        session = body.session_id or request.headers.get("x-session-id") or None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        sampling = body.sampling_pb(body.max_new_tokens(), logprobs)
        job = await gw.prepare_chat([m.as_dict() for m in body.messages], sampling, session_id=session)
        fmt = _ChatFormat(gw, job.request_id, body.logprobs)
        return await _respond(request, gw, [job], fmt, body.stream,
                              bool(body.stream_options and body.stream_options.include_usage))

    return app


def _model_card(gw: Gateway) -> dict:
    return {"id": gw.cfg.served_model_name, "object": "model", "created": gw.created, "owned_by": "tandem",
            "max_model_len": gw.max_model_len}


# -- running jobs and shaping their output --------------------------------------------------
async def _merged(gw: Gateway, jobs: list[Job]) -> AsyncIterator[tuple[int, Chunk]]:
    """(choice index, chunk) from every job, as they come. Closing this closes them all."""
    if len(jobs) == 1:
        gen = gw.run(jobs[0])
        try:
            async for c in gen:
                yield 0, c
        finally:
            await gen.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, job):
        gen = gw.run(job)
        try:
            async for c in gen:
                await queue.put((i, c, None))
        except Exception as e:
            await queue.put((i, None, e))
        finally:
            await gen.aclose()

    tasks = [asyncio.create_task(pump(i, j)) for i, j in enumerate(jobs)]
    try:
        done = 0
        while done < len(jobs):
            i, c, err = await queue.get()
            if err is not None:
                raise err
            yield i, c
            done += c.finished
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _respond(request: Request, gw: Gateway, jobs: list[Job], fmt, stream: bool, include_usage: bool):
    gen = _merged(gw, jobs)
    if not stream:
        return await _collect(request, gen, fmt, len(jobs))
    # The response starts with the first output: admission, routing and decode errors
    # get their real status. A client that leaves meanwhile (say, queued) aborts it.
    task = asyncio.ensure_future(gen.__anext__())
    try:
        if not await _done_unless_client_left(request, task):
            return _client_left()
        first = task.result()
    except StopAsyncIteration:
        first = None
    finally:
        if not task.done() or task.cancelled() or task.exception() is not None:
            await gen.aclose()

    async def sse():
        usage: list[Usage] = []
        try:
            for c in fmt.start(len(jobs)):
                yield _sse(c)
            pending = [first] if first else []
            while True:
                if pending:
                    i, chunk = pending.pop()
                else:
                    try:
                        i, chunk = await gen.__anext__()
                    except StopAsyncIteration:
                        break
                if chunk.usage:
                    usage.append(chunk.usage)
                if chunk.text or chunk.token_ids or chunk.finished:
                    yield _sse(fmt.chunk(i, chunk))
            if include_usage:
                yield _sse(fmt.usage_chunk(usage))
            yield "data: [DONE]\n\n"
        except GatewayError as e:  # after the stream started: an error event, then the end
            yield _sse(e.to_openai())
            yield "data: [DONE]\n\n"
        finally:
            await gen.aclose()

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Request-ID": jobs[0].request_id})


async def _collect(request: Request, gen, fmt, n: int):
    """Run to the end; abort if the client disconnects meanwhile."""
    choices: dict[int, list[Chunk]] = {i: [] for i in range(n)}

    async def drain():
        async for i, c in gen:
            choices[i].append(c)

    task = asyncio.create_task(drain())
    try:
        if not await _done_unless_client_left(request, task):
            return _client_left()
        task.result()
    finally:
        await gen.aclose()
    return JSONResponse(fmt.whole(choices), headers={"X-Request-ID": fmt.id})


async def _done_unless_client_left(request: Request, task: asyncio.Future) -> bool:
    """Wait for `task`; if the client disconnects first, cancel it (which aborts the
    request everywhere) and return False."""
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return False
    return True


def _client_left() -> JSONResponse:
    return JSONResponse(GatewayError(499, "client closed the request").to_openai(), status_code=499)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def _usage(usages: list[Usage]) -> dict:
    p = sum(u.prompt_tokens for u in usages)
    c = sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in usages)}}


class _Format:
    """One endpoint's response shapes: `chunk` (streamed) and `whole` (one JSON)."""

    chunk_object = ""  # "object" of a streamed chunk
    whole_object = ""  # "object" of the whole response

    def __init__(self, gw: Gateway, rid: str, logprobs: bool):
        self.gw, self.id, self.logprobs = gw, rid, logprobs
        self.created = int(time.time())
        self.model = gw.cfg.served_model_name

    def envelope(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def token(self, tid: int) -> str:
        return self.gw.tok.decode([tid], skip_special_tokens=False)

    def start(self, n: int) -> list[dict]:
        return []

    def usage_chunk(self, usages: list[Usage]) -> dict:
        return self.envelope([], usage=_usage(usages))

    def whole(self, choices: dict[int, list[Chunk]]) -> dict:
        out = [{"index": i, **self.whole_choice(cs), "finish_reason": cs[-1].finish_reason if cs else None}
               for i, cs in sorted(choices.items())]
        res = self.envelope(out, usage=_usage([c.usage for cs in choices.values() for c in cs if c.usage]))
        res["object"] = self.whole_object
        return res

    def whole_choice(self, chunks: list[Chunk]) -> dict:
        raise NotImplementedError


class _CompletionFormat(_Format):
    chunk_object = whole_object = "text_completion"

    def __init__(self, gw: Gateway, rid: str, logprobs: bool):
        super().__init__(gw, rid, logprobs)
        self.offsets: dict[int, int] = {}  # streaming: where each choice's next token starts

    def _logprobs(self, chunks: list[Chunk], i: int | None = None) -> dict | None:
        if not self.logprobs:
            return None
        offset = self.offsets.get(i, 0) if i is not None else 0
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for c in chunks:
            for tid, lp in zip(c.token_ids, c.logprobs):
                tok = self.token(tid)
                out["text_offset"].append(offset)
                offset += len(tok)
                out["tokens"].append(tok)
                out["token_logprobs"].append(lp.chosen)
                top = {self.token(t.token_id): t.logprob for t in lp.top}
                top.setdefault(tok, lp.chosen)  # the sampled token is always listed, as vLLM does
                out["top_logprobs"].append(top)
        if i is not None:
            self.offsets[i] = offset
        return out

    def chunk(self, i: int, c: Chunk) -> dict:
        return self.envelope([{"index": i, "text": c.text, "logprobs": self._logprobs([c], i),
                               "finish_reason": c.finish_reason}])

    def whole_choice(self, chunks: list[Chunk]) -> dict:
        return {"text": "".join(c.text for c in chunks), "logprobs": self._logprobs(chunks)}


class _ChatFormat(_Format):
    chunk_object, whole_object = "chat.completion.chunk", "chat.completion"

    def _logprobs(self, chunks: list[Chunk]) -> dict | None:
        if not self.logprobs:
            return None

        def entry(tid, lp):
            tok = self.token(tid)
            return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

        return {"content": [{**entry(tid, lp.chosen), "top_logprobs": [entry(t.token_id, t.logprob) for t in lp.top]}
                            for c in chunks for tid, lp in zip(c.token_ids, c.logprobs)]}

    def start(self, n: int) -> list[dict]:
        return [self.envelope([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}]) for i in range(n)]

    def chunk(self, i: int, c: Chunk) -> dict:
        delta = {"content": c.text} if c.text or not c.finished else {}
        return self.envelope([{"index": i, "delta": delta, "logprobs": self._logprobs([c]),
                               "finish_reason": c.finish_reason}])

    def whole_choice(self, chunks: list[Chunk]) -> dict:
        return {"message": {"role": "assistant", "content": "".join(c.text for c in chunks)},
                "logprobs": self._logprobs(chunks)}
