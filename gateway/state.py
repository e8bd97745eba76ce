"""What the gateway keeps in Redis, so that any replica can serve any request:

    tandem:session:{id}          JSON {kind, messages | token_ids, decode, turns}, EX session_ttl
    tandem:request:{id}          hash: status, model, instances, token counts, output ids, timings;
                                 EX record_ttl
    tandem:prefix:{model}:{hash} decode instance id that last served a prompt with this
                                 block-aligned prefix, EX session_ttl

A request record is written as the request moves (queued -> running -> finished |
aborted | failed), and while it streams at most every RECORD_EVERY seconds, so a later
issue can resume a request whose decode instance died from its record alone.

Redis trouble never fails a request: records, sessions and the prefix index are
written best-effort (a warning in the log), and reads fall back to "nothing known".
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

from registry import PREFIX

log = logging.getLogger(__name__)

RECORD_EVERY = 0.25  # seconds between record updates while a request streams
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

    async def _try(self, what: str, coro):
        try:
            return await coro
        except Exception as e:  # redis.RedisError, OSError: degrade, never fail the request
            log.warning("redis: %s failed: %s", what, e)
            return None

    # -- sessions ------------------------------------------------------------------------
    async def load_session(self, sid: str) -> Session | None:
        raw = await self._try("session read", self.r.get(session_key(sid)))
        if raw is None:
            return None
        try:
            return Session(**json.loads(raw))
        except (ValueError, TypeError) as e:
            log.warning("session %s: unreadable record (%s); starting over", sid, e)
            return None

    async def save_session(self, sid: str, s: Session) -> None:
        await self._try("session write", self.r.set(session_key(sid), json.dumps(s.__dict__), px=self.session_ttl))

    # -- request records -----------------------------------------------------------------
    async def record(self, rid: str, **fields) -> None:
        """Set some fields of a request's record (values: str/int/float; lists go as JSON)."""
        mapping = {k: json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v)
                   for k, v in fields.items()}
        mapping["updated_at"] = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(request_key(rid), mapping=mapping)
        pipe.pexpire(request_key(rid), self.record_ttl)
        await self._try("record write", pipe.execute())

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

    async def remember_prefix(self, token_ids: list[int], block_size: int, decode_id: str) -> None:
        hashes = prefix_hashes(token_ids, block_size)
        if not hashes:
            return
        pipe = self.r.pipeline(transaction=False)
        for _, h in hashes:
            pipe.set(self._prefix_key(h), decode_id, px=self.session_ttl)
        await self._try("prefix write", pipe.execute())


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
