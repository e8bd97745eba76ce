"""The paged KV cache's bookkeeping: block pools, prefix caching, per-request tables.

Layer groups. Llama 4 has two kinds of attention layer, and each kind gets its own pool
and its own block table per request:
  - "global": NoPE global layers (and every layer of a dense Llama) see the whole
    sequence, so they keep every block;
  - "local": chunked-local RoPE layers see only the current chunk of C tokens, so a
    request's blocks before `(num_computed_tokens // C) * C` are released as soon as the
    request moves past them. At Scout's sizes the 36 local layers then cost a chunk,
    not a context, per request (DESIGN.md: keep only what each layer can still see).

Block lifecycle (per pool): free (ref 0, in the LRU free queue, maybe still holding
its prefix hash so a later request can revive it) -> used (ref >= 1, in one or more
requests' tables) -> back to free when the last holder releases it. Allocation takes
the least recently freed block and evicts its hash. Requests release their blocks in
reverse order so a sequence's tail is evicted before its head.

Prefix caching: block i of a sequence is named by a hash chained over the tokens of
blocks 0..i. A prefix hit of L tokens needs the global pool to hold blocks [0, L) and
the local pool the blocks of L's chunk, [C * (L // C), L).
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.config import cdiv
from engine.request import PENDING

if TYPE_CHECKING:
    from engine.request import Request

GLOBAL, LOCAL = "global", "local"


def hash_block(parent: bytes, tokens: list[int]) -> bytes:
    """The prefix hash of a block: its parent's hash and its token ids as 4-byte little-
    endian words. The ids are packed by array in C (a per-id to_bytes cost ~3 ms per
    8,000 tokens, paid on both sides of a disaggregated request)."""
    words = array("I", tokens)
    if sys.byteorder != "little":
        words.byteswap()
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(words.tobytes())
    return h.digest()


def pushed_blocks(num_tokens: int, num_cached: int, block_size: int, chunk: int | None,
                  groups) -> dict[str, range]:
    """Disaggregation: the block indices of a prompt of `num_tokens` that prefill pushes to
    a decode instance already holding its first `num_cached` (block-aligned) tokens, per
    layer group. Global layers: every block decode lacks. Chunked-local layers: only the
    window of the next position, [C * (n // C), n) -- decode never reads older local KV.
    Prefill (what it sends) and decode (what it expects) both ask this one function."""
    end = cdiv(num_tokens, block_size)
    first = num_cached // block_size
    out = {GLOBAL: range(first, end)}
    if LOCAL in groups:
        window = (num_tokens // chunk) * chunk // block_size if chunk else 0
        out[LOCAL] = range(max(first, min(window, end)), end)
    return out


@dataclass(frozen=True)
class PoolStats:
    total: int
    used: int  # held by at least one request
    cached: int  # free but holding a prefix hash (revivable)
    free: int  # free and empty


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool):
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # prefix hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"allocate({n}) with {self.num_free} free blocks")
        out = []
        for _ in range(n):
            b, _ = self.free_queue.popitem(last=False)
            self._drop_hash(b)
            self.ref[b] = 1
            out.append(b)
        return out

    def lookup(self, h: bytes) -> int | None:
        return self.cached.get(h) if self.enable_caching else None

    def acquire(self, b: int) -> None:
        if self.ref[b] == 0:
            del self.free_queue[b]
        self.ref[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.ref[b] <= 0:
                raise RuntimeError(f"block {b} released with ref count {self.ref[b]}")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free_queue[b] = None  # most recently used end

    def cache(self, b: int, h: bytes) -> None:
        if self.enable_caching and h not in self.cached and self.hash_of[b] is None:
            self.cached[h] = b
            self.hash_of[b] = h

    def _drop_hash(self, b: int) -> None:
        h = self.hash_of[b]
        if h is not None:
            del self.cached[h]
            self.hash_of[b] = None

    def stats(self) -> PoolStats:
        cached = sum(1 for b in self.free_queue if self.hash_of[b] is not None)
        used = self.num_blocks - self.num_free
        return PoolStats(self.num_blocks, used, cached, self.num_free - cached)

    def check_integrity(self, expected_refs: Counter) -> None:
        free = list(self.free_queue)
        if len(free) != len(set(free)):
            raise AssertionError("a block sits twice in the free queue")
        free_set = set(free)
        for b in range(self.num_blocks):
            if self.ref[b] != expected_refs.get(b, 0):
                raise AssertionError(f"block {b}: ref {self.ref[b]}, held by {expected_refs.get(b, 0)} table entries")
            if (self.ref[b] == 0) != (b in free_set):
                raise AssertionError(f"block {b}: ref {self.ref[b]} but {'in' if b in free_set else 'not in'} free queue")
        for h, b in self.cached.items():
            if self.hash_of[b] != h:
                raise AssertionError(f"hash map points at block {b} which holds another hash")
        s = self.stats()
        if s.used + s.cached + s.free != s.total:
            raise AssertionError(f"used {s.used} + cached {s.cached} + free {s.free} != {s.total}")


class KVCacheManager:
    """Owns the pools; hands blocks to requests and takes them back exactly once."""

    def __init__(self, block_size: int, num_blocks: int, num_local_blocks: int | None,
                 chunk: int | None, enable_prefix_caching: bool):
        self.block_size = block_size
        self.chunk = chunk if num_local_blocks else None
        self.pools = {GLOBAL: BlockPool(num_blocks, enable_prefix_caching)}
        if num_local_blocks:
            self.pools[LOCAL] = BlockPool(num_local_blocks, enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching
        # Blocks held past their request's end (pin/unpin): a prefill whose KV still has to
        # go out to a destination that came late. Counted by the integrity check.
        self.pinned = {g: Counter() for g in self.pools}

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.pools)

    # -- prefix caching ----------------------------------------------------------------
    def update_hashes(self, req: Request) -> None:
        """Extend req.block_hashes to cover every full block of its tokens."""
        bs = self.block_size
        n = req.num_tokens
        if req.output_token_ids and req.output_token_ids[-1] == PENDING:
            n -= 1  # not sampled yet (async scheduling): no full block ends on it
        while (len(req.block_hashes) + 1) * bs <= n:
            i = len(req.block_hashes)
            parent = req.block_hashes[-1] if req.block_hashes else b""
            req.block_hashes.append(hash_block(parent, req.token_ids(i * bs, bs)))

    def acquire_prefix(self, req: Request) -> int:
        """Give a request with no blocks the longest cached prefix; returns its length in
        tokens (a multiple of block_size, and always leaving one token to compute)."""
        assert not any(req.block_tables.values()) and req.num_computed_tokens == 0
        for g in self.groups:
            req.block_tables[g] = []
        if not self.enable_prefix_caching:
            return 0
        self.update_hashes(req)
        bs, hashes, pool = self.block_size, req.block_hashes, self.pools[GLOBAL]
        limit = min(len(hashes), (req.num_tokens - 1) // bs)
        n = 0
        while n < limit and pool.lookup(hashes[n]) is not None:
            n += 1
        if LOCAL in self.pools:
            local = self.pools[LOCAL]
            while n > 0 and any(local.lookup(hashes[j]) is None for j in range(self._window_start(n * bs) // bs, n)):
                n -= 1
        for j in range(n):
            b = pool.lookup(hashes[j])
            pool.acquire(b)
            req.block_tables[GLOBAL].append(b)
        if LOCAL in self.pools:
            first = self._window_start(n * bs) // bs
            req.block_tables[LOCAL] = [None] * first
            for j in range(first, n):
                b = self.pools[LOCAL].lookup(hashes[j])
                self.pools[LOCAL].acquire(b)
                req.block_tables[LOCAL].append(b)
        return n * bs

    def cache_full_blocks(self, req: Request, from_token: int) -> None:
        """Publish the hashes of the blocks that computing tokens [from_token,
        num_computed_tokens) filled (earlier blocks were published when they filled, so a
        step costs what it computed, not the whole context)."""
        if not self.enable_prefix_caching:
            return
        self.update_hashes(req)
        full = min(req.num_computed_tokens // self.block_size, len(req.block_hashes))
        for g, pool in self.pools.items():
            table = req.block_tables[g]
            for j in range(from_token // self.block_size, min(full, len(table))):
                if table[j] is not None:
                    pool.cache(table[j], req.block_hashes[j])

    # -- allocation --------------------------------------------------------------------
    def _window_start(self, pos: int) -> int:
        return (pos // self.chunk) * self.chunk if self.chunk else 0

    def release_out_of_window(self, req: Request) -> None:
        """Local layers never again read blocks before the current chunk: give them back."""
        if LOCAL not in self.pools:
            return
        table = req.block_tables[LOCAL]
        # Released entries are always a prefix of the table, so walk back from the window
        # start only until the first one already released.
        j = min(self._window_start(req.num_computed_tokens) // self.block_size, len(table)) - 1
        gone = []
        while j >= 0 and table[j] is not None:
            gone.append(table[j])
            table[j] = None
            j -= 1
        self.pools[LOCAL].release(gone)  # tail first, as free() does

    def allocate_slots(self, req: Request, num_new_tokens: int) -> bool:
        """Make the tables cover num_computed + num_new tokens. False (and nothing taken)
        when a pool is short: the scheduler then preempts or waits."""
        self.release_out_of_window(req)
        need_blocks = cdiv(req.num_computed_tokens + num_new_tokens, self.block_size)
        need = {g: max(0, need_blocks - len(req.block_tables[g])) for g in self.groups}
        if any(need[g] > self.pools[g].num_free for g in self.groups):
            return False
        for g in self.groups:
            req.block_tables[g].extend(self.pools[g].allocate(need[g]))
        return True

    def reserve(self, req: Request, num_tokens: int) -> bool:
        """Decode role: hold blocks for positions [num_computed_tokens, num_tokens) that
        another instance fills. The local group needs only the window of the next
        position (num_tokens); earlier local blocks are neither reserved nor sent.
        False (and nothing taken) when a pool is short."""
        bs = self.block_size
        total = cdiv(num_tokens, bs)
        need = {GLOBAL: total - len(req.block_tables[GLOBAL])}
        if LOCAL in self.pools:
            table = req.block_tables[LOCAL]
            first = min(self._window_start(num_tokens) // bs, total)
            need[LOCAL] = total - max(len(table), first)
        if any(need[g] > self.pools[g].num_free for g in need):
            return False
        if LOCAL in self.pools:
            gone = [table[j] for j in range(min(first, len(table))) if table[j] is not None]
            for j in range(min(first, len(table))):
                table[j] = None
            table.extend([None] * (first - len(table)))
            self.pools[LOCAL].release(gone[::-1])
        for g in need:
            req.block_tables[g].extend(self.pools[g].allocate(need[g]))
        return True

    def can_fit(self, num_tokens: int) -> bool:
        """Whether a request of num_tokens could ever be held (for admission checks). The
        local pool is checked once, at start, against a chunk plus a step's budget."""
        return cdiv(num_tokens, self.block_size) <= self.pools[GLOBAL].num_blocks

    def free(self, req: Request) -> None:
        """Release every block the request holds, once; its tables become empty."""
        for g, table in req.block_tables.items():
            self.pools[g].release([b for b in reversed(table) if b is not None])
            table.clear()

    # -- checks ------------------------------------------------------------------------
    def pin(self, blocks: dict[str, list[int]]) -> None:
        """Hold these blocks (one more reference each) until unpin: their request may end
        and be freed meanwhile without the blocks going back to the pool."""
        for g, ids in blocks.items():
            for b in ids:
                self.pools[g].acquire(b)
            self.pinned[g].update(ids)

    def unpin(self, blocks: dict[str, list[int]]) -> None:
        for g, ids in blocks.items():
            held = self.pinned[g]
            if any(held[b] < n for b, n in Counter(ids).items()):
                raise RuntimeError(f"unpin: {g} blocks {ids} were not all pinned")
            held.subtract(ids)
            self.pools[g].release(list(ids))

    def check_integrity(self, requests) -> None:
        for g, pool in self.pools.items():
            refs = Counter(b for r in requests for b in r.block_tables.get(g, ()) if b is not None)
            refs.update(+self.pinned[g])
            pool.check_integrity(refs)

    def stats(self) -> dict[str, PoolStats]:
        return {g: p.stats() for g, p in self.pools.items()}
