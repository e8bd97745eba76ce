"""A tiny OpenAI-shaped streaming server for the load-testing harness's tests.

It speaks just enough of the gateway's REST API: GET /health, GET /v1/models, streaming
POST /v1/completions and /v1/chat/completions (one chunk per token, then a usage chunk,
then `data: [DONE]`). Its answers are predictable, so tests can check exact counts:

    usage.prompt_tokens      len(prompt ids), or words in a text prompt, plus the
                             session's earlier prompt tokens when session_id is given
    usage.completion_tokens  max_tokens; each chunk's text is "t{i} "

The model name picks a misbehaviour: "overloaded" -> 429 with Retry-After and an
OpenAI-shaped error; "disconnect" -> two chunks, then the connection is dropped;
"no-done" -> the stream ends cleanly but without [DONE]; "no-usage" -> no usage chunk.
Two requests of one session in flight at once get a 409 (turns must be sequential).
GET /stats reports the peak number of requests in flight and the requests seen.

In-process: `start(port=0)` inside a running loop; as a stack: `python fake_server.py --port P`.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web


class FakeServer:
    def __init__(self, token_delay: float = 0.001, first_token_delay: float = 0.005):
        self.token_delay, self.first_token_delay = token_delay, first_token_delay
        self.in_flight = self.peak_in_flight = 0
        self.requests: list[dict] = []
        self.session_tokens: dict[str, int] = {}
        self.sessions_in_flight: set[str] = set()
        self.runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        async def health(request):
            return web.json_response({"status": "ok"})

        async def models(request):
            return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

        async def stats(request):
            return web.json_response({"peak_in_flight": self.peak_in_flight, "requests": self.requests})

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/v1/models", models)
        app.router.add_get("/stats", stats)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.completions)
        return app

    async def start(self, port: int = 0) -> "FakeServer":
        self.runner = web.AppRunner(self.app())
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        model, sid = body["model"], body.get("session_id")
        if model == "overloaded":
            return web.json_response({"error": {"message": "too many requests", "type": "overloaded",
                                                "param": None, "code": 429}},
                                     status=429, headers={"Retry-After": "1"})
        if sid is not None and sid in self.sessions_in_flight:
            return web.json_response({"error": {"message": f"session {sid} busy", "type": "conflict",
                                                "param": "session_id", "code": 409}}, status=409)
        chat = request.path.endswith("chat/completions")
        if chat:
            prompt_tokens = len(body["messages"][-1]["content"].split())
        else:
            prompt = body["prompt"]
            prompt_tokens = len(prompt.split()) if isinstance(prompt, str) else len(prompt)
        if sid is not None:
            prompt_tokens += self.session_tokens.get(sid, 0)
            self.sessions_in_flight.add(sid)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await self._stream(request, body, chat, model, prompt_tokens)
        finally:
            self.in_flight -= 1
            if sid is not None:
                self.sessions_in_flight.discard(sid)
                self.session_tokens[sid] = prompt_tokens + body["max_tokens"]

    async def _stream(self, request, body, chat, model, prompt_tokens) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(obj) -> None:
            await resp.write(f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n".encode())

        if chat:  # OpenAI's first chat chunk only announces the role
            await send({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                                            "content": ""}}]})
        n = body["max_tokens"]
        await asyncio.sleep(self.first_token_delay)
        for i in range(n):
            if i:
                await asyncio.sleep(self.token_delay)
            text = f"t{i} "
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            choice["finish_reason"] = "length" if i == n - 1 else None
            await send({"object": "text_completion", "choices": [choice], "usage": None})
            if model == "disconnect" and i == 1:
                request.transport.close()  # drop the connection mid-stream, no terminating chunk
                return resp
        if model != "no-usage":
            await send({"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                 "total_tokens": prompt_tokens + n,
                                                 "prompt_tokens_details": {"cached_tokens": 0}}})
        if model != "no-done":
            await send("[DONE]")
        await resp.write_eof()
        return resp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token-delay", type=float, default=0.001)
    args = p.parse_args()
    web.run_app(FakeServer(token_delay=args.token_delay).app(), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
