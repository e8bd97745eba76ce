"""Sender side (prefill) of the control plane every backend shares. Its data side (block
ids converted and split, cache views in flight, the TCP data plane as the default hooks,
and why `min_direct_blocks` defaults to 2 MiB of K): SenderDataPlane in data_plane.py.
The TCP backend as a whole: tcp.py. The per-transfer and per-connection bookkeeping
types (_Outgoing, _Peer, _Outbox, _Part, ...): outgoing.py.

Sender lifecycle (prefill side), one record per transfer_id:

    send_layer() ─► BOOTSTRAPPING (connecting) ─► TRANSFERRING (parts queued) ─finish()─►
        finish_ack(DONE) from the receiver ─► DONE
    a part nacked / finish_ack(FAILED) / connection lost / abort() / unreachable peer ─► FAILED

  Per peer address: one connection, opened on first contact and cached; a writer thread
  drains the peer's FIFO queue and a reader thread applies the receiver's answers.

  send_layer() checks its arguments and queues one *part*. Block ids are checked and
  converted once per transfer per distinct (src, dst) pair of lists -- a prefill step
  passes one pair for all global layers and one for all local layers -- and recognised
  after that by list equality, which is a pointer comparison per id when the lists are
  slices of the same block table. The conversion also splits the lists into direct runs
  and staged blocks (base.py): runs of at least `min_direct_blocks` consecutive ids on
  both sides go direct, the rest is staged.
    staged blocks  gathered now into one contiguous buffer (on CUDA: on the caller's
                   stream, so the caller may go on and reuse those source blocks once
                   later work on that stream follows);
    direct runs    NOT copied: the part holds views `kv_caches[layer][0|1, s:s+n]`, read
                   when the writer sends the message (on CUDA: by NCCL, ordered after
                   the caller's stream as it was at send_layer). The caller must call
                   fence() before it writes into such a block (a freed block reused by a
                   later request): fence() copies the runs of parts still queued, and
                   orders the caller after the sends already posted (CUDA: its stream
                   waits for them; CPU: it waits for the receiver's ack).
  So a call costs two list comparisons, at most one gather launch, an event record and a
  queue hand-off: no host-to-device copy and no per-id Python.

  Coalescing: the writer takes every part already queued for the peer (FIFO, up to
  `max_message_bytes`, at least one) and sends them as ONE parts message (wire.py): one
  header, the parts' data back to back. A caller that outruns the link therefore gets
  fewer, larger messages; one that sends a layer per layer-compute gets a message per
  layer. Parts of different transfers share messages in call order.
  Inline writes: where the data plane can tell how busy the link is (NCCL: sends posted
  and not complete; never on TCP), send_layer writes what is queued on the caller's own
  thread while fewer than LINK_DEPTH messages are in flight, and finish always, instead
  of waking the writer thread, which needs the GIL from a caller busy running Python
  (measured: 2-3 ms before the writer ran again while a loop of send_layer calls held
  it). Whoever writes holds the peer's `writing` lock from taking the items to sending
  them, so messages keep queue order. finish and abort
  are messages of their own, in queue order, so the receiver answers finish only after
  every earlier part on the connection: its DONE covers all parts. A part whose
  transfer is FAILED (aborted, rejected) when the writer takes it is dropped unsent;
  once a message's header is on the wire its data follows whatever happens to its
  transfers (the receiver's posted recvs must be matched, in order).

  The receiver acks each parts message once, listing the parts it discarded; each other
  part counts as acked for its transfer (`layers_acked`). A message's data-plane buffers
  stay alive until its ack (or until the connection is torn down). Queued parts hold
  their staged buffers until sent: a caller that outruns the link holds up to a
  request's whole KV in the queue. release() forgets a record. The socket is closed by
  whichever of the peer's two threads ends last.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from collections import Counter
from typing import Any, Sequence

import torch

from kv_transfer import wire
from kv_transfer.base import CacheLayout, KVSender, LayoutMismatch, TransferError, TransferStatus, raw, TransferRecords
from kv_transfer.data_plane import DIRECT_MIN_K_BYTES, SenderDataPlane
from kv_transfer.outgoing import _Control, _Outgoing, _Part, _Peer, _Sent
from kv_transfer.staging import DEFAULT_STAGING_BYTES, PinnedStaging

log = logging.getLogger(__name__)
S = TransferStatus


class TcpSender(TransferRecords, SenderDataPlane, KVSender):
    data_plane = "tcp"
    max_message_bytes = 256 << 20  # coalescing cap: parts per message stop adding up past this
    write_inline = False  # the caller writes queued messages itself when the link runs dry (_write_inline; NCCL)
    # Messages in flight below which send_layer writes inline. 1: only onto an idle link. At
    # 2 (one on the wire, the next posted behind it) a caller that sends a layer at a time
    # wrote a message per layer: 47 messages for 48 layers, and the receiver's per-message
    # Python made the transfer slower, 49-59% of raw NCCL against 70-84% (2x H200).
    LINK_DEPTH = 1
    fence_timeout = 30.0  # s; a peer whose posted sends fence() waits on longer than this is torn down
    stages_on_host = True  # CUDA caches: parts are copied to pinned host memory (staging.py); not NCCL

    def __init__(self, layout: CacheLayout, kv_caches: Sequence[torch.Tensor],
                 connect_timeout: float = 10.0, min_direct_blocks: int | None = None,
                 host_staging_bytes: int = DEFAULT_STAGING_BYTES):
        """min_direct_blocks: the shortest run of consecutive ids (on both sides) that
        travels direct; None: DIRECT_MIN_K_BYTES of K per run. host_staging_bytes: TCP
        on CUDA caches, pinned host memory reserved at start-up for parts on their way
        (staging.py; 0: pin per part, as torch's allocator does)."""
        layout.check_caches(kv_caches)
        self.layout = layout
        self.kv_caches = list(kv_caches)
        self._raw = [raw(c) for c in self.kv_caches]  # the caches as bits: what gathers copy (base.raw)
        self._kv = [(c[0], c[1]) for c in self.kv_caches]  # K and V of each layer, [num_blocks, bs, kvh, d]
        self.device = self.kv_caches[0].device
        self.connect_timeout = connect_timeout
        k_bytes = self.kv_caches[0][0, 0].nbytes  # K of one block of one layer
        if min_direct_blocks is None:
            min_direct_blocks = max(1, -(-DIRECT_MIN_K_BYTES // k_bytes))
        if type(min_direct_blocks) is not int or min_direct_blocks < 1:
            raise ValueError(f"min_direct_blocks: must be an integer >= 1, got {min_direct_blocks!r}")
        self.min_direct_blocks = min_direct_blocks
        self._staging = (PinnedStaging(host_staging_bytes) if host_staging_bytes and self.stages_on_host
                         and self.device.type == "cuda" else None)
        self._check_data_plane()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._transfers: dict[str, _Outgoing] = {}
        self._peers: dict[str, _Peer] = {}
        self._connect_locks: dict[str, threading.Lock] = {}
        self._reading: set[_Sent] = set()  # messages sent or being sent whose data plane may still read cache views
        self._record_lock = threading.Lock()
        self._ready_seq = itertools.count()
        self._stats: Counter[str] = Counter()
        self._closed = False

    # ---- public API

    def connect(self, address: str) -> None:
        self._peer(address)

    def send_layer(self, address: str, transfer_id: str, layer: int,
                   src_blocks: list[int], dst_blocks: list[int]) -> None:
        """Returns at once; failures (unreachable peer included) show as FAILED in poll().
        Call connect() first to get them raised instead. Direct runs are read later:
        call fence() before writing into a block passed here."""
        ids = self._block_ids(transfer_id, layer, src_blocks, dst_blocks)
        with self._lock:
            rec = self._transfers.setdefault(transfer_id, _Outgoing(address))
            if rec.address != address:
                raise ValueError(f"transfer_id: {transfer_id!r} goes to {rec.address}, not {address}")
            if rec.finished:
                raise ValueError(f"transfer_id: {transfer_id!r} already finished")
            if rec.status.terminal:
                return  # aborted or rejected: nothing to gain by sending
            rec.remember_ids(ids)
            peer = rec.peer if rec.peer is not None and rec.peer.alive else None
        if peer is None:
            try:
                peer = self._peer(address)
            except (TransferError, LayoutMismatch) as e:
                with self._lock:
                    if not rec.status.terminal:
                        self._fail(rec, str(e))
                log.warning("KV transfer %s failed: %s", transfer_id, e)
                return
        part = _Part(transfer_id, layer, ids, self._stage(layer, ids))
        with self._lock:
            if rec.status.terminal:
                return
            if not peer.alive:
                self._fail(rec, f"connection to {address} lost")
                return
            rec.peer = peer
            rec.layers_queued += 1
            if rec.status < S.TRANSFERRING:
                rec.status = S.TRANSFERRING
                self._cond.notify_all()
            if part.payload.views:
                peer.unposted[part] = None
            peer.outbox.put(part)
        self._write_inline(peer)

    def fence(self) -> None:
        """See KVSender.fence. Cheap when nothing is pending: one lock and a scan of the
        peers. Call it from the thread (CUDA: with the stream current) that writes the
        blocks next."""
        with self._lock:
            for peer in self._peers.values():  # a dead peer's queued parts are never sent
                for part in peer.unposted:
                    self._detach(part.payload)
                self._stats["parts_fenced"] += len(peer.unposted)
                peer.unposted.clear()
        self._fence_sent()

    def finish(self, address: str, transfer_id: str, num_layers: int) -> None:
        with self._lock:
            rec = self._transfers.get(transfer_id)
            if rec is None:
                raise KeyError(f"transfer_id: {transfer_id!r} has no send_layer yet")
            if rec.address != address:
                raise ValueError(f"transfer_id: {transfer_id!r} goes to {rec.address}, not {address}")
            if rec.status.terminal or rec.finished:
                return
            if rec.peer is None or num_layers != rec.layers_queued:
                raise ValueError(f"num_layers: {num_layers}, but {rec.layers_queued} layer messages were sent")
            rec.finished = True
            peer = rec.peer
            item = _Control(transfer_id, {"op": "finish", "tid": transfer_id, "num_layers": num_layers})
            peer.outbox.put(item)
        self._write_inline(peer, until=item)

    def abort(self, transfer_id: str) -> None:
        """FAILED unless already DONE; queued parts are dropped and the receiver is told.
        A message already on the wire is completed (the pair's data stream must stay in
        step); the receiver may write its parts, then fails the transfer when the abort
        message, which follows them, arrives."""
        with self._lock:
            rec = self._transfers.get(transfer_id)
            if rec is None or rec.status.terminal:
                return
            self._fail(rec, "aborted by the sender")
            if rec.peer is not None and rec.peer.alive:
                rec.peer.outbox.put(_Control(transfer_id, {"op": "abort", "tid": transfer_id}))

    def release(self, transfer_id: str) -> None:
        with self._lock:
            self._transfers.pop(transfer_id, None)

    def stats(self) -> dict[str, int]:
        """layers_*: parts (send_layer calls); messages_sent: parts messages on the wire,
        messages_inline of them written by the caller's thread (_write_inline);
        blocks_direct / blocks_staged: blocks of the parts sent, by path; parts_fenced:
        queued parts whose direct runs fence() copied; host_staging_misses: parts (TCP on
        CUDA) that found the pinned staging full and pinned memory of their own."""
        with self._lock:
            out = dict.fromkeys(("bytes_sent", "layers_sent", "layers_acked", "layers_dropped", "messages_sent",
                                 "messages_inline", "host_staging_misses",
                                 "blocks_direct", "blocks_staged", "parts_fenced", "transfers_done",
                                 "transfers_failed", "connections_opened"), 0)
            out.update(self._stats)
            out["connections"] = sum(p.alive for p in self._peers.values())
            return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            peers = list(self._peers.values())
        for peer in peers:
            self._peer_failed(peer, "sender closed")
        for peer in peers:
            for t in peer.threads:
                t.join(timeout=5)

    # ---- connections

    def _peer(self, address: str) -> _Peer:
        with self._lock:
            if self._closed:
                raise TransferError("sender is closed")
            lock = self._connect_locks.setdefault(address, threading.Lock())
        with lock:  # one connect per address at a time; others reuse its result
            with self._lock:
                peer = self._peers.get(address)
                if peer is not None and peer.alive:
                    return peer
            peer = self._open(address)
            peer.threads = [threading.Thread(target=loop, args=(peer,), daemon=True,
                                             name=f"kv-send-{name}-{address}")
                            for name, loop in (("write", self._write_loop), ("read", self._read_loop))]
            with self._lock:
                self._peers[address] = peer
                self._stats["connections_opened"] += 1
            for t in peer.threads:
                t.start()
            return peer

    def _open(self, address: str) -> _Peer:
        host, port = wire.parse_address(address)
        try:
            sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        except OSError as e:
            raise TransferError(f"cannot reach KV receiver at {address}: {e}") from e
        try:
            wire.tune_socket(sock)
            sock.settimeout(wire.HANDSHAKE_TIMEOUT_S)
            wire.send_frame(sock, {"op": "hello", "proto": wire.PROTO_VERSION, "data_plane": self.data_plane,
                                   "layout": self.layout.to_dict(), **self._hello_extras()})
            reader = wire.Reader(sock)
            op, reply = reader.frame()
            try:
                self.layout.check_compatible(CacheLayout.from_dict(reply["layout"]))
            except LayoutMismatch as e:
                raise LayoutMismatch(f"KV receiver at {address}: {e}") from None
            if op != "hello_ok":
                raise TransferError(f"KV receiver at {address} refused the connection: {reply.get('reason')}")
            peer = _Peer(address, sock, reader)
            self._connect_data_plane(peer, reply)
            sock.settimeout(None)
            return peer
        except (LayoutMismatch, TransferError):
            sock.close()
            raise
        except Exception as e:
            sock.close()
            raise TransferError(f"handshake with KV receiver at {address} failed: {type(e).__name__}: {e}") from e

    def _peer_failed(self, peer: _Peer, reason: str) -> None:
        with self._lock:
            if not peer.alive:
                return
            peer.alive = False
            peer.unposted.clear()  # its queue is never sent
            if self._peers.get(peer.address) is peer:
                del self._peers[peer.address]
            for rec in self._transfers.values():
                if rec.peer is peer and not rec.status.terminal:
                    self._fail(rec, f"connection to {peer.address} lost: {reason}")
        if reason != "sender closed":
            log.warning("KV connection to %s lost: %s", peer.address, reason)
        peer.outbox.put(None)
        wire.shutdown(peer.sock)
        self._teardown_data_plane(peer)  # ends data-plane ops still waiting for the peer...
        with self._lock:  # ...before their buffers may be reused, and the cache views they read rewritten
            self._reading.difference_update(peer.inflight.values())
            peer.inflight.clear()
            self._cond.notify_all()

    def _fail(self, rec: _Outgoing, reason: str) -> None:
        """Caller holds the lock."""
        rec.status, rec.reason = S.FAILED, reason
        rec.block_ids.clear()
        self._stats["transfers_failed"] += 1
        self._cond.notify_all()

    # ---- the writer: coalescing queued parts into messages

    def _use_device(self) -> None:
        """Our threads start here: CUDA calls that use the current device (pinned memory,
        device guards) must not create a context on another GPU."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _write_loop(self, peer: _Peer) -> None:
        self._use_device()
        try:
            while True:
                self._wait_for_work(peer)
                with peer.writing:
                    batch = self._next_batch(peer)
                    if batch is None:
                        return
                    self._send(peer, batch)
                    del batch  # its parts' host staging goes back now, not when the next message comes
        except Exception as e:
            self._peer_failed(peer, f"send failed: {type(e).__name__}: {e}")
        finally:
            self._thread_done(peer)

    def _wait_for_work(self, peer: _Peer) -> None:
        """The writer thread, holding nothing: until something is queued."""
        peer.outbox.wait()

    def _next_batch(self, peer: _Peer) -> list[_Part] | _Control | None:
        """The writer thread's next message: parts (up to max_message_bytes; [] if another
        thread took them first), a control message, or None: stop."""
        return peer.outbox.take(self.max_message_bytes, writer=True)

    def _send(self, peer: _Peer, batch: list[_Part] | _Control) -> None:
        if isinstance(batch, _Control):
            self._send_control(peer, batch)
        elif batch:
            self._send_parts(peer, batch)

    def _write_inline(self, peer: _Peer, until: _Control | None = None) -> None:
        """On the caller's thread, after it queued something: write one message of what is
        queued now if the link is about to run dry (fewer than LINK_DEPTH messages in
        flight), or (until: the finish just queued; nothing follows to carry the queue
        out) everything up to and including that item, unless another thread is writing.
        Otherwise the writer thread, or the caller's next call, sends it, coalesced with
        what comes next. The writer thread needs the GIL to start, and a caller running
        Python (prefill's forward pass; the bench's loop) can keep it from getting it for
        milliseconds: a link left without work would idle that long. Only where the data
        plane allows it (write_inline: never on TCP, whose sends carry the data)."""
        try:
            if not (self.write_inline and (until is not None or self._link_wants_more(peer))
                    and peer.writing.acquire(blocking=False)):
                return
        except Exception:  # a broken pair: the writer thread runs into it and fails the peer
            return
        try:
            while batch := peer.outbox.take(self.max_message_bytes, writer=False):
                self._send(peer, batch)
                if isinstance(batch, list):
                    with self._lock:
                        self._stats["messages_inline"] += 1
                if until is None or batch is until:
                    break
        except BaseException as e:  # a header may be out without its data: the connection is out of step
            self._peer_failed(peer, f"send failed: {type(e).__name__}: {e}")
            if not isinstance(e, Exception):
                raise
        finally:
            peer.writing.release()

    def _send_control(self, peer: _Peer, item: _Control) -> None:
        with self._lock:
            rec = self._transfers.get(item.tid)
            dropped = item.header["op"] != "abort" and (rec is None or rec.status == S.FAILED)
        if not dropped:
            wire.send_frame(peer.sock, item.header)

    def _send_parts(self, peer: _Peer, parts: list[_Part]) -> None:
        with self._lock:
            live = []
            for p in parts:
                rec = self._transfers.get(p.tid)
                if rec is None or rec.status == S.FAILED:
                    self._stats["layers_dropped"] += 1
                    peer.unposted.pop(p, None)
                else:
                    live.append(p)
            if not live:
                return
            seq, peer.next_seq = peer.next_seq, peer.next_seq + 1
            sent = peer.inflight[seq] = _Sent(peer, [(p.tid, p.layer) for p in live])  # before the ack can come
        header, ids = wire.parts_header(seq, [(p.tid, p.layer, p.ids.dst, p.ids.runs) for p in live])
        nbytes = self._transmit(peer, header, ids, live, sent)
        with self._lock:
            self._stats["messages_sent"] += 1
            self._stats["layers_sent"] += len(live)
            self._stats["bytes_sent"] += nbytes
            self._stats["blocks_direct"] += sum(p.ids.num_direct for p in live)
            self._stats["blocks_staged"] += sum(p.ids.num_staged for p in live)

    # ---- the reader: the receiver's answers

    def _read_loop(self, peer: _Peer) -> None:
        self._use_device()
        try:
            while True:
                op, msg = peer.reader.frame()
                acked = None
                with self._lock:
                    if op == "ack":
                        acked = self._on_ack(peer, msg)
                    elif op == "finish_ack":
                        self._on_finish_ack(peer, msg)
                    else:
                        raise ConnectionError(f"unknown message {op!r}")
                if acked is not None:  # outside the lock: send_layer waits for it
                    self._release_sent(peer, acked)
                    del acked
        except Exception as e:
            self._peer_failed(peer, f"{type(e).__name__}: {e}")
        finally:
            self._thread_done(peer)

    def _on_ack(self, peer: _Peer, msg: wire.Ack) -> _Sent:
        """Caller holds the lock. Returns the acked message, whose buffers may go."""
        sent = peer.inflight.pop(msg.seq, None)
        if sent is None:
            raise ConnectionError(f"ack for message {msg.seq}, which is not in flight")
        if sent.reads_cache:  # the receiver has every byte: nothing reads the cache for it any more
            self._reading.discard(sent)
            self._cond.notify_all()
        failed = dict(msg.failed)  # part index -> reason
        for j, (tid, layer) in enumerate(sent.parts):
            rec = self._transfers.get(tid)
            if j in failed:
                if rec is not None and not rec.status.terminal:
                    self._fail(rec, f"receiver {peer.address} discarded layer {layer}: {failed[j]}")
                continue
            self._stats["layers_acked"] += 1
            if rec is not None:
                rec.layers_acked += 1
        return sent

    def _on_finish_ack(self, peer: _Peer, msg: dict[str, Any]) -> None:
        """Caller holds the lock."""
        rec = self._transfers.get(msg["tid"])
        if rec is None or rec.status.terminal:
            return
        if msg["status"] == S.DONE and rec.layers_acked == rec.layers_queued:
            rec.status = S.DONE
            rec.block_ids.clear()
            self._stats["transfers_done"] += 1
            self._cond.notify_all()
        else:
            self._fail(rec, f"receiver {peer.address}: {msg['reason'] or 'layers missing'}")

    def _thread_done(self, peer: _Peer) -> None:
        """The socket is closed by whichever of the peer's two threads ends last, so no
        thread can ever use a file descriptor number that was closed and reused."""
        with self._lock:
            peer.threads_running -= 1
            last = peer.threads_running == 0
        if last:
            self._peer_failed(peer, "connection closed")
            peer.sock.close()
