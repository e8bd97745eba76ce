"""Asynchronous clients that send one request, stream its answer and time it.

Two backends, one interface (`send(spec, model) -> RequestRecord`, `list_models()`,
`ready()`, used as `async with`):

    openai  aiohttp against the gateway's OpenAI REST API: /v1/completions (or
            /v1/chat/completions) with `stream: true`, Server-Sent Events back
    grpc    grpc.aio against the public gRPC API (protos/api.proto, tandem.api.v1.Tandem)

One client holds one aiohttp session (no connection cap) or one gRPC channel (HTTP/2
multiplexes the streams), so a single process keeps thousands of streams open.

Timing: the clock starts just before the request is sent. A "token arrival" is a chunk
that carries generated text (SSE) or token ids (gRPC); TTFT is the first arrival and the
inter-token latencies (ITL) are the gaps between arrivals, so a chunk holding several
tokens counts once, as `vllm bench serve` does. Token counts come from the server's usage
when it sends one, else from the chunks.

A request fails (and is recorded, never raised) on an error status, an error event in the
stream, a connection error or timeout, or a stream that ends without its terminator
(`data: [DONE]` / a response with `finished`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from loadtest.workloads import RequestSpec

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class ClientConfig:
    backend: str = "openai"
    base_url: str = "http://127.0.0.1:8000"   # grpc: grpc://HOST:PORT or HOST:PORT
    endpoint: str = "/v1/completions"          # grpc: chat uses the Chat RPC, else Generate
    model: str | None = None                   # None: the server's first model
    api_key: str | None = None                 # sent as "Authorization: Bearer KEY"
    temperature: float = 0.0
    ignore_eos: bool = True                    # benchmarks want exactly output_len tokens
    request_timeout: float | None = 3600.0     # seconds for a whole request; None: no limit

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")
        if not self.base_url:
            raise ValueError("base_url must not be empty")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {self.request_timeout}")

    @property
    def chat(self) -> bool:
        return self.endpoint == "/v1/chat/completions"


@dataclass
class RequestRecord:
    """What happened to one request. Times are seconds; `start_time` is time.perf_counter()."""

    success: bool = False
    error: str = ""            # kind: "http_429", "grpc_UNAVAILABLE", "ClientPayloadError", ...
    error_message: str = ""
    prompt_len: int = 0        # usage.prompt_tokens when sent, else the spec's (0 for unknown text)
    output_tokens: int = 0     # usage.completion_tokens when sent, else counted from chunks
    cached_tokens: int | None = None
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0       # end to end
    start_time: float = 0.0
    generated_text: str = ""

    def fail(self, kind: str, message: str = "") -> None:
        self.success, self.error, self.error_message = False, kind, message[:500]


class _Timing:
    """Turns chunk arrival times into a record's ttft and itl."""

    def __init__(self, record: RequestRecord):
        self.record = record
        self.start = record.start_time = time.perf_counter()
        self.last: float | None = None
        self.arrivals = 0

    def arrival(self, now: float) -> None:
        if self.last is None:
            self.record.ttft = now - self.start
        else:
            self.record.itl.append(now - self.last)
        self.last = now
        self.arrivals += 1

    def finish(self) -> None:
        self.record.latency = time.perf_counter() - self.start


class SSEDecoder:
    """Incremental Server-Sent Events parser: feed bytes as they come, get the `data`
    payload of each complete event. Events end at a blank line; a multi-line `data` field
    is joined with newlines; comments (`:`) and other fields are ignored."""

    def __init__(self):
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        events = []
        *lines, self._buf = self._buf.split(b"\n")  # the last piece may be a partial line
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8")
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith("data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(" ") else value)
        return events


class _StreamError(Exception):
    """An error event inside a 200 stream."""


def _error_message(body: str) -> str:
    try:
        err = json.loads(body)["error"]
        return err["message"] if isinstance(err, dict) else str(err)
    except (ValueError, KeyError, TypeError):
        return body.strip()


class OpenAIClient:
    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        self._base = cfg.base_url.rstrip("/")
        self._session = None

    async def __aenter__(self) -> "OpenAIClient":
        import aiohttp

        headers = {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}
        # limit=0: no cap on open connections (the default 100 would queue our streams).
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    async def ready(self) -> bool:
        """GET /health answers 200."""
        import aiohttp

        try:
            async with self._session.get(self._base + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def list_models(self) -> list[str]:
        async with self._session.get(self._base + "/v1/models") as r:
            body = await r.text()
            if r.status != 200:
                raise RuntimeError(f"GET /v1/models: HTTP {r.status}: {_error_message(body)}")
        return [m["id"] for m in json.loads(body)["data"]]

    def payload(self, spec: RequestSpec, model: str) -> dict:
        body = {"model": model, "max_tokens": spec.output_len, "temperature": self.cfg.temperature,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": self.cfg.ignore_eos}
        if self.cfg.chat:
            body["messages"] = [{"role": "user", "content": spec.prompt_text()}]
        else:
            body["prompt"] = spec.prompt if isinstance(spec.prompt, str) else list(spec.prompt)
        if spec.session_id is not None:
            body["session_id"] = spec.session_id
        return body

    async def send(self, spec: RequestSpec, model: str) -> RequestRecord:
        import aiohttp

        rec = RequestRecord(prompt_len=spec.prompt_len or 0)
        timing = _Timing(rec)
        try:
            async with self._session.post(self._base + self.cfg.endpoint, json=self.payload(spec, model)) as resp:
                if resp.status != 200:
                    rec.fail(f"http_{resp.status}", _error_message(await resp.text()))
                else:
                    await self._read_stream(resp, rec, timing)
        except asyncio.TimeoutError:
            rec.fail("timeout", f"no answer within {self.cfg.request_timeout} s")
        except aiohttp.ClientError as e:
            rec.fail(type(e).__name__, str(e))
        except _StreamError as e:
            rec.fail("stream_error", str(e))
        except (ValueError, KeyError, TypeError) as e:  # a chunk that isn't the JSON we expect
            rec.fail("bad_chunk", f"{type(e).__name__}: {e}")
        timing.finish()
        return rec

    async def _read_stream(self, resp, rec: RequestRecord, timing: _Timing) -> None:
        decoder, texts, usage = SSEDecoder(), [], None
        async for data in resp.content.iter_any():
            now = time.perf_counter()  # every event in this read arrived now
            for event in decoder.feed(data):
                if event == "[DONE]":
                    rec.generated_text = "".join(texts)
                    rec.output_tokens = usage["completion_tokens"] if usage else timing.arrivals
                    rec.success = True
                    return
                chunk = json.loads(event)
                if "error" in chunk:
                    raise _StreamError(_error_message(event))
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    rec.prompt_len = usage.get("prompt_tokens", rec.prompt_len)
                    rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                choices = chunk.get("choices") or []
                if choices:
                    c = choices[0]
                    text = (c.get("delta") or {}).get("content") if self.cfg.chat else c.get("text")
                    # Chat's first chunk announces the role with empty content: not a token.
                    if text:
                        timing.arrival(now)
                        texts.append(text)
        rec.fail("incomplete_stream", f"the stream ended after {timing.arrivals} chunks without [DONE]")


def grpc_target(base_url: str) -> str:
    """HOST:PORT from grpc://HOST:PORT, http://HOST:PORT or HOST:PORT."""
    if "://" in base_url:
        parts = urlsplit(base_url)
        if not parts.hostname or not parts.port:
            raise ValueError(f"base_url: a gRPC address needs a host and a port, got {base_url!r}")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return f"{host}:{parts.port}"
    return base_url


class GrpcClient:
    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        self._metadata = (("authorization", f"Bearer {cfg.api_key}"),) if cfg.api_key else None
        self._channel = self._stub = None

    async def __aenter__(self) -> "GrpcClient":
        import grpc

        from protos import api_pb2_grpc

        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        self._channel = grpc.aio.insecure_channel(grpc_target(self.cfg.base_url), options=options)
        self._stub = api_pb2_grpc.TandemStub(self._channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._channel.close()

    async def ready(self) -> bool:
        """ListModels answers."""
        import grpc

        from protos import api_pb2

        try:
            await self._stub.ListModels(api_pb2.ListModelsRequest(), timeout=5, metadata=self._metadata)
            return True
        except grpc.aio.AioRpcError:
            return False

    async def list_models(self) -> list[str]:
        from protos import api_pb2

        resp = await self._stub.ListModels(api_pb2.ListModelsRequest(), timeout=30, metadata=self._metadata)
        return [m.id for m in resp.models]

    def request(self, spec: RequestSpec, model: str):
        from protos import api_pb2, common_pb2

        sampling = common_pb2.SamplingParams(max_tokens=spec.output_len, temperature=self.cfg.temperature,
                                             ignore_eos=self.cfg.ignore_eos)
        if self.cfg.chat:
            return api_pb2.ChatRequest(model=model, sampling=sampling, session_id=spec.session_id or "",
                                       messages=[api_pb2.ChatMessage(role="user", content=spec.prompt_text())])
        req = api_pb2.GenerateRequest(model=model, sampling=sampling, session_id=spec.session_id or "")
        if isinstance(spec.prompt, str):
            req.text = spec.prompt
        else:
            req.token_ids.ids.extend(spec.prompt)
        return req

    async def send(self, spec: RequestSpec, model: str) -> RequestRecord:
        import grpc

        rec = RequestRecord(prompt_len=spec.prompt_len or 0)
        rpc = self._stub.Chat if self.cfg.chat else self._stub.Generate
        timing = _Timing(rec)
        texts, num_ids, finished = [], 0, False
        try:
            async for resp in rpc(self.request(spec, model), timeout=self.cfg.request_timeout,
                                  metadata=self._metadata):
                now = time.perf_counter()
                if resp.token_ids or resp.text:
                    timing.arrival(now)
                    texts.append(resp.text)
                    num_ids += len(resp.token_ids)
                if resp.HasField("usage"):
                    rec.prompt_len = resp.usage.prompt_tokens
                    rec.output_tokens = resp.usage.completion_tokens
                    rec.cached_tokens = resp.usage.cached_tokens
                finished = finished or resp.finished
        except grpc.aio.AioRpcError as e:
            rec.fail(f"grpc_{e.code().name}", e.details() or "")
        else:
            if finished:
                rec.success = True
                rec.generated_text = "".join(texts)
                rec.output_tokens = rec.output_tokens or num_ids or timing.arrivals
            else:
                rec.fail("incomplete_stream", f"the stream ended after {timing.arrivals} messages without finished")
        timing.finish()
        return rec


CLIENTS = {"openai": OpenAIClient, "grpc": GrpcClient}
BACKENDS = tuple(CLIENTS)


def make_client(cfg: ClientConfig) -> OpenAIClient | GrpcClient:
    return CLIENTS[cfg.backend](cfg)
