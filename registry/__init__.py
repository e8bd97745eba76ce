"""Where the serving instances are: prefill and decode services register in Redis and
heartbeat; gateways list them to route. Nothing else is shared between replicas, so any
number of gateways can route over the same instances.

Keys (one Redis, any number of gateways and services):

    tandem:instances          set of instance ids that registered (readers prune dead ones)
    tandem:instance:{id}      the instance's JSON record, SET with EX ttl

A service rewrites its record every ttl/3 seconds with fresh load figures; a service
that dies stops refreshing, its key expires, and it is out of routing within `ttl`
seconds. A service that stops cleanly deletes its key at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

log = logging.getLogger(__name__)

PREFIX = "tandem:"
INSTANCES = PREFIX + "instances"


def instance_key(instance_id: str) -> str:
    return f"{PREFIX}instance:{instance_id}"


@dataclass(frozen=True)
class Instance:
    """One service as the router sees it: identity, where to reach it, and its load."""

    id: str
    role: str  # "prefill" | "decode"
    model: str  # the served model name (gateways route only to their own model)
    address: str  # gRPC host:port
    block_size: int
    max_model_len: int
    total_blocks: int  # of the global KV pool
    free_blocks: int  # free + evictable cached blocks of the global pool
    running: int
    waiting: int  # queued, including decode requests waiting for their KV
    queued_prefill_tokens: int  # prompt tokens admitted but not yet computed
    kv_transport: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Instance:
        d = json.loads(raw)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})  # newer writers may add fields


def parse_records(ids: list, raws: list) -> tuple[list[Instance], list]:
    """(live instances, ids whose key expired) from SMEMBERS + MGET answers."""
    live, dead = [], []
    for iid, raw in zip(ids, raws):
        if raw is None:
            dead.append(iid)
            continue
        try:
            live.append(Instance.from_json(raw))
        except (ValueError, TypeError) as e:
            log.warning("ignoring a bad registry record %s: %s", iid, e)
    return sorted(live, key=lambda i: i.id), dead


def list_instances(client) -> list[Instance]:
    """Live instances (a synchronous `redis.Redis`); prunes ids whose key expired."""
    ids = sorted(client.smembers(INSTANCES))
    if not ids:
        return []
    live, dead = parse_records(ids, client.mget([instance_key(_s(i)) for i in ids]))
    if dead:
        client.srem(INSTANCES, *dead)
    return live


async def alist_instances(client) -> list[Instance]:
    """The same for a `redis.asyncio.Redis` (the gateway)."""
    ids = sorted(await client.smembers(INSTANCES))
    if not ids:
        return []
    live, dead = parse_records(ids, await client.mget([instance_key(_s(i)) for i in ids]))
    if dead:
        await client.srem(INSTANCES, *dead)
    return live


def _s(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


class Heartbeat:
    """A service's registration: a daemon thread that writes `snapshot()` every ttl/3
    seconds. Redis being down is logged and retried, never fatal: the service keeps
    serving the requests it has."""

    def __init__(self, redis_url: str, snapshot: Callable[[], Instance], ttl: float = 5.0):
        import redis

        if ttl <= 0:
            raise ValueError(f"heartbeat ttl must be > 0, got {ttl}")
        self.client = redis.Redis.from_url(redis_url, socket_timeout=max(ttl / 2, 0.5))
        self.snapshot = snapshot
        self.ttl = ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-heartbeat", daemon=True)
        self._failing = False
        self.instance_id: str | None = None

    def start(self) -> Heartbeat:
        self.beat()  # registered before the first request can be routed here
        self._thread.start()
        return self

    def beat(self) -> None:
        inst = self.snapshot()
        self.instance_id = inst.id
        try:
            pipe = self.client.pipeline()
            pipe.set(instance_key(inst.id), inst.to_json(), px=int(self.ttl * 1000))
            pipe.sadd(INSTANCES, inst.id)
            pipe.execute()
            if self._failing:
                log.info("registry: reachable again; %s re-registered", inst.id)
            self._failing = False
        except Exception as e:  # redis.RedisError, OSError: keep serving, keep trying
            if not self._failing:
                log.warning("registry: cannot write %s (%s); retrying every %.1f s", inst.id, e, self.ttl / 3)
            self._failing = True

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self.beat()

    def stop(self) -> None:
        """Deregister at once (a drain): no gateway routes new work here from now on."""
        self._stop.set()
        self._thread.join(timeout=5)
        if self.instance_id is not None:
            try:
                self.client.delete(instance_key(self.instance_id))
                self.client.srem(INSTANCES, self.instance_id)
            except Exception as e:
                log.warning("registry: could not deregister %s: %s", self.instance_id, e)
        self.client.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The registration flags both services share."""
    g = p.add_argument_group("registry")
    g.add_argument("--redis-url", default=None,
                   help="register in this Redis (redis://host:port/db) so gateways route here; "
                        "unset: not registered (a gateway cannot find this instance)")
    g.add_argument("--instance-id", default=None,
                   help="name in the registry (default: ROLE@ADVERTISED_HOST:PORT)")
    g.add_argument("--advertise-host", default=None,
                   help="host gateways use to reach this service (default: --host; set it when "
                        "listening on 0.0.0.0)")
    g.add_argument("--served-model-name", default=None,
                   help="model name gateways route by (default: the model folder's name)")
    g.add_argument("--heartbeat-ttl", type=float, default=5.0,
                   help="seconds a registration lives without a heartbeat; a dead instance leaves "
                        "routing within this time (default 5; heartbeats every ttl/3)")


def served_model_name(args) -> str:
    from pathlib import Path

    return args.served_model_name or Path(args.model).resolve().name


class Registration:
    """A service's place in the registry, from its flags: `start()` once the server
    accepts RPCs (no gateway routes here too early), `stop()` when draining. Both do
    nothing without --redis-url. `load()` returns the live fields of `Instance`
    (free_blocks, running, ...) and runs on the heartbeat thread."""

    def __init__(self, args, role: str, port: int, load: Callable[[], dict]):
        host = args.advertise_host or args.host
        if args.redis_url and host in ("0.0.0.0", "::", ""):
            raise ValueError("--advertise-host is required when --host listens on every interface")
        self.args, self.load = args, load
        self.address = f"{host}:{port}"
        self.id = args.instance_id or f"{role}@{self.address}"
        self.role = role
        self.heartbeat: Heartbeat | None = None

    def start(self) -> None:
        if not self.args.redis_url:
            return
        started, model = time.time(), served_model_name(self.args)

        def snapshot() -> Instance:
            return Instance(id=self.id, role=self.role, model=model, address=self.address, started_at=started,
                            updated_at=time.time(), **self.load())

        self.heartbeat = Heartbeat(self.args.redis_url, snapshot, self.args.heartbeat_ttl).start()
        log.info("registered as %s in %s (ttl %.1f s)", self.id, self.args.redis_url, self.args.heartbeat_ttl)

    def stop(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
