"""Choosing a decode and a prefill instance for each request.

The `Router` keeps the registry's view fresh (a background read every
`registry_refresh` seconds) and adds what the registry cannot know yet: requests this
gateway sent since the last heartbeat (`inflight`), and instances that just refused a
connection (`suspect`, skipped until their registration is refreshed or expires).

A `RoutingPolicy` is one small function pair over that view; policies live in
`POLICIES` and are picked by name (--routing):

  kv-aware      decode: the least loaded instance with room for the prompt, unless the
                session's instance or the one holding the longest shared prefix is at
                most `affinity_slack` requests busier (then only new tokens are
                prefilled); prefill: fewest queued prefill tokens.
  least-loaded  the same without affinity.
  round-robin   in turn, ignoring load (a baseline for benchmarks).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass

from gateway.errors import GatewayError
from registry import Instance, alist_instances

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouteRequest:
    num_prompt_tokens: int
    session_decode: str | None = None  # decode instance that holds the session's KV
    prefix_holders: tuple[tuple[int, str], ...] = ()  # (tokens matched, decode id), longest first


@dataclass(frozen=True)
class Route:
    decode: Instance
    prefill: Instance | None  # None: decode prefills the prompt itself
    reason: str  # why this decode instance: "session" | "prefix" | "load" | "turn"


class RoutingPolicy:
    name = ""

    def __init__(self, affinity_slack: int = 4):
        self.affinity_slack = affinity_slack

    def pick_decode(self, cands: list[Instance], req: RouteRequest, load: dict[str, int]) -> tuple[Instance, str]:
        raise NotImplementedError

    def pick_prefill(self, cands: list[Instance], req: RouteRequest, queued: dict[str, int]) -> Instance:
        return min(cands, key=lambda i: (i.queued_prefill_tokens + queued.get(i.id, 0), i.id))


def _least_loaded(cands: list[Instance], load: dict[str, int]) -> Instance:
    return min(cands, key=lambda i: (load[i.id], -i.free_blocks, i.id))


class LeastLoaded(RoutingPolicy):
    name = "least-loaded"

    def pick_decode(self, cands, req, load):
        return _least_loaded(cands, load), "load"


class KVAware(RoutingPolicy):
    name = "kv-aware"

    def pick_decode(self, cands, req, load):
        best = _least_loaded(cands, load)
        by_id = {i.id: i for i in cands}
        wanted = [(req.session_decode, "session")] if req.session_decode else []
        wanted += [(iid, "prefix") for _, iid in req.prefix_holders]
        for iid, why in wanted:
            inst = by_id.get(iid)
            if inst is not None and load[iid] <= load[best.id] + self.affinity_slack:
                return inst, why
        return best, "load"


class RoundRobin(RoutingPolicy):
    name = "round-robin"

    def __init__(self, affinity_slack: int = 4):
        super().__init__(affinity_slack)
        self._decode_turn = itertools.count()  # one counter per role: a shared one would skip
        self._prefill_turn = itertools.count()

    def pick_decode(self, cands, req, load):
        return cands[next(self._decode_turn) % len(cands)], "turn"

    def pick_prefill(self, cands, req, queued):
        return cands[next(self._prefill_turn) % len(cands)]


POLICIES: dict[str, type[RoutingPolicy]] = {p.name: p for p in (KVAware, LeastLoaded, RoundRobin)}


def make_policy(name: str, affinity_slack: int) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"routing: unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name](affinity_slack)


class Router:
    def __init__(self, redis, model: str, policy: RoutingPolicy, refresh: float):
        self.redis = redis
        self.model = model
        self.policy = policy
        self.refresh = refresh
        self.instances: list[Instance] = []
        self.inflight: Counter[str] = Counter()  # requests this gateway has on each decode instance
        self.queued_prefill: Counter[str] = Counter()  # prompt tokens sent to each prefill, not yet done
        self.suspect: dict[str, float] = {}  # instance id -> registry timestamp it was seen failing at
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()

    # -- the registry view ---------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name="registry-poll")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def refresh_now(self) -> None:
        try:
            insts = await alist_instances(self.redis)
        except Exception as e:  # keep routing on the last view while Redis is away
            log.warning("registry read failed (%s); routing on the last view", e)
            return
        mine = [i for i in insts if i.model == self.model]
        old, new = {i.id for i in self.instances}, {i.id for i in mine}
        for iid in sorted(new - old):
            log.info("instance joined: %s", iid)
        for iid in sorted(old - new):
            log.info("instance left: %s", iid)
        # A suspect instance stays out until it heartbeats again after the failure.
        self.suspect = {iid: t for iid, t in self.suspect.items()
                        if any(i.id == iid and i.updated_at <= t for i in mine)}
        self.instances = mine
        self._ready.set()

    async def _poll(self) -> None:
        while True:
            await self.refresh_now()
            await asyncio.sleep(self.refresh)

    def live(self, role: str) -> list[Instance]:
        return [i for i in self.instances if i.role == role and i.id not in self.suspect]

    def mark_failed(self, inst: Instance) -> None:
        log.warning("instance %s at %s unreachable; out of routing until it heartbeats again", inst.id, inst.address)
        self.suspect[inst.id] = max(inst.updated_at, time.time())

    def by_id(self, iid: str) -> Instance | None:
        return next((i for i in self.instances if i.id == iid), None)

    # -- choosing ------------------------------------------------------------------------
    def route(self, req: RouteRequest, exclude: set[str] = frozenset()) -> Route:
        decodes = [i for i in self.live("decode") if i.id not in exclude]
        roomy = [i for i in decodes if i.free_blocks * i.block_size > req.num_prompt_tokens]
        roomy = roomy or decodes  # all full: queue on one of them
        if not roomy:
            raise GatewayError(503, f"no decode instance of model {self.model!r} is available; retry later",
                               code="no_instance", retry_after=1.0)
        load = {i.id: i.running + i.waiting + self.inflight[i.id] for i in roomy}
        decode, reason = self.policy.pick_decode(roomy, req, load)
        prefills = self.live("prefill")
        prefill = self.policy.pick_prefill(prefills, req, self.queued_prefill) if prefills else None
        return Route(decode, prefill, reason)
