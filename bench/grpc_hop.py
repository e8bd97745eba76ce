"""One-way latency of the decode -> prefill hop, by transport, on one clock.

    python bench/grpc_hop.py [--requests 200] [--gap-ms 50] [--prompt-len 8000]

A disaggregated request pays the Prefill RPC's two one-way trips on top of the engine's
prefill; this bench times them alone, with Prefill-shaped messages (a packed prompt
of --prompt-len ids and a destination of one block id per 16 tokens for two layer
groups) between two processes of this machine. perf_counter is CLOCK_MONOTONIC on Linux,
one clock for both processes, so the server stamps its arrival and the client computes
each direction. --gap-ms idles between requests, as a service between prompts does
(waking a sleeping thread is part of the price). Rows:
  - grpc sync unary: the services' path today (a thread-pool server, a future client);
  - grpc sync stream: one long-lived bidirectional stream, one message per request;
  - grpc aio unary: asyncio server and client;
  - raw socket: a length-prefixed frame, a blocked reader thread on each side (the floor
    for a Python process).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import statistics
import struct
import sys
import threading
import time
from array import array
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from protos import prefill_pb2  # noqa: E402

METHOD = "/tandem.bench.Hop/Unary"
STREAM = "/tandem.bench.Hop/Stream"


def request(prompt_len: int) -> bytes:
    req = prefill_pb2.PrefillRequest(request_id="r", packed_prompt_token_ids=array("I", range(prompt_len)).tobytes())
    req.destination.address = "127.0.0.1:1"
    req.destination.transfer_id = "r/0"
    for g in ("global", "local"):
        req.destination.blocks[g].ids.extend(range(-(-prompt_len // 16)))
    return req.SerializeToString()


def answer(t_in: float) -> bytes:
    return prefill_pb2.PrefillResponse(request_id=repr(t_in), first_token_id=1).SerializeToString()


def arrival(resp: bytes) -> float:
    r = prefill_pb2.PrefillResponse()
    r.ParseFromString(resp)
    return float(r.request_id)


def parse(req: bytes) -> None:
    prefill_pb2.PrefillRequest().ParseFromString(req)


# ---- servers (each in its own process; prints its port on the pipe)

def _sync_server(conn) -> None:
    def unary(req, ctx):
        t = time.perf_counter()
        parse(req)
        return answer(t)

    def stream(it, ctx):
        for req in it:
            t = time.perf_counter()
            parse(req)
            yield answer(t)

    handler = grpc.method_handlers_generic_handler("tandem.bench.Hop", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_stream_rpc_method_handler(stream)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), handlers=[handler])
    conn.send(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def _aio_server(conn) -> None:
    async def unary(req, ctx):
        t = time.perf_counter()
        parse(req)
        return answer(t)

    async def main():
        handler = grpc.method_handlers_generic_handler("tandem.bench.Hop", {
            "Unary": grpc.unary_unary_rpc_method_handler(unary)})
        server = grpc.aio.server(handlers=[handler])
        conn.send(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _recv_exact(sock, n):
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError
        got += k
    return bytes(buf)


def _socket_server(conn) -> None:
    ls = socket.create_server(("127.0.0.1", 0))
    conn.send(ls.getsockname()[1])
    s, _ = ls.accept()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def serve():  # a reader thread, as kv_transfer's
        while True:
            (n,) = struct.unpack("<I", _recv_exact(s, 4))
            req = _recv_exact(s, n)
            t = time.perf_counter()
            parse(req)
            out = answer(t)
            s.sendall(struct.pack("<I", len(out)) + out)

    threading.Thread(target=serve, daemon=True).start()
    threading.Event().wait()


# ---- clients: each returns [(go, back)] in seconds

def _timed(call, payload, n, gap):
    out = []
    for i in range(n + 5):
        time.sleep(gap)
        t0 = time.perf_counter()
        resp = call(payload)
        t2 = time.perf_counter()
        t1 = arrival(resp)
        if i >= 5:  # warm-up
            out.append((t1 - t0, t2 - t1))
    return out


def sync_unary(port, payload, n, gap):
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = ch.unary_unary(METHOD)
    return _timed(lambda p: call.future(p).result(), payload, n, gap)


def sync_unary_blocking(port, payload, n, gap):
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = ch.unary_unary(METHOD)
    return _timed(call, payload, n, gap)


def sync_stream(port, payload, n, gap):
    import queue

    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    q: queue.Queue = queue.Queue()
    responses = ch.stream_stream(STREAM)(iter(q.get, None))

    def call(p):
        q.put(p)
        return next(responses)

    try:
        return _timed(call, payload, n, gap)
    finally:
        q.put(None)


def aio_unary(port, payload, n, gap):
    async def main():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary(METHOD)
            out = []
            for i in range(n + 5):
                await asyncio.sleep(gap)
                t0 = time.perf_counter()
                resp = await call(payload)
                t2 = time.perf_counter()
                t1 = arrival(resp)
                if i >= 5:
                    out.append((t1 - t0, t2 - t1))
            return out

    return asyncio.run(main())


def raw_socket(port, payload, n, gap):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    box: list = []
    ready = threading.Event()

    def reader():  # answers arrive on a reader thread, as kv_transfer's
        try:
            while True:
                (k,) = struct.unpack("<I", _recv_exact(s, 4))
                box.append(_recv_exact(s, k))
                ready.set()
        except OSError:  # the server is gone: the row is over
            pass

    threading.Thread(target=reader, daemon=True).start()

    def call(p):
        ready.clear()
        s.sendall(struct.pack("<I", len(p)) + p)
        ready.wait()
        return box.pop()

    return _timed(call, payload, n, gap)


ROWS = [("grpc sync unary, future (the services today)", _sync_server, sync_unary),
        ("grpc sync unary, blocking call", _sync_server, sync_unary_blocking),
        ("grpc sync bidirectional stream, one message each way", _sync_server, sync_stream),
        ("grpc aio unary", _aio_server, aio_unary),
        ("raw socket, reader threads", _socket_server, raw_socket)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="timed requests per row (default 200)")
    ap.add_argument("--gap-ms", type=float, default=50.0, help="idle time before each request (default 50)")
    ap.add_argument("--prompt-len", type=int, default=8000, help="prompt ids in each request (default 8000)")
    args = ap.parse_args()
    payload = request(args.prompt_len)
    print(f"request {len(payload)} bytes, {args.requests} requests per row, {args.gap_ms:g} ms idle before each")
    print("| transport | go p50 | go p99 | back p50 | back p99 | round trip p50 |\n|---|---|---|---|---|---|")
    ctx = mp.get_context("spawn")
    for name, server, client in ROWS:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=server, args=(child,), daemon=True)
        proc.start()
        try:
            port = parent.recv()
            xs = client(port, payload, args.requests, args.gap_ms / 1e3)
        finally:
            proc.kill()
        go, back = [1e3 * x[0] for x in xs], [1e3 * x[1] for x in xs]
        rt = [a + b for a, b in zip(go, back)]
        q = lambda v, p: sorted(v)[min(len(v) - 1, int(round(p * (len(v) - 1))))]  # noqa: E731
        print(f"| {name} | {statistics.median(go):.3f} ms | {q(go, 0.99):.3f} ms | {statistics.median(back):.3f} ms | "
              f"{q(back, 0.99):.3f} ms | {statistics.median(rt):.3f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
