"""gRPC plumbing shared by the services: a server with standard health checking, and a
graceful drain on SIGTERM/SIGINT (health NOT_SERVING, no new RPCs, in-flight ones get
`grace` seconds to finish)."""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)


def make_server(host: str, port: int, add_servicers: Callable[[grpc.Server], None], service_name: str,
                max_workers: int = 1024) -> tuple[grpc.Server, int, health.HealthServicer]:
    # A streaming RPC holds a worker thread for its whole life (decode: one per running
    # request); Abort and Info must still find a free one.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    add_servicers(server)
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    for name in ("", service_name):
        hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, hs


def serve_until_signal(server: grpc.Server, hs: health.HealthServicer, on_stop: Callable[[], None],
                       grace: float = 30.0, on_start: Callable[[], None] | None = None,
                       on_drain: Callable[[], None] | None = None) -> None:
    """Start, then `on_start` (register); serve until SIGTERM/SIGINT; then `on_drain`
    (deregister: no new work is routed here), NOT_SERVING, `grace` seconds for in-flight
    RPCs, and `on_stop`."""
    stop = threading.Event()

    def handle(signum, frame):
        log.info("signal %d: draining (grace %.0f s)", signum, grace)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    quiet_gc()
    server.start()
    if on_start is not None:
        on_start()
    stop.wait()
    if on_drain is not None:
        on_drain()
    hs.enter_graceful_shutdown()
    server.stop(grace).wait()
    on_stop()
    log.info("stopped")


# A garbage collection longer than this is logged (INFO): it pauses every thread.
GC_LOG_MS = 2.0
_gc_started: list[float] = []
gc_pauses: deque[tuple[int, float]] = deque(maxlen=1000)  # (generation, ms) of those collections, latest last


def _time_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_started[:] = [time.perf_counter()]
    elif _gc_started:
        ms = 1e3 * (time.perf_counter() - _gc_started[0])
        if ms > GC_LOG_MS:
            gc_pauses.append((info["generation"], ms))
            log.info("gc: a generation %d collection paused the process for %.1f ms (%d objects freed)",
                     info["generation"], ms, info["collected"])


def quiet_gc() -> None:
    """Once a process is loaded (a service, or a benchmark's client): move every object
    alive now (the model's modules, tokenizer, graphs, torch itself: hundreds of
    thousands of objects) out of the collector's sight (gc.freeze), so a full collection
    later scans only what requests made; and log any collection that pauses the process
    for more than GC_LOG_MS (kept in `gc_pauses` too). Unfrozen, a full collection in a
    process that imported torch (170,000 objects) took 140-185 ms on a CI core."""
    gc.collect()
    gc.freeze()
    if _time_gc not in gc.callbacks:
        gc.callbacks.append(_time_gc)


# Python hands the GIL to a waiting thread only after the holder ran this long (5 ms by
# default). A service's engine thread runs Python almost all the time, and the KV
# transfer's threads (sender writer, receiver reader and completer) each need the GIL
# for a few hundred microseconds per message: a 32k-token transfer reached 77% of raw
# NCCL's throughput at 5 ms, 82% at 500 us, 84% at 100 us (BENCHMARKS.md, 2x H100).
GIL_SWITCH_INTERVAL_US = 200


def service_main(prog: str, description: str, add_arguments, run, argv: list[str] | None = None) -> int:
    """`python -m prefill_service` / `decode_service`: the service's flags plus --log-level
    and --gil-switch-interval-us."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging verbosity on stderr (default: INFO)")
    p.add_argument("--gil-switch-interval-us", type=int, default=GIL_SWITCH_INTERVAL_US,
                   help="how long a thread may hold the GIL while another waits for it, in microseconds "
                        f"(sys.setswitchinterval; default {GIL_SWITCH_INTERVAL_US}, Python's own is 5000): the "
                        "KV transfer's threads wait this long for the engine thread at every GIL hand-off")
    add_arguments(p)
    args = p.parse_args(argv)
    if args.gil_switch_interval_us < 1:
        p.error("--gil-switch-interval-us must be >= 1")
    sys.setswitchinterval(args.gil_switch_interval_us / 1e6)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


def wait_healthy(address: str, timeout: float = 120.0, service: str = "") -> None:
    """Block until `address` reports SERVING (used by tests and the launcher)."""
    import time

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not healthy after {timeout:.0f} s")
            time.sleep(0.2)
