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
the next layer's compute. Source ids come from the request's own block table, and
destination ids from decode's table at the same index (both sides use one block size).
After the final step the pusher forgets the destination: its counters are final, and
the Prefill RPC reads them from its own reference, without the engine's lock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from engine.config import cdiv
from engine.kv_cache import pushed_blocks
from engine.scheduler import SchedulerOutput

log = logging.getLogger(__name__)


@dataclass
class Destination:
    address: str
    transfer_id: str
    num_cached_tokens: int  # decode already holds positions below this (block-aligned)
    blocks: dict[str, list[int | None]]  # decode's block table per layer group
    sent_upto: dict[str, int] = field(default_factory=dict)  # next block index to send
    layers_sent: int = 0  # layer messages handed to the sender
    bytes_sent: int = 0  # KV bytes in those messages
    error: str | None = None  # the push failed; the Prefill RPC reports it


class KVPusher:
    def __init__(self, sender, layer_group: list[str], block_size: int, chunk: int | None):
        self.sender = sender
        self.layer_group = layer_group
        self.block_size = block_size
        self.chunk = chunk
        self.dest: dict[str, Destination] = {}
        self._step: tuple[SchedulerOutput, dict] | None = None

    # The engine's step hook: begin(plan) -> on_layer callback; end() after the forward.
    def begin(self, plan: SchedulerOutput):
        ranges = self.plan_ranges(plan)
        self._step = (plan, ranges)
        return (lambda i: self.on_layer(i, plan, ranges)) if ranges else None

    def end(self) -> None:
        if self._step is not None:
            plan, ranges = self._step
            self.after_step(ranges)
            if ranges:
                # From here the engine may free or reuse this step's blocks (a finish, an
                # abort, a preemption): the sender copies direct runs still queued and makes
                # this stream wait for the sends already posted.
                self.sender.fence()
            for c in plan.chunks:  # prompts computed to their end: every block went out
                if c.start + c.num_tokens == c.request.num_prompt_tokens:
                    self.dest.pop(c.request.request_id, None)
            self._step = None

    def add(self, request_id: str, dest: Destination, prompt_len: int) -> None:
        bs = self.block_size
        if dest.num_cached_tokens % bs:
            raise ValueError(f"num_cached_tokens {dest.num_cached_tokens} is not a multiple of block_size {bs}")
        ranges = pushed_blocks(prompt_len, dest.num_cached_tokens, bs, self.chunk, set(self.layer_group))
        dest.sent_upto = {g: r.start for g, r in ranges.items()}
        for g, r in ranges.items():
            table = dest.blocks.get(g, [])
            if len(table) < r.stop or None in table[r.start : r.stop]:
                raise ValueError(f"destination blocks for {g!r} do not cover positions up to {prompt_len}")
        self.dest[request_id] = dest

    def remove(self, request_id: str) -> Destination | None:
        return self.dest.pop(request_id, None)

    def plan_ranges(self, plan: SchedulerOutput) -> dict[str, dict[str, tuple[int, int]]]:
        """Block-index ranges [lo, hi) each request sends this step, per group."""
        out = {}
        for c in plan.chunks:
            d = self.dest.get(c.request.request_id)
            if d is None:
                continue
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
            dst = d.blocks[g][r[0] : r[1]]
            try:
                self.sender.send_layer(d.address, d.transfer_id, layer, src, dst)
            except Exception as e:  # one bad transfer must not stop the engine's step
                log.exception("KV push for %s failed", c.request.request_id)
                d.error = str(e)
                continue
            d.layers_sent += 1
            kv = self.sender.kv_caches[layer]  # [2, num_blocks, block_size, kv_heads, head_dim]
            d.bytes_sent += len(src) * kv[:, 0].nbytes

    def after_step(self, ranges) -> None:
        for rid, groups in ranges.items():
            d = self.dest.get(rid)
            if d is not None:
                for g, (_, hi) in groups.items():
                    d.sent_upto[g] = hi
