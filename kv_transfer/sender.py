"""Sender side (prefill) of the control plane every backend shares, with the TCP data
plane as the default hooks. The TCP backend as a whole: tcp.py.

Sender lifecycle (prefill side), one record per transfer_id:

    send_layer() ─► BOOTSTRAPPING (connecting) ─► TRANSFERRING (layers queued) ─finish()─►
        finish_ack(DONE) from the receiver ─► DONE
    nack / finish_ack(FAILED) / connection lost / abort() / unreachable peer ─► FAILED

  Per peer address: one connection, opened on first contact and cached; a writer thread
  drains the peer's FIFO queue (so a connection's layers go out in call order, transfers
  interleaved) and a reader thread applies acks. send_layer gathers the blocks before it
  returns (on CUDA: stream-ordered, into pinned memory), so the caller may reuse its
  source blocks once later work on the same stream follows. A transfer whose record is
  FAILED (aborted, rejected) has its queued layers dropped unsent. The receiver answers
  finish only after every earlier message on the connection, so its DONE covers all
  layers. Queued layers hold their gathered buffers until sent: a caller that outruns the
  link holds up to a request's whole KV in the queue. release() forgets a record.
  The socket is closed by whichever of the peer's two threads ends last.

On CUDA caches the TCP data plane moves bytes through pinned host memory on both sides.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from kv_transfer import wire
from kv_transfer.base import (CacheLayout, KVSender, LayoutMismatch, TransferError, TransferStatus,
                              check_blocks, TransferRecords)

log = logging.getLogger(__name__)
S = TransferStatus


@dataclass(eq=False)
class _Peer:
    """One connection to a receiver."""
    address: str
    sock: socket.socket
    queue: queue.Queue = field(default_factory=queue.Queue)  # (kind, tid, header, staged) | None
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    alive: bool = True
    threads: list[threading.Thread] = field(default_factory=list)
    threads_running: int = 2  # writer and reader
    data: Any = None  # the data plane's per-connection state
    inflight: dict[tuple[str, int], list] = field(default_factory=dict)  # per (tid, layer), kept until acked


@dataclass(eq=False)
class _Outgoing:
    address: str
    status: S = S.BOOTSTRAPPING
    peer: _Peer | None = None
    # Layer messages queued / acknowledged. A layer may take several messages: chunked
    # prefill sends its blocks step by step as they fill.
    layers_queued: int = 0
    layers_acked: int = 0
    finished: bool = False
    reason: str = ""


@dataclass
class _Staged:
    tensor: torch.Tensor  # [2, n, bs, kvh, d], contiguous
    ready: Any = None  # torch.cuda.Event recorded after the gather/copy; None on CPU


class TcpSender(TransferRecords, KVSender):
    data_plane = "tcp"

    def __init__(self, layout: CacheLayout, kv_caches: Sequence[torch.Tensor],
                 connect_timeout: float = 10.0):
        layout.check_caches(kv_caches)
        self.layout = layout
        self.kv_caches = list(kv_caches)
        self.device = self.kv_caches[0].device
        self.connect_timeout = connect_timeout
        self._check_data_plane()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._transfers: dict[str, _Outgoing] = {}
        self._peers: dict[str, _Peer] = {}
        self._connect_locks: dict[str, threading.Lock] = {}
        self._stats: Counter[str] = Counter()
        self._closed = False

    # ---- public API

    def connect(self, address: str) -> None:
        self._peer(address)

    def send_layer(self, address: str, transfer_id: str, layer: int,
                   src_blocks: list[int], dst_blocks: list[int]) -> None:
        """Returns at once; failures (unreachable peer included) show as FAILED in poll().
        Call connect() first to get them raised instead."""
        src_ids = check_blocks(self.kv_caches, layer, src_blocks, "src_blocks")
        if len(dst_blocks) != len(src_blocks):
            raise ValueError(f"dst_blocks: {len(dst_blocks)} ids for {len(src_blocks)} src_blocks")
        with self._lock:
            rec = self._transfers.setdefault(transfer_id, _Outgoing(address))
            if rec.address != address:
                raise ValueError(f"transfer_id: {transfer_id!r} goes to {rec.address}, not {address}")
            if rec.finished:
                raise ValueError(f"transfer_id: {transfer_id!r} already finished")
            if rec.status.terminal:
                return  # aborted or rejected: nothing to gain by sending
        try:
            peer = self._peer(address)
        except (TransferError, LayoutMismatch) as e:
            with self._lock:
                if not rec.status.terminal:
                    self._fail(rec, str(e))
            log.warning("KV transfer %s failed: %s", transfer_id, e)
            return
        staged = self._stage(layer, src_ids)
        header = {"op": "layer", "tid": transfer_id, "layer": layer, "dst": list(dst_blocks),
                  "shape": list(staged.tensor.shape), "dtype": self.layout.dtype}
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
            peer.queue.put(("layer", transfer_id, header, staged))

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
            rec.peer.queue.put(("finish", transfer_id,
                                {"op": "finish", "tid": transfer_id, "num_layers": num_layers}, None))

    def abort(self, transfer_id: str) -> None:
        """FAILED unless already DONE; queued layers are dropped and the receiver is told."""
        with self._lock:
            rec = self._transfers.get(transfer_id)
            if rec is None or rec.status.terminal:
                return
            self._fail(rec, "aborted by the sender")
            if rec.peer is not None and rec.peer.alive:
                rec.peer.queue.put(("abort", transfer_id, {"op": "abort", "tid": transfer_id}, None))

    def release(self, transfer_id: str) -> None:
        with self._lock:
            self._transfers.pop(transfer_id, None)

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict.fromkeys(("bytes_sent", "layers_sent", "layers_acked", "transfers_done",
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
            reply = wire.recv_frame(sock)
            try:
                self.layout.check_compatible(CacheLayout.from_dict(reply["layout"]))
            except LayoutMismatch as e:
                raise LayoutMismatch(f"KV receiver at {address}: {e}") from None
            if reply.get("op") != "hello_ok":
                raise TransferError(f"KV receiver at {address} refused the connection: {reply.get('reason')}")
            peer = _Peer(address, sock)
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
            if self._peers.get(peer.address) is peer:
                del self._peers[peer.address]
            for rec in self._transfers.values():
                if rec.peer is peer and not rec.status.terminal:
                    self._fail(rec, f"connection to {peer.address} lost: {reason}")
        if reason != "sender closed":
            log.warning("KV connection to %s lost: %s", peer.address, reason)
        peer.queue.put(None)
        wire.shutdown(peer.sock)
        self._teardown_data_plane(peer)  # ends data-plane ops still waiting for the peer...
        with self._lock:
            peer.inflight.clear()  # ...before their buffers may be reused

    def _fail(self, rec: _Outgoing, reason: str) -> None:
        """Caller holds the lock."""
        rec.status, rec.reason = S.FAILED, reason
        self._stats["transfers_failed"] += 1
        self._cond.notify_all()

    def _write_loop(self, peer: _Peer) -> None:
        try:
            while (item := peer.queue.get()) is not None:
                kind, tid, header, staged = item
                with self._lock:
                    rec = self._transfers.get(tid)
                    dropped = kind != "abort" and (rec is None or rec.status == S.FAILED)
                if dropped:
                    continue
                if kind == "layer":
                    nbytes = self._transmit(peer, header, staged)
                    with self._lock:
                        self._stats["layers_sent"] += 1
                        self._stats["bytes_sent"] += nbytes
                else:
                    with peer.write_lock:
                        wire.send_frame(peer.sock, header)
        except Exception as e:
            self._peer_failed(peer, f"send failed: {type(e).__name__}: {e}")
        finally:
            self._thread_done(peer)

    def _read_loop(self, peer: _Peer) -> None:
        try:
            while True:
                msg = wire.recv_frame(peer.sock)
                op, tid = msg.get("op"), msg.get("tid")
                with self._lock:
                    rec = self._transfers.get(tid)
                    if op in ("ack", "nack"):
                        pending = peer.inflight.get((tid, msg["layer"]))
                        if pending:  # acks come in sending order: the oldest message of that layer
                            pending.pop(0)
                            if not pending:
                                del peer.inflight[(tid, msg["layer"])]
                    if op == "ack":
                        self._stats["layers_acked"] += 1
                        if rec is not None:
                            rec.layers_acked += 1
                    elif op == "nack":
                        if rec is not None and not rec.status.terminal:
                            self._fail(rec, f"receiver {peer.address} discarded layer {msg['layer']}: {msg['reason']}")
                    elif op == "finish_ack":
                        if rec is not None and not rec.status.terminal:
                            if msg["status"] == S.DONE and rec.layers_acked == rec.layers_queued:
                                rec.status = S.DONE
                                self._stats["transfers_done"] += 1
                                self._cond.notify_all()
                            else:
                                self._fail(rec, f"receiver {peer.address}: {msg['reason'] or 'layers missing'}")
                    else:
                        raise ConnectionError(f"unknown message {op!r}")
        except Exception as e:
            self._peer_failed(peer, f"{type(e).__name__}: {e}")
        finally:
            self._thread_done(peer)

    def _thread_done(self, peer: _Peer) -> None:
        """The socket is closed by whichever of the peer's two threads ends last, so no
        thread can ever use a file descriptor number that was closed and reused."""
        with self._lock:
            peer.threads_running -= 1
            last = peer.threads_running == 0
        if last:
            self._peer_failed(peer, "connection closed")
            peer.sock.close()

    # ---- data plane hooks (TCP: bytes follow the header through pinned host memory)

    def _check_data_plane(self) -> None:
        pass

    def _hello_extras(self) -> dict[str, Any]:
        return {}

    def _connect_data_plane(self, peer: _Peer, reply: dict[str, Any]) -> None:
        pass

    def _teardown_data_plane(self, peer: _Peer) -> None:
        pass

    def _gather(self, layer: int, src_ids: torch.Tensor) -> torch.Tensor:
        cache = self.kv_caches[layer]  # [2, num_blocks, bs, kvh, d]
        if cache.is_cuda:
            # From pinned memory the index copy is truly asynchronous. From pageable memory
            # it would block this thread until the stream drained -- in a prefill that is
            # until the layer just enqueued has finished computing.
            src_ids = src_ids.pin_memory()
        return cache.index_select(1, src_ids.to(cache.device, non_blocking=True))  # [2, n, bs, kvh, d], contiguous

    def _stage(self, layer: int, src_ids: torch.Tensor) -> _Staged:
        buf = self._gather(layer, src_ids)
        if not buf.is_cuda:
            return _Staged(buf)
        host = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
        host.copy_(buf, non_blocking=True)  # ordered after the gather on the caller's stream
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(buf.device))
        return _Staged(host, ready)

    def _transmit(self, peer: _Peer, header: dict[str, Any], staged: _Staged) -> int:
        if staged.ready is not None:
            staged.ready.synchronize()
        with peer.write_lock:
            return wire.send_frame(peer.sock, header, wire.tensor_bytes(staged.tensor))

