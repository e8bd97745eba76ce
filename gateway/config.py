"""The gateway's flags, and the one frozen config they become."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GatewayConfig:
    model_dir: str
    served_model_name: str
    redis_url: str
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 50051
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    max_prompt_tokens: int | None = None  # None: the model's max_model_len
    max_tokens_limit: int | None = None  # None: only max_model_len bounds max_tokens
    max_concurrent: int = 256  # streams in flight; more wait in the queue
    max_queue: int = 1024  # waiting beyond this: 429 / RESOURCE_EXHAUSTED
    queue_timeout: float = 60.0  # seconds a request may wait for a slot
    routing: str = "kv-aware"
    affinity_slack: int = 4  # requests a session/prefix holder may be busier than the least loaded
    session_ttl: float = 3600.0
    record_ttl: float = 86400.0
    registry_refresh: float = 0.5  # seconds between reads of the instance registry
    retries: int = 2  # other decode instances to try when one is unreachable before its first token
    request_timeout: float = 600.0

    def __post_init__(self):
        for name in ("max_concurrent", "max_queue", "retries", "affinity_slack"):
            v = getattr(self, name)
            if v < 0 or (name == "max_concurrent" and v == 0):
                raise ValueError(f"{name}: must be {'> 0' if name == 'max_concurrent' else '>= 0'}, got {v}")
        for name in ("queue_timeout", "session_ttl", "record_ttl", "registry_refresh", "request_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("max_prompt_tokens", "max_tokens_limit"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name}: must be > 0, got {v}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="model folder: its tokenizer and chat template are used here, and its name is "
                        "the served model name unless --served-model-name is given")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the model folder's name); prefill and decode "
                        "instances must register under the same name")
    p.add_argument("--redis-url", required=True, help="Redis holding the registry, sessions and request records")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on, REST and gRPC (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="REST port: /v1/*, /health, /metrics (default 8000)")
    p.add_argument("--grpc-port", type=int, default=50051, help="public gRPC API port (default 50051; 0 = off)")
    p.add_argument("--api-key", action="append", default=[],
                   help="require 'Authorization: Bearer KEY' on /v1/* and gRPC calls; repeat for several keys")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted, in tokens (default: the model's max_model_len)")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="largest max_tokens accepted (default: whatever fits in max_model_len)")
    p.add_argument("--max-concurrent", type=int, default=256,
                   help="requests streaming at once; more wait in a queue (default 256)")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="requests waiting for a slot; beyond it: HTTP 429 / RESOURCE_EXHAUSTED (default 1024)")
    p.add_argument("--queue-timeout", type=float, default=60.0,
                   help="seconds a request may wait for a slot before a 429 (default 60)")
    p.add_argument("--routing", default="kv-aware", help="routing policy: kv-aware (default), least-loaded, round-robin")
    p.add_argument("--affinity-slack", type=int, default=4,
                   help="kv-aware: follow a session's or prefix's decode instance unless it has this many "
                        "more requests than the least loaded one (default 4)")
    p.add_argument("--session-ttl", type=float, default=3600.0, help="seconds a session lives after its last turn")
    p.add_argument("--record-ttl", type=float, default=86400.0, help="seconds a request record lives in Redis")
    p.add_argument("--registry-refresh", type=float, default=0.5,
                   help="seconds between reads of the instance registry (default 0.5)")
    p.add_argument("--retries", type=int, default=2,
                   help="other decode instances to try when one is unreachable before its first token (default 2)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may run in all")


def from_args(args) -> GatewayConfig:
    return GatewayConfig(
        model_dir=args.model, served_model_name=args.served_model_name or Path(args.model).resolve().name,
        redis_url=args.redis_url, host=args.host, port=args.port, grpc_port=args.grpc_port,
        api_keys=tuple(args.api_key), max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit, max_concurrent=args.max_concurrent, max_queue=args.max_queue,
        queue_timeout=args.queue_timeout, routing=args.routing, affinity_slack=args.affinity_slack,
        session_ttl=args.session_ttl, record_ttl=args.record_ttl, registry_refresh=args.registry_refresh,
        retries=args.retries, request_timeout=args.request_timeout,
    )
