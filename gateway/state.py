"""What the gateway keeps in Redis, so that any replica can serve any request:

    tandem:session:{id}          JSON {kind, messages | token_ids, decode, turns}, EX session_ttl
    tandem:request:{id}          hash: status, model, instances, token counts, output ids, timings;
                                 EX record_ttl
    tandem:prefix:{model}:{hash} decode instance id that last served a prompt with this
                                 block-aligned prefix, EX session_ttl

    tandem:request:{id}:tokens   list: the request's output token ids so far (RPUSH), EX record_ttl
    tandem:session:{id}:busy     a turn of this session is running (SET NX), PX request_timeout

A request record is written as the request moves (queued -> running -> finished |
aborted | failed), and while it streams at most every RECORD_EVERY seconds, so a later
issue can resume a request whose decode instance died from its record alone.

Writes (records, tokens, prefix index) are fire-and-forget background tasks, so a slow
Redis never slows a stream; when more than MAX_PENDING_WRITES are pending, new ones are
dropped with a warning. Reads the request depends on are not best-effort: if a session
cannot be read, the request fails with 503 rather than silently answering without its
history. The prefix index read falls back to "nothing known".
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

from gateway.errors import GatewayError
from registry import PREFIX

log = logging.getLogger(__name__)

RECORD_EVERY = 0.25  # seconds between record updates while a request streams
MAX_PENDING_WRITES = 10_000
PREFIX_STRIDE = 16  # prefix hashes are indexed every this many blocks (and at the prompt's last full block)


def session_key(sid: str) -> str:
    return f"{PREFIX}session:{sid}"


def request_key(rid: str) -> str:
    return f"{PREFIX}request:{rid}"


def prefix_hashes(token_ids: list[int], block_size: int, stride: int = PREFIX_STRIDE) -> list[tuple[int, str]]:
    """(number of tokens, chained hash) at every `stride`-th full block and at the last
    full block. Chained: a hash covers everything before it, as the engine's prefix
    cache does, so equal hashes mean equal prefixes."""
    out: list[tuple[int, str]] = []
    h = hashlib.blake2b(digest_size=16)
    nfull = len(token_ids) // block_size
    for b in range(nfull):
        h.update(json.dumps(token_ids[b * block_size:(b + 1) * block_size]).encode())
        if (b + 1) % stride == 0 or b + 1 == nfull:
            out.append(((b + 1) * block_size, h.copy().hexdigest()))
    return out


@dataclass
class Session:
    kind: str  # "chat" (messages) | "completion" (token ids)
    messages: list[dict] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    decode: str | None = None  # the decode instance holding its KV
    turns: int = 0


class StateStore:
    def __init__(self, client, model: str, session_ttl: float, record_ttl: float):
        self.r = client  # redis.asyncio.Redis
        self.model = model
        self.session_ttl = int(session_ttl * 1000)
        self.record_ttl = int(record_ttl * 1000)
        self._pending: set[asyncio.Task] = set()
        self._dropped = 0

    async def _try(self, what: str, coro):
        try:
            return await coro
        except Exception as e:  # redis.RedisError, OSError: degrade, never fail the request
            log.warning("redis: %s failed: %s", what, e)
            return None

    def _background(self, what: str, make_coro) -> None:
        if len(self._pending) >= MAX_PENDING_WRITES:
            self._dropped += 1
            if self._dropped % 1000 == 1:
                log.warning("redis: %d writes pending; dropped %d (%s)", len(self._pending), self._dropped, what)
            return
        task = asyncio.create_task(self._try(what, make_coro()))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def flush(self) -> None:
        """Wait for the pending writes (shutdown, tests)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    # -- sessions ------------------------------------------------------------------------
    async def lock_session(self, sid: str, ttl: float) -> bool:
        try:
            return bool(await self.r.set(session_key(sid) + ":busy", "1", nx=True, px=int(ttl * 1000)))
        except Exception as e:
            raise GatewayError(503, f"session store unavailable: {e}", code="redis_unavailable",
                               retry_after=1.0) from None

    async def unlock_session(self, sid: str) -> None:
        """Release a session's turn lock. Often called from a request whose task is being
        cancelled (its client left: Starlette cancels the task, and under its cancel scope
        every later await raises again), so the delete runs shielded, to its end, whatever
        happens to the caller; unshielded, the lock stayed until its TTL (request_timeout)
        and every later turn of the session got 409 session_busy."""
        await asyncio.shield(self._try("session unlock", self.r.delete(session_key(sid) + ":busy")))

    async def load_session(self, sid: str) -> Session | None:
        try:
            raw = await self.r.get(session_key(sid))
        except Exception as e:
            raise GatewayError(503, f"session store unavailable: {e}", code="redis_unavailable",
                               retry_after=1.0) from None
        if raw is None:
            return None
        try:
            return Session(**json.loads(raw))
        except (ValueError, TypeError) as e:
            log.warning("session %s: unreadable record (%s); starting over", sid, e)
            return None

    async def save_session(self, sid: str, s: Session) -> None:
        # Awaited (not background): the next turn must see this one.
        await self._try("session write", self.r.set(session_key(sid), json.dumps(s.__dict__), px=self.session_ttl))

    # -- request records -----------------------------------------------------------------
    def record(self, rid: str, **fields) -> None:
        """Set some fields of a request's record (values: str/int/float; lists go as JSON), in
        the background."""
        mapping = {k: json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v)
                   for k, v in fields.items()}
        mapping["updated_at"] = time.time()

        def write():
            pipe = self.r.pipeline(transaction=False)
            pipe.hset(request_key(rid), mapping=mapping)
            pipe.pexpire(request_key(rid), self.record_ttl)
            return pipe.execute()

        self._background("record write", write)

    def append_tokens(self, rid: str, token_ids) -> None:
        """Add output token ids to the request's token list (deltas: O(n) bytes in all)."""
        if not token_ids:
            return
        ids = list(token_ids)

        def write():
            pipe = self.r.pipeline(transaction=False)
            pipe.rpush(request_key(rid) + ":tokens", *ids)
            pipe.pexpire(request_key(rid) + ":tokens", self.record_ttl)
            return pipe.execute()

        self._background("token append", write)

    async def read_record(self, rid: str) -> dict[str, str]:
        raw = await self._try("record read", self.r.hgetall(request_key(rid)))
        return {_s(k): _s(v) for k, v in (raw or {}).items()}

    # -- prefix index --------------------------------------------------------------------
    def _prefix_key(self, digest: str) -> str:
        return f"{PREFIX}prefix:{self.model}:{digest}"

    async def prefix_holders(self, token_ids: list[int], block_size: int) -> list[tuple[int, str]]:
        """(tokens matched, decode instance id), longest match first."""
        hashes = prefix_hashes(token_ids, block_size)
        if not hashes:
            return []
        raws = await self._try("prefix read", self.r.mget([self._prefix_key(h) for _, h in hashes]))
        found = [(n, _s(v)) for (n, _), v in zip(hashes, raws or []) if v is not None]
        return sorted(found, reverse=True)

    def remember_prefix(self, token_ids: list[int], block_size: int, decode_id: str) -> None:
        hashes = prefix_hashes(token_ids, block_size)
        if not hashes:
            return

        def write():
            pipe = self.r.pipeline(transaction=False)
            for _, h in hashes:
                pipe.set(self._prefix_key(h), decode_id, px=self.session_ttl)
            return pipe.execute()

        self._background("prefix write", write)


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
