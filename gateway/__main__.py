"""`python -m gateway --model DIR --redis-url URL [--port 8000] [--grpc-port 50051] ...`
(also `tandem gateway`): the REST shim and the gRPC API in one asyncio process. On
SIGTERM/SIGINT it stops taking requests, lets in-flight ones finish (30 s), and exits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

log = logging.getLogger("gateway")


def add_arguments(p) -> None:
    from gateway.config import add_arguments as add

    add(p)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, minus re-raising the signal after its shutdown (which would
        kill the process before the gRPC server drains and Redis closes), plus an
        `on_exit` hook so the gRPC API starts draining at the same moment REST does."""

        on_exit = None

        def handle_exit(self, sig, frame):
            if not self.should_exit and self.on_exit is not None:
                asyncio.get_running_loop().call_soon(self.on_exit)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    return Server


DRAIN_SECONDS = 25  # below the launcher's 30 s before it kills a part


async def _stop_grpc(server, hs) -> None:
    await hs.enter_graceful_shutdown()
    await server.stop(DRAIN_SECONDS)


async def _track_health(router, hs, every: float) -> None:
    """gRPC health says what REST /health says: SERVING while a decode instance is live."""
    from grpc_health.v1 import health_pb2

    from gateway.grpc_api import SERVICE

    while True:
        ok = bool(router.live("decode"))
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await hs.set(name, status)
        await asyncio.sleep(every)


async def serve(cfg) -> None:
    import redis.asyncio as aioredis
    import uvicorn

    from engine.tokenizer import Tokenizer
    from gateway.core import Gateway
    from gateway.grpc_api import start_server
    from gateway.metrics import Metrics
    from gateway.openai_api import make_app
    from gateway.router import Router, make_policy
    from gateway.state import StateStore
    from protos.grpc_server import quiet_gc

    tok = Tokenizer.from_dir(cfg.model_dir)
    client = aioredis.Redis.from_url(cfg.redis_url, socket_timeout=5)
    await client.ping()  # a wrong URL is an error now, not at the first request
    router = Router(client, cfg.served_model_name, make_policy(cfg.routing, cfg.affinity_slack), cfg.registry_refresh)
    await router.refresh_now()
    await router.start()
    state = StateStore(client, cfg.served_model_name, cfg.session_ttl, cfg.record_ttl)
    gw = Gateway(cfg, tok, router, state, Metrics())
    grpc_server = None
    if cfg.grpc_port:
        grpc_server, gport, hs = await start_server(gw, cfg.host, cfg.grpc_port)
    config = uvicorn.Config(make_app(gw), host=cfg.host, port=cfg.port, log_level="warning",
                            timeout_graceful_shutdown=DRAIN_SECONDS, access_log=False)
    server = _server_class()(config)
    grpc_stopped = None

    def drain():  # REST and gRPC stop taking requests together; in-flight ones get DRAIN_SECONDS
        nonlocal grpc_stopped
        log.info("draining: no new requests; in-flight ones get %d s", DRAIN_SECONDS)
        if grpc_server is not None:
            grpc_stopped = asyncio.ensure_future(_stop_grpc(grpc_server, hs))

    server.on_exit = drain
    quiet_gc()  # start-up's objects (tokenizer, app, clients) out of the collector's sight; long pauses logged
    health_task = asyncio.create_task(_track_health(router, hs, cfg.registry_refresh)) if grpc_server else None
    decodes, prefills = len(router.live("decode")), len(router.live("prefill"))
    print(f"gateway serving model {cfg.served_model_name!r}: REST http://{cfg.host}:{cfg.port}/v1"
          + (f", gRPC {cfg.host}:{gport}" if grpc_server else "")
          + f"; {decodes} decode and {prefills} prefill instance(s) registered", flush=True)
    try:
        await server.serve()  # returns on SIGTERM/SIGINT, after in-flight requests finish
    finally:
        log.info("stopping")
        if health_task is not None:
            health_task.cancel()
        if grpc_server is not None:
            await (grpc_stopped or _stop_grpc(grpc_server, hs))
        await state.flush()
        await router.stop()
        await gw.close()
        await client.aclose()


def run(args) -> int:
    from gateway.config import from_args

    cfg = from_args(args)
    asyncio.run(serve(cfg))
    return 0


def main(argv: list[str] | None = None) -> int:
    from protos.grpc_server import service_main

    return service_main("gateway", "tandem gateway: OpenAI REST shim + gRPC API", add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
