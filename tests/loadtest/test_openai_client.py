"""The OpenAI client against a tiny real aiohttp server (tests/loadtest/fake_server.py) on a free port:
SSE parsing, timing, usage, and the ways a request fails."""

import asyncio
import socket

import pytest

from loadtest.clients import ClientConfig, OpenAIClient, SSEDecoder
from loadtest.workloads import RequestSpec
from tests.loadtest.fake_server import FakeServer


def test_sse_decoder_handles_split_reads_crlf_comments_and_multiline_data():
    d = SSEDecoder()
    assert d.feed(b'data: {"a"') == []
    assert d.feed(b': 1}\n\ndata: x\r\n\r\n: a comment\n\nevent: ping\ndata: line1\ndata:line2\n') == ['{"a": 1}', "x"]
    assert d.feed(b"\n") == ["line1\nline2"]
    assert d.feed(b"data: [DONE]\n\n") == ["[DONE]"]


def send(model: str, spec: RequestSpec, **cfg):
    """Starts the fake server, sends one request through a fresh client, returns (record, server)."""

    async def main():
        server = await FakeServer().start()
        try:
            async with OpenAIClient(ClientConfig(base_url=server.url, **cfg)) as client:
                return await client.send(spec, model), server
        finally:
            await server.stop()

    return asyncio.run(main())


def test_a_streamed_completion_is_timed_and_counted():
    rec, server = send("fake-model", RequestSpec((5, 6, 7, 8, 9), 8))
    assert rec.success and rec.error == ""
    assert rec.prompt_len == 5 and rec.output_tokens == 8 and rec.cached_tokens == 0
    assert rec.generated_text == "".join(f"t{i} " for i in range(8))
    assert len(rec.itl) == 7 and all(g >= 0 for g in rec.itl)
    # the server waits 5 ms before the first token and 1 ms between tokens
    assert 0.004 < rec.ttft < rec.latency and rec.latency >= rec.ttft + sum(rec.itl)
    body = server.requests[0]
    assert body["prompt"] == [5, 6, 7, 8, 9] and body["max_tokens"] == 8 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
    assert "session_id" not in body


def test_chat_endpoint_skips_the_role_chunk_and_sends_session_ids():
    rec, server = send("fake-model", RequestSpec("one two three", 4, session_id="s-1"),
                       endpoint="/v1/chat/completions")
    assert rec.success and rec.output_tokens == 4 and len(rec.itl) == 3 and rec.prompt_len == 3
    body = server.requests[0]
    assert body["messages"] == [{"role": "user", "content": "one two three"}] and body["session_id"] == "s-1"


def test_without_usage_tokens_are_counted_from_chunks():
    rec, _ = send("no-usage", RequestSpec((1, 2), 6))
    assert rec.success and rec.output_tokens == 6 and rec.prompt_len == 2


def test_an_error_status_is_a_failure_with_the_servers_message():
    rec, _ = send("overloaded", RequestSpec((1, 2), 6))
    assert not rec.success and rec.error == "http_429" and rec.error_message == "too many requests"
    assert rec.latency > 0 and rec.output_tokens == 0


def test_a_mid_stream_disconnect_is_a_failure():
    rec, _ = send("disconnect", RequestSpec((1, 2), 6))
    assert not rec.success
    assert rec.error in ("ClientPayloadError", "ServerDisconnectedError", "incomplete_stream"), rec.error


def test_a_stream_without_done_is_a_failure():
    rec, _ = send("no-done", RequestSpec((1, 2), 3))
    assert not rec.success and rec.error == "incomplete_stream"


def test_connection_refused_and_readiness():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main():
        async with OpenAIClient(ClientConfig(base_url=f"http://127.0.0.1:{port}")) as client:
            return await client.ready(), await client.send(RequestSpec((1,), 1), "m")

    ready, rec = asyncio.run(main())
    assert ready is False and not rec.success and rec.error == "ClientConnectorError"

    async def up():
        server = await FakeServer().start()
        try:
            async with OpenAIClient(ClientConfig(base_url=server.url + "/")) as client:
                return await client.ready(), await client.list_models()
        finally:
            await server.stop()

    assert asyncio.run(up()) == (True, ["fake-model"])


def test_many_streams_at_once_from_one_client():
    """Far more streams than aiohttp's default connection cap (100) run concurrently."""

    async def main():
        server = await FakeServer(token_delay=0.1).start()
        try:
            async with OpenAIClient(ClientConfig(base_url=server.url)) as client:
                recs = await asyncio.gather(*(client.send(RequestSpec((1, 2), 5), "fake-model") for _ in range(300)))
            return recs, server.peak_in_flight
        finally:
            await server.stop()

    recs, peak = asyncio.run(main())
    assert all(r.success for r in recs) and peak > 100


@pytest.mark.parametrize("bad, field", [({"backend": "http"}, "backend"), ({"endpoint": "/v1/x"}, "endpoint"),
                                        ({"request_timeout": 0}, "request_timeout")])
def test_bad_client_configs_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        ClientConfig(**bad)
