"""Which KV blocks prefill pushes to decode, layer by layer.

For each request with a destination, prefill sends every block of the prompt that
decode lacks exactly once, as soon as it is complete:
  - global layers: blocks [num_cached // B, ceil(n / B)) — decode's prefix hit
    (block-aligned) is not sent;
  - chunked-local layers: only the window of decode's next position n, blocks
    [C * (n // C) // B, ceil(n / B)) — decode never reads older local KV.
Within a step, block j goes out once it is full ((j+1)·B ≤ computed), or at the final
step for the partial tail. The step's range is fixed before the forward; `on_layer(i)`
sends layer i's share of it right after layer i wrote its KV, so the transfer overlaps
the next layer's compute. The sender is fenced at the start of the step after one that
pushed, before its forward can write a block the engine freed or reused. Source ids
come from the request's own block table, and destination ids from decode's table at
the same index (both sides use one block size).
After the final step the pusher forgets the destination: its counters are final, and
the Prefill RPC reads them from its own reference, without the engine's lock.

A destination may come after its prompt (decode's `destination_follows`: decode sends
the prompt first and reserves its blocks while this engine already computes). Until
SetDestination fills it in (`set_blocks`, from a gRPC thread, without the engine's
lock), on_layer defers the request's layers; the first callback that finds the blocks
known sends what was deferred, trimmed to what decode lacks. The engine never waits
for decode: at the end of a step, layers still deferred have their source blocks pinned
(held past the request's end, KVCacheManager.pin), and whoever sees the blocks first
sends them: a later step of the same prompt, or, after its last step, the Prefill
handler (send_deferred, then a fence, then unpin under the engine's lock).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from engine.config import cdiv
from engine.kv_cache import pushed_blocks
from engine.scheduler import SchedulerOutput

log = logging.getLogger(__name__)


# How long a Prefill whose prompt is computed waits for a destination that follows it
# (its handler thread waits, never the engine); a cancel wakes it at once.
DESTINATION_WAIT = 2.0


@dataclass(frozen=True)
class DecodeBlocks:
    """Where decode takes the prompt's KV: given with the Prefill, or later by
    SetDestination (the destination follows)."""
    num_cached_tokens: int  # decode already holds positions below this (block-aligned)
    table: dict[str, list[int | None]]  # decode's block table per layer group


@dataclass
class Destination:
    address: str
    transfer_id: str
    blocks: DecodeBlocks | None = None  # None until known: the destination follows (set_blocks)
    sent_upto: dict[str, int] = field(default_factory=dict)  # next block index to send
    layers_sent: int = 0  # layer messages handed to the sender
    bytes_sent: int = 0  # KV bytes in those messages
    error: str | None = None  # the push failed; the Prefill RPC reports it
    # Thread ownership: `known` and `error` are set from any thread (SetDestination, a
    # cancel); blocks (given at construction, or by set_blocks from a gRPC thread) and
    # first_sent (the pusher's add or set_blocks) are written once, before `known` is
    # set, and used only after it; the rest belongs to the engine thread while the
    # request runs, then to the Prefill handler (the pusher forgets the destination
    # after its last step).
    known: threading.Event = field(default_factory=threading.Event)  # blocks known, or cancelled (error)
    # Per group, the first block index decode lacks (its prefix hit is never sent).
    first_sent: dict[str, int] | None = None
    prompt_len: int = 0
    # Layers computed before the blocks were known: (layer, lo, hi, source block ids).
    deferred: list[tuple[int, int, int, list[int]]] = field(default_factory=list)
    pinned: dict[str, list[int]] = field(default_factory=dict)  # source blocks held for them past a step
    num_pinned: int = 0  # deferred[:num_pinned] have their blocks pinned
    # For the service's log: when its first step began (perf_counter), and the engine
    # thread's time in this pusher during its steps (sends, deferrals, pins).
    t_first_step: float | None = None
    push_seconds: float = 0.0

    def cancel(self, reason: str) -> None:
        """From any thread, without the engine's lock: no more sends; wakes a Prefill
        handler waiting for the blocks."""
        if self.error is None:
            self.error = reason
        self.known.set()


class KVPusher:
    def __init__(self, sender, layer_group: list[str], block_size: int, chunk: int | None, kv=None):
        """kv: the engine's KVCacheManager, to pin the blocks of layers whose destination
        has not come by the end of their step (needed only with following destinations)."""
        self.sender = sender
        self.kv = kv
        self.layer_group = layer_group
        self.block_size = block_size
        self.chunk = chunk
        self.dest: dict[str, Destination] = {}
        self._step: tuple[SchedulerOutput, dict] | None = None
        self.fence_due = False  # a step pushed: fence the sender before the next forward

    # The engine's step hook: begin(plan) -> on_layer callback; end() after the forward.
    def begin(self, plan: SchedulerOutput):
        if self.fence_due:
            # The last step pushed, and this one may write blocks the engine freed since
            # (a finish, an abort, a preemption): the sender copies direct runs still
            # queued, and this stream waits for the sends already posted. Here rather than
            # at that step's end, so the first token it sampled is not held up behind the
            # sends of the last layers.
            self.sender.fence()
            self.fence_due = False
        t = time.perf_counter()
        ranges = self.plan_ranges(plan)
        self._step = (plan, ranges)
        for rid in ranges:
            d = self.dest[rid]
            if d.t_first_step is None:
                d.t_first_step = t
        return (lambda i: self._timed(ranges, self.on_layer, i, plan, ranges)) if ranges else None

    def _timed(self, ranges, fn, *args) -> None:
        t = time.perf_counter()
        try:
            fn(*args)
        finally:
            spent = time.perf_counter() - t
            for rid in ranges:
                d = self.dest.get(rid)
                if d is not None:
                    d.push_seconds += spent

    def end(self) -> None:
        if self._step is not None:
            plan, ranges = self._step
            self._timed(ranges, self._settle_deferred, plan)
            self.after_step(ranges)
            self.fence_due = self.fence_due or bool(ranges)  # before the next step's forward (begin)
            for c in plan.chunks:  # prompts computed to their end: every block went out
                if c.start + c.num_tokens == c.request.num_prompt_tokens:
                    self.dest.pop(c.request.request_id, None)
            self._step = None

    def add(self, request_id: str, dest: Destination, prompt_len: int) -> None:
        """Caller holds the engine's lock. ValueError for blocks that do not fit the
        prompt. A destination without blocks follows (set_blocks). Either way sent_upto
        starts as if decode held nothing; once the blocks are known, plan_ranges lifts it
        past decode's prefix hit (first_sent)."""
        dest.prompt_len = prompt_len
        dest.sent_upto = {g: r.start for g, r in
                          pushed_blocks(prompt_len, 0, self.block_size, self.chunk, set(self.layer_group)).items()}
        if dest.blocks is not None and dest.first_sent is None:  # known at once (not by an early set_blocks)
            self._take_blocks(dest, dest.blocks)
        self.dest[request_id] = dest

    def set_blocks(self, dest: Destination, blocks: DecodeBlocks) -> None:
        """A following destination's blocks, from any thread (the engine's lock is not
        needed: the engine thread reads them only once `known` is set). It may come before
        add (SetDestination can overtake the Prefill): dest.prompt_len is set already.
        ValueError for blocks that do not fit the prompt; the destination then fails, so
        the Prefill RPC reports it."""
        if dest.known.is_set():
            raise ValueError("destination: already known (or the request ended)")
        try:
            self._take_blocks(dest, blocks)
        except ValueError as e:
            dest.cancel(f"bad destination: {e}")
            raise ValueError(f"destination: {e}") from None

    def _take_blocks(self, dest: Destination, blocks: DecodeBlocks) -> None:
        """Checks the blocks against the prompt, then publishes them with first_sent, in
        this order: first_sent before blocks (add reads it to tell an early set_blocks
        from blocks known at once), both before `known`. sent_upto is the engine
        thread's: plan_ranges lifts it to first_sent."""
        ranges = self._check(dest.prompt_len, blocks)
        dest.first_sent = {g: r.start for g, r in ranges.items()}
        dest.blocks = blocks
        dest.known.set()

    def _check(self, prompt_len: int, blocks: DecodeBlocks) -> dict[str, range]:
        bs, num_cached = self.block_size, blocks.num_cached_tokens
        if num_cached % bs:
            raise ValueError(f"num_cached_tokens {num_cached} is not a multiple of block_size {bs}")
        ranges = pushed_blocks(prompt_len, num_cached, bs, self.chunk, set(self.layer_group))
        for g, r in ranges.items():
            table = blocks.table.get(g, [])
            if len(table) < r.stop or None in table[r.start : r.stop]:
                raise ValueError(f"destination blocks for {g!r} do not cover positions up to {prompt_len}")
        return ranges

    def remove(self, request_id: str) -> Destination | None:
        """Caller holds the engine's lock."""
        d = self.dest.pop(request_id, None)
        if d is not None:
            d.cancel("removed")
            self.unpin(d)
        return d

    def unpin(self, d: Destination) -> None:
        """Caller holds the engine's lock; after the sends that read the pinned blocks
        were posted and fenced (or never will be). Idempotent."""
        if d.pinned:
            self.kv.unpin(d.pinned)
            d.pinned = {}

    def plan_ranges(self, plan: SchedulerOutput) -> dict[str, dict[str, tuple[int, int]]]:
        """Block-index ranges [lo, hi) each request sends this step, per group."""
        out = {}
        for c in plan.chunks:
            d = self.dest.get(c.request.request_id)
            if d is None:
                continue
            if d.known.is_set() and d.first_sent is not None:  # blocks known: decode's prefix hit is not sent
                d.sent_upto = {g: max(lo, d.first_sent[g]) for g, lo in d.sent_upto.items()}
            done = c.start + c.num_tokens
            final = done == c.request.num_prompt_tokens
            upto = cdiv(done, self.block_size) if final else done // self.block_size
            ranges = {g: (lo, upto) for g, lo in d.sent_upto.items() if upto > lo}
            if ranges:
                out[c.request.request_id] = ranges
        return out

    def on_layer(self, layer: int, plan: SchedulerOutput, ranges) -> None:
        g = self.layer_group[layer]
        for c in plan.chunks:
            r = ranges.get(c.request.request_id, {}).get(g)
            if r is None:
                continue
            d = self.dest[c.request.request_id]
            if d.error is not None:
                continue
            src = c.request.block_tables[g][r[0] : r[1]]
            if not d.known.is_set():  # the blocks follow: send this layer once they are here
                d.deferred.append((layer, *r, src))
                continue
            if d.deferred:
                self._send_deferred_and_unpin(d)
            self._send(d, layer, *r, src)

    def _send(self, d: Destination, layer: int, lo: int, hi: int, src: list[int]) -> None:
        if d.error is not None:
            return
        g = self.layer_group[layer]
        first = max(lo, d.first_sent[g])  # ranges planned before the blocks came may start in decode's prefix hit
        if first >= hi:
            return
        src, dst = src[first - lo :], d.blocks.table[g][first:hi]
        try:
            self.sender.send_layer(d.address, d.transfer_id, layer, src, dst)
        except Exception as e:  # one bad transfer must not stop the engine's step
            log.exception("KV push for transfer %s failed", d.transfer_id)
            d.error = str(e)
            return
        d.layers_sent += 1
        kv = self.sender.kv_caches[layer]  # [2, num_blocks, block_size, kv_heads, head_dim]
        d.bytes_sent += len(src) * kv[:, 0].nbytes

    def send_deferred(self, d: Destination) -> None:
        """The deferred layers, now that the blocks are known. The engine thread then
        unpins at once (_send_deferred_and_unpin: the next step fences first); after a
        request's last step its Prefill handler sends them, and a pool thread fences the
        sender, then unpins under the engine's lock (PrefillServicer._fence_and_unpin)."""
        deferred, d.deferred, d.num_pinned = d.deferred, [], 0
        for layer, lo, hi, src in deferred:
            self._send(d, layer, lo, hi, src)

    def _settle_deferred(self, plan: SchedulerOutput) -> None:
        """End of a step: deferred layers go out if their blocks came meanwhile. Otherwise
        their source blocks are pinned, so the request may end (and be freed) without the
        engine waiting for decode: a later step, or the Prefill handler, sends them."""
        for c in plan.chunks:
            d = self.dest.get(c.request.request_id)
            if d is None or not d.deferred:
                continue
            if d.error is None and d.known.is_set():
                self._send_deferred_and_unpin(d)
                continue
            if d.error is None:  # pin what this step deferred: a group's layers share one list of blocks
                fresh = {(self.layer_group[layer], lo, hi): src for layer, lo, hi, src in d.deferred[d.num_pinned:]}
                blocks: dict[str, list[int]] = {}
                for (g, _, _), src in fresh.items():
                    blocks.setdefault(g, []).extend(src)
                self.kv.pin(blocks)
                for g, ids in blocks.items():
                    d.pinned.setdefault(g, []).extend(ids)
                d.num_pinned = len(d.deferred)
            if d.error is not None:  # checked again after pinning: a cancel meanwhile found nothing to unpin
                d.deferred.clear()
                self.unpin(d)

    def _send_deferred_and_unpin(self, d: Destination) -> None:
        """Engine thread: the deferred layers go out, and their pinned blocks go back at
        once, since the next step fences the sender before its forward writes anything
        (whether or not that step pushes)."""
        self.send_deferred(d)
        self.unpin(d)
        self.fence_due = True

    def after_step(self, ranges) -> None:
        for rid, groups in ranges.items():
            d = self.dest.get(rid)
            if d is not None:
                for g, (_, hi) in groups.items():
                    d.sent_upto[g] = hi
