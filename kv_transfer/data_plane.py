"""The data side of TcpSender (sender.py) and TcpReceiver (receiver.py), which they inherit
from SenderDataPlane and ReceiverDataPlane: what turns send_layer's block lists into the
tensors a part carries and moves them (sender), and what takes a part's bytes off the
connection and writes them into the cache (receiver). The lifecycles, and the control
plane that calls these methods, are in sender.py's and receiver.py's docstrings.

  SenderDataPlane    block ids (checked, converted, split into direct runs and staged
                     blocks); the cache views that messages in flight still read (what
                     fence() waits for); the data plane hooks
  ReceiverDataPlane  block ids (direct runs' destinations checked); the cache writes;
                     the data plane hooks

Each class ends on its data plane hooks, here TCP's (the parts' bytes follow the block
ids in the frame's payload); nccl.py's NcclSender and NcclReceiver override them and
reuse the rest.

On CUDA caches the TCP data plane moves bytes through pinned host memory on both sides,
direct runs included: the sender copies them to host at send_layer, so fence() has
nothing to do there; the receiver's completer copies them in, like staged blocks.

Default `min_direct_blocks`: enough blocks for 2 MiB of K per run (64 blocks of a
Scout layer: 16 tokens x 8 heads x 128 x bf16 = 32 KiB of K a block). A run costs two
p2p ops (K and V) instead of its share of one; an op carries a fixed cost of a few us
inside a grouped NCCL launch (and ~50 us alone: NOTES.md measures 68 GB/s at 4 MiB
against 358 GB/s at 256 MiB), while 2 MiB crosses a 350 GB/s link in ~6 us; what a
run saves is its gather and its scatter, each ~4 MiB of HBM reads and writes per 2 MiB
of K (~3 us at ~3 TB/s). Below ~2 MiB the op's overhead outweighs the copies saved.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from kv_transfer import wire
from kv_transfer.base import check_blocks, direct_runs, raw
from kv_transfer.incoming import _Arrived, _Conn, _InPart, _Message
from kv_transfer.outgoing import _BlockIds, _Part, _Payload, _Peer, _Sent

log = logging.getLogger(__name__)

DIRECT_MIN_K_BYTES = 2 << 20  # default min_direct_blocks: this many K bytes per run (see above)


class SenderDataPlane:
    """TcpSender's data side. A mixin: it works on the state TcpSender.__init__ sets up
    (caches, min_direct_blocks, staging) and under the lock, records and stats TcpSender
    keeps."""

    # ---- block ids

    def _block_ids(self, transfer_id: str, layer: int, src_blocks: Sequence[int],
                   dst_blocks: Sequence[int]) -> _BlockIds:
        """The call's block lists, checked and converted: looked up among the transfer's
        recent lists, or (first call with these lists) checked, converted and split into
        direct runs and staged blocks now."""
        if not 0 <= layer < len(self.kv_caches):
            raise ValueError(f"layer: {layer} out of range [0, {len(self.kv_caches)})")
        num_blocks = self.kv_caches[layer].shape[1]
        with self._lock:
            rec = self._transfers.get(transfer_id)
            ids = None if rec is None else rec.find_ids(num_blocks, src_blocks, dst_blocks)
        if ids is not None:
            return ids
        whole = self._one_run(num_blocks, src_blocks, dst_blocks)
        if whole is not None:
            return whole
        src = check_blocks(self.kv_caches, layer, src_blocks, "src_blocks")
        if len(dst_blocks) != len(src_blocks):
            raise ValueError(f"dst_blocks: {len(dst_blocks)} ids for {len(src_blocks)} src_blocks")
        dst = wire.block_ids(dst_blocks, "dst_blocks")
        runs = tuple(direct_runs(src, torch.frombuffer(bytearray(dst), dtype=torch.int32), self.min_direct_blocks))
        staged = src
        if runs:
            keep = torch.ones(len(src), dtype=torch.bool)
            for offset, count in runs:
                keep[offset:offset + count] = False
            staged = src[keep]
        num_staged = staged.numel()
        if num_staged and self.device.type == "cuda":
            # From pinned memory the copy is truly asynchronous. From pageable memory it
            # would block this thread until the caller's stream drained -- in a prefill
            # that is until the layer just enqueued has finished computing.
            staged = staged.pin_memory().to(self.device, non_blocking=True)
        return _BlockIds(num_blocks, list(src_blocks), list(dst_blocks), dst, runs,
                         [int(src[offset]) for offset, _ in runs], staged if num_staged else None, num_staged)

    def _one_run(self, num_blocks: int, src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> _BlockIds | None:
        """The common case of a fresh pool, in plain Python: both lists are one run of
        consecutive ids, long enough to go direct, src within the pool. The general path
        costs ~0.3 ms of torch ops a list pair, paid on the first send_layer of a transfer
        before any byte moves. None: not this case (the general path checks and explains)."""
        n = len(src_blocks)
        if n < self.min_direct_blocks or len(dst_blocks) != n or type(src_blocks) is not list \
                or type(dst_blocks) is not list:
            return None
        if not (all(type(x) is int for x in src_blocks) and all(type(x) is int for x in dst_blocks)):
            return None
        s0, d0 = src_blocks[0], dst_blocks[0]
        if not (0 <= s0 and s0 + n <= num_blocks) or d0 < 0:
            return None
        if src_blocks != list(range(s0, s0 + n)) or dst_blocks != list(range(d0, d0 + n)):
            return None
        try:
            dst = wire.block_ids(dst_blocks, "dst_blocks")
        except ValueError:
            return None
        return _BlockIds(num_blocks, list(src_blocks), list(dst_blocks), dst, ((0, n),), [s0], None, 0)

    # ---- cache views in flight: what fence() waits for

    def _take(self, peer: _Peer, parts: list[_Part], sent: _Sent) -> list[torch.Tensor]:
        """Caller holds the lock. The data plane is about to read the parts' tensors: from
        now on fence() cannot copy them, and orders after the message instead. Returns
        the message's tensors in wire order."""
        if not peer.alive:  # its teardown already cleared what fence() waits on: add nothing
            raise ConnectionError(f"connection to {peer.address} lost")
        for p in parts:
            peer.unposted.pop(p, None)
        if any(p.payload.views for p in parts):
            sent.reads_cache = True
            self._reading.add(sent)
        return [t for p in parts for t in p.payload.tensors()]

    def _fence_sent(self) -> None:
        """fence(), second half: wait until no message in flight may still read cache
        views. The default (CPU caches) waits for their acks; a peer that does not ack
        within fence_timeout is torn down, which ends its reads."""
        with self._cond:
            if self._cond.wait_for(lambda: not self._live_reading(), timeout=self.fence_timeout):
                return
            stuck = {s.peer for s in self._live_reading()}
        for peer in stuck:
            self._peer_failed(peer, f"fence(): no ack within {self.fence_timeout:g} s")

    def _live_reading(self) -> set[_Sent]:
        """Caller holds the lock: the messages that may still read cache views, less those
        of dead peers (a torn-down pair reads nothing; its entries are dropped here)."""
        self._reading = {s for s in self._reading if s.peer.alive}
        return self._reading

    # ---- data plane hooks (TCP: the parts' bytes follow the block ids in the frame's
    # payload; on CUDA through pinned host memory)

    def _check_data_plane(self) -> None:
        pass

    def _hello_extras(self) -> dict[str, Any]:
        return {}

    def _connect_data_plane(self, peer: _Peer, reply: dict[str, Any]) -> None:
        pass

    def _teardown_data_plane(self, peer: _Peer) -> None:
        pass

    def _release_sent(self, peer: _Peer, sent: _Sent) -> None:
        """Reader, outside the lock: `sent` was acked; its buffers go when this returns."""

    def _link_wants_more(self, peer: _Peer) -> bool:
        """Should the caller's thread write queued messages itself (see _write_inline)?
        TCP: never; its sends carry the data and would block the caller for as long."""
        return False

    def _gather(self, layer: int, src_ids: torch.Tensor) -> torch.Tensor:
        """On the caller's stream; src_ids is already on the cache's device."""
        return self._raw[layer].index_select(1, src_ids)  # [2, m, bs, kvh, d] as bits, contiguous

    def _run_views(self, layer: int, ids: _BlockIds) -> list[torch.Tensor]:
        """K and V of each direct run: contiguous views of the cache, no copy."""
        k, v = self._kv[layer]
        views = []
        for s, (_, n) in zip(ids.run_src, ids.runs):
            views += (k[s:s + n], v[s:s + n])
        return views

    def _stage(self, layer: int, ids: _BlockIds) -> _Payload:
        """On the caller's thread and stream. CPU: the staged blocks gathered, the runs as
        views (read when sent). CUDA: everything copied into pinned host memory now."""
        staged = None if ids.staged is None else self._gather(layer, ids.staged)
        runs = self._run_views(layer, ids)
        if self.device.type != "cuda":
            return _Payload(staged, runs, views=bool(runs))
        payload = _Payload(staged, runs)
        leased = None if self._staging is None else self._staging.stage(payload.tensors())
        if leased is not None:  # pieces of the reserved pinned memory, in wire order
            payload.staged, (payload.runs, payload.keep) = None, leased
            payload.ready = payload.keep.copied
            return payload
        if self._staging is not None:
            self._staging_missed()
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for t in payload.tensors()]
        if staged is not None:
            payload.staged, host = host[0], host[1:]
        payload.runs = host
        payload.ready = torch.cuda.Event()
        payload.ready.record(torch.cuda.current_stream(self.device))
        return payload

    def _staging_missed(self) -> None:
        with self._lock:
            self._stats["host_staging_misses"] += 1
            first = self._stats["host_staging_misses"] == 1
        if first:
            log.warning("KV host staging (%d MiB pinned) has no room for a part: parts that find it full "
                        "pin fresh memory on the caller's thread (~0.5 ms a MiB the first time); more KV is "
                        "queued for decode than it holds (raise --kv-host-staging-mb)", self._staging.nbytes >> 20)

    def _record_ready(self, payload: _Payload, stream) -> None:
        """Record payload.ready on `stream`, numbered in recording order: of a message's
        parts, the one recorded last on a stream covers the others (fence() records a
        queued part's event again, so queue order is not recording order)."""
        with self._record_lock:
            payload.ready.record(stream)
            payload.ready_stream, payload.ready_seq = stream, next(self._ready_seq)

    def _detach(self, payload: _Payload) -> None:
        """Caller holds the lock (fence()): copy the runs out of the cache, on the current
        stream, so the part no longer reads blocks the caller is about to reuse."""
        payload.runs = [t.clone() for t in payload.runs]
        payload.views = False
        if payload.ready is not None:
            self._record_ready(payload, torch.cuda.current_stream(self.device))

    def _transmit(self, peer: _Peer, header: bytes, ids: list[memoryview], parts: list[_Part],
                  sent: _Sent) -> int:
        """Write one parts message (header, the block ids, then each part's data);
        returns the bytes it moved."""
        for p in parts:
            if p.payload.ready is not None:
                p.payload.ready.synchronize()
        with self._lock:
            tensors = self._take(peer, parts, sent)
        return wire.send_frame(peer.sock, header, ids + [wire.tensor_bytes(t) for t in tensors])


class ReceiverDataPlane:
    """TcpReceiver's data side. A mixin: it works on the state TcpReceiver.__init__ sets
    up (caches, the receiver's stream) and under the lock TcpReceiver keeps."""

    # ---- block ids

    def _run_first(self, dst_raw: bytes, runs: wire.Runs, tid: str) -> list[int]:
        """The first destination block of each run, once its ids are checked consecutive
        (ConnectionError if not: the stream is broken). Remembered per distinct (list,
        runs): every layer of a group repeats its step's list, message after message."""
        if not runs:
            return []
        key = (dst_raw, runs)
        first = self._checked_runs.get(key)
        if first is None:
            ids = memoryview(dst_raw).cast("i")
            first = [ids[offset] for offset, _ in runs]
            for a, (offset, n) in zip(first, runs):
                if ids[offset:offset + n].tolist() != list(range(a, a + n)):
                    raise ConnectionError(f"run [{offset}, {offset + n}) of a {tid!r} part has destination "
                                          "ids that are not consecutive")
            if len(self._checked_runs) >= self.MAX_CHECKED_RUNS:
                self._checked_runs.clear()
            self._checked_runs[key] = first
        return first

    # ---- the cache

    def _index(self, ids: torch.Tensor) -> torch.Tensor:
        """Block ids as an int64 index on the cache's device, made on the receiver's stream
        (the one every cache write uses), from pinned memory so nothing waits."""
        ids = ids.to(torch.int64)
        if self._stream is None:
            return ids
        with torch.cuda.stream(self._stream):
            return ids.pin_memory().to(self.device, non_blocking=True)

    def _write(self, layer: int, index: torch.Tensor, data: torch.Tensor) -> None:
        """Caller holds the lock. On CUDA the copy is enqueued on the receiver's stream and
        not waited for here (see _sync)."""
        cache = self._raw[layer]  # [2, num_blocks, bs, kvh, d] as bits
        if self._stream is None:
            cache.index_copy_(1, index, raw(data))
            return
        with torch.cuda.stream(self._stream):
            cache.index_copy_(1, index, raw(data).to(self.device, non_blocking=True))

    def _write_run(self, layer: int, first: int, data: torch.Tensor) -> None:
        """Caller holds the lock: a run that did not land in place ([2, n, bs, kvh, d],
        TCP on CUDA: pinned host memory) into blocks first..first+n-1."""
        with torch.cuda.stream(self._stream):
            self.kv_caches[layer][:, first:first + data.shape[1]].copy_(data, non_blocking=True)

    # ---- data plane hooks (TCP: the parts' bytes follow the block ids in the frame's payload)

    def _check_data_plane(self) -> None:
        pass

    def _accept_data_plane(self, conn: _Conn, hello: dict[str, Any]) -> dict[str, Any]:
        return {}

    def _connect_data_plane(self, conn: _Conn) -> None:
        pass

    def _teardown_data_plane(self, conn: _Conn) -> None:
        pass

    def _receives_in_place(self) -> bool:
        """Does the data plane put a claimed part's runs straight into the cache? TCP: on
        CPU caches (recv_into the cache's memory); on CUDA they come through host memory."""
        return self._stream is None

    def _staged_shape(self, part: _InPart) -> tuple[int, ...]:
        return (2, part.num_staged, *self._block_shape)

    def _take_data(self, conn: _Conn, msg: _Message, nbytes: int) -> str | None:
        """Reader: start the parts' data moving (`nbytes` more payload bytes are on the
        socket) and set each part's `data`. A problem string means the whole message's
        data was consumed and dropped. TCP: read it all now: staged blocks into a
        buffer, claimed runs into the cache (CPU), others into host buffers or dropped."""
        want = sum(len(p.dst) for p in msg.parts) * self._block_bytes
        if nbytes != want:
            conn.reader.discard(nbytes)
            return f"payload of {nbytes} bytes after the block ids, want {want}"
        pin = self._stream is not None
        dtype = self.kv_caches[0].dtype
        for p in msg.parts:
            staged = None
            if p.num_staged:
                buf = conn.reader.payload(p.num_staged * self._block_bytes, pin_memory=pin)
                staged = buf.view(dtype).view(self._staged_shape(p))
            runs = []
            for first, n in p.run_dst():
                if p.claim is not None:  # CPU: in place
                    for half in self._kv[p.layer]:
                        conn.reader.into(wire.tensor_bytes(half[first:first + n]))
                elif pin:  # CUDA: through host memory, written by the completer if the part passes
                    buf = conn.reader.payload(n * self._block_bytes, pin_memory=True)
                    runs.append(buf.view(dtype).view(2, n, *self._block_shape))
                else:  # CPU, may not land: dropped
                    conn.reader.discard(n * self._block_bytes)
            p.data = _Arrived(staged, runs)
        return None

    def _await_data(self, conn: _Conn, part: _InPart) -> _Arrived:
        """Completer: the part's data, once it is all here."""
        return part.data
