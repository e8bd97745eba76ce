"""TCP backend: control and data over one socket per (sender, receiver) pair.

The classes here also carry the control plane that every backend shares (handshake,
headers, acks, failure handling); a backend with another data plane (nccl.py) overrides
the `_data plane hooks_` only. Framing and message list: wire.py.

Receiver lifecycle (decode side), one record per transfer_id:

    expect() ──► WAITING ──first layer header──► TRANSFERRING ──last expected layer
                    │                                 │          written──► DONE
                    └──── abort() / sender abort / bad message / sender disconnect ──► FAILED
    release() forgets the record (any state). Data for an id with no record, or whose
    record is FAILED, is read off the wire and dropped, and the sender gets a nack.

  Threads: one accept loop; one loop per accepted connection that reads frames in order,
  writes each layer into the cache and answers ack / nack / finish_ack. A layer's bytes
  are read in full into a staging buffer first; the cache write and the DONE transition
  happen under the receiver lock, so after abort() returns nothing more is written, and
  DONE is never visible before the last byte landed.

Sender lifecycle (prefill side), one record per transfer_id:

    send_layer() ─► BOOTSTRAPPING (connecting) ─► TRANSFERRING (layers queued) ─finish()─►
        finish_ack(DONE) from the receiver ─► DONE
    nack / finish_ack(FAILED) / connection lost / abort() / unreachable peer ─► FAILED

  Per peer address: one connection, opened on first contact and cached; a writer thread
  drains the peer's FIFO queue (so a connection's layers go out in call order, transfers
  interleaved) and a reader thread applies acks. send_layer gathers the blocks before it
  returns (on CUDA: stream-ordered, into pinned memory), so the caller may reuse its
  source blocks once later work on the same stream follows. A transfer whose record is
  FAILED (aborted, rejected) has its queued layers dropped unsent.

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
from kv_transfer.base import (CacheLayout, KVReceiver, KVSender, LayoutMismatch, TransferError,
                              TransferStatus, dtype_from_name, register_backend)

log = logging.getLogger(__name__)
S = TransferStatus

HANDSHAKE_TIMEOUT_S = 30.0


def _check_blocks(kv_caches: Sequence[torch.Tensor], layer: int, blocks: list[int], name: str) -> None:
    if not 0 <= layer < len(kv_caches):
        raise ValueError(f"layer: {layer} out of range [0, {len(kv_caches)})")
    if not blocks:
        raise ValueError(f"{name}: empty block list for layer {layer}")
    nb = kv_caches[layer].shape[1]
    bad = [b for b in blocks if not (isinstance(b, int) and 0 <= b < nb)]
    if bad:
        raise ValueError(f"{name}: layer {layer} block ids {bad[:8]} out of range [0, {nb})")


def _wait_status(cond: threading.Condition, records: dict, transfer_id: str, timeout: float) -> S:
    with cond:
        def current() -> S:
            rec = records.get(transfer_id)
            if rec is None:
                raise KeyError(f"transfer_id: unknown {transfer_id!r}")
            return rec.status
        cond.wait_for(lambda: current().terminal, timeout=max(0.0, timeout))
        return current()


# --------------------------------------------------------------------------- receiver


@dataclass(eq=False)
class _Conn:
    """One accepted sender connection."""
    sock: socket.socket
    peer: str
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None
    data: Any = None  # the data plane's per-connection state (nccl: the process group)


@dataclass(eq=False)
class _Incoming:
    dst_ids: dict[int, list[int]]  # layer -> destination block ids, as expect() gave them
    dst: dict[int, torch.Tensor]  # the same as long tensors on the cache device
    status: S = S.WAITING
    written: set[int] = field(default_factory=set)
    conns: set[_Conn] = field(default_factory=set)  # connections that sent data for it
    reason: str = ""


class TcpReceiver(KVReceiver):
    data_plane = "tcp"

    def __init__(self, layout: CacheLayout, kv_caches: Sequence[torch.Tensor],
                 host: str = "127.0.0.1", port: int = 0):
        layout.check_caches(kv_caches)
        self.layout = layout
        self.kv_caches = list(kv_caches)
        self.device = self.kv_caches[0].device
        self._check_data_plane()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._transfers: dict[str, _Incoming] = {}
        self._conns: set[_Conn] = set()
        self._stats: Counter[str] = Counter()
        self._closed = False
        # Cache writes from the network go on their own stream; see _write.
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(0.2)  # so the accept loop sees close()
        self._address = f"{host}:{self._listener.getsockname()[1]}"
        self._handlers = {"layer": self._on_layer, "finish": self._on_finish, "abort": self._on_abort}
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name=f"kv-recv-accept-{self._address}")
        self._accept_thread.start()

    # ---- public API

    @property
    def address(self) -> str:
        return self._address

    def expect(self, transfer_id: str, layers: dict[int, list[int]]) -> None:
        if not layers:
            raise ValueError("layers: empty; a transfer must name at least one layer")
        for layer, blocks in layers.items():
            _check_blocks(self.kv_caches, layer, blocks, "layers")
            if len(set(blocks)) != len(blocks):
                raise ValueError(f"layers: layer {layer} lists a destination block twice")
        dst = {layer: torch.tensor(b, dtype=torch.long, device=self.device) for layer, b in layers.items()}
        with self._lock:
            if transfer_id in self._transfers:
                raise ValueError(f"transfer_id: {transfer_id!r} is already expected; release() it first")
            self._transfers[transfer_id] = _Incoming({l: list(b) for l, b in layers.items()}, dst)

    def poll(self, transfer_id: str) -> S:
        with self._lock:
            rec = self._transfers.get(transfer_id)
            if rec is None:
                raise KeyError(f"transfer_id: unknown {transfer_id!r}")
            return rec.status

    def reason(self, transfer_id: str) -> str:
        """Why a transfer FAILED ('' otherwise)."""
        with self._lock:
            rec = self._transfers.get(transfer_id)
            return "" if rec is None else rec.reason

    def wait(self, transfer_id: str, timeout: float) -> S:
        return _wait_status(self._cond, self._transfers, transfer_id, timeout)

    def abort(self, transfer_id: str) -> None:
        """FAILED unless already DONE; unknown ids are ignored. Holding the lock that every
        cache write holds, so no write of this transfer happens after this returns."""
        with self._lock:
            rec = self._transfers.get(transfer_id)
            if rec is not None and not rec.status.terminal:
                self._fail(rec, "aborted by the receiver")

    def release(self, transfer_id: str) -> None:
        with self._lock:
            self._transfers.pop(transfer_id, None)

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict.fromkeys(("bytes_received", "layers_received", "layers_discarded",
                                 "transfers_done", "transfers_failed", "connections_accepted",
                                 "connections_refused"), 0)
            out.update(self._stats)
            out["connections"] = len(self._conns)
            return out

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
        self._listener.close()
        self._accept_thread.join(timeout=5)
        for conn in conns:
            _shutdown(conn.sock)
        for conn in conns:
            if conn.thread is not None:
                conn.thread.join(timeout=5)
        with self._lock:
            for rec in self._transfers.values():
                if not rec.status.terminal:
                    self._fail(rec, "receiver closed")

    # ---- connection handling

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, (host, port, *_) = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # listener closed
            wire.tune_socket(sock)
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            conn = _Conn(sock, f"{host}:{port}")
            conn.thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                           name=f"kv-recv-{conn.peer}")
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._conns.add(conn)
                self._stats["connections_accepted"] += 1
            conn.thread.start()

    def _serve(self, conn: _Conn) -> None:
        reason = "closed"
        try:
            if self._handshake(conn):
                conn.sock.settimeout(None)
                while True:
                    header, payload_len = wire.recv_header(conn.sock)
                    handler = self._handlers.get(header.get("op"))
                    if handler is None:
                        raise ConnectionError(f"unknown message {header.get('op')!r}")
                    handler(conn, header, payload_len)
        except Exception as e:  # the peer, the wire or the data plane broke: fail its transfers
            reason = f"{type(e).__name__}: {e}"
            if not self._closed:
                log.info("KV sender %s disconnected: %s", conn.peer, reason)
        finally:
            self._drop(conn, reason)

    def _handshake(self, conn: _Conn) -> bool:
        hello = wire.recv_frame(conn.sock)
        try:
            if hello.get("op") != "hello":
                raise ValueError(f"expected hello, got {hello.get('op')!r}")
            if hello.get("proto") != wire.PROTO_VERSION:
                raise ValueError(f"protocol version {hello.get('proto')} (want {wire.PROTO_VERSION})")
            self.layout.check_compatible(CacheLayout.from_dict(hello["layout"]))
            if hello.get("data_plane") != self.data_plane:
                raise ValueError(f"data plane: sender uses {hello.get('data_plane')!r}, "
                                 f"this receiver {self.data_plane!r}")
        except (ValueError, KeyError, TypeError) as e:
            log.warning("refusing KV sender %s: %s", conn.peer, e)
            with self._lock:
                self._stats["connections_refused"] += 1
            wire.send_frame(conn.sock, {"op": "hello_err", "layout": self.layout.to_dict(), "reason": str(e)})
            return False
        extras = self._accept_data_plane(conn, hello)
        wire.send_frame(conn.sock, {"op": "hello_ok", "layout": self.layout.to_dict(), **extras})
        self._connect_data_plane(conn)
        return True

    def _drop(self, conn: _Conn, reason: str) -> None:
        with self._lock:
            self._conns.discard(conn)
            for rec in self._transfers.values():
                if conn in rec.conns and not rec.status.terminal:
                    self._fail(rec, f"sender {conn.peer} disconnected mid-transfer ({reason})")
        _shutdown(conn.sock)
        conn.sock.close()
        self._teardown_data_plane(conn)

    def _reply(self, conn: _Conn, header: dict[str, Any]) -> None:
        with conn.write_lock:
            wire.send_frame(conn.sock, header)

    def _fail(self, rec: _Incoming, reason: str) -> None:
        """Caller holds the lock."""
        rec.status, rec.reason = S.FAILED, reason
        self._stats["transfers_failed"] += 1
        self._cond.notify_all()

    # ---- messages

    def _layer_problem(self, rec: _Incoming | None, tid: str, header: dict[str, Any], payload_len: int) -> str | None:
        if rec is None:
            return f"unknown transfer {tid!r} (never expected, or released)"
        if rec.status == S.FAILED:
            return f"transfer {tid!r} failed: {rec.reason}"
        layer = header["layer"]
        if rec.status == S.DONE:
            return f"transfer {tid!r} is already complete (layer {layer} again)"
        if layer not in rec.dst_ids:
            return f"layer {layer} not expected (expected {sorted(rec.dst_ids)})"
        if layer in rec.written:
            return f"layer {layer} sent twice"
        if header["dst"] != rec.dst_ids[layer]:
            return f"layer {layer}: destination blocks differ from expect()"
        want = [2, len(rec.dst_ids[layer]), self.layout.block_size, self.layout.num_kv_heads, self.layout.head_dim]
        if header["shape"] != want or header["dtype"] != self.layout.dtype:
            return f"layer {layer}: got {header['dtype']}{header['shape']}, want {self.layout.dtype}{want}"
        return self._payload_problem(header, payload_len)

    def _on_layer(self, conn: _Conn, header: dict[str, Any], payload_len: int) -> None:
        tid, layer = header["tid"], header["layer"]
        with self._lock:
            rec = self._transfers.get(tid)
            problem = self._layer_problem(rec, tid, header, payload_len)
            if rec is not None:
                rec.conns.add(conn)
                if problem is not None and not rec.status.terminal:
                    self._fail(rec, problem)
                elif rec.status == S.WAITING:
                    rec.status = S.TRANSFERRING
                    self._cond.notify_all()
        if problem is None:
            data = self._receive_payload(conn, header, payload_len)  # [2, n, bs, kvh, d]
            with self._lock:
                if self._transfers.get(tid) is not rec or rec.status.terminal:
                    problem = f"transfer {tid!r} was aborted or released while layer {layer} was in flight"
                else:
                    self._write(layer, rec.dst[layer], data)
                    rec.written.add(layer)
                    self._stats["layers_received"] += 1
                    self._stats["bytes_received"] += data.numel() * data.element_size()
                    if len(rec.written) == len(rec.dst):
                        rec.status = S.DONE
                        self._stats["transfers_done"] += 1
                    self._cond.notify_all()
        else:
            self._discard_payload(conn, header, payload_len)
            with self._lock:
                self._stats["layers_discarded"] += 1
        if problem is None:
            self._reply(conn, {"op": "ack", "tid": tid, "layer": layer})
        else:
            log.info("KV layer from %s discarded: %s", conn.peer, problem)
            self._reply(conn, {"op": "nack", "tid": tid, "layer": layer, "reason": problem})

    def _on_finish(self, conn: _Conn, header: dict[str, Any], payload_len: int) -> None:
        tid, num_layers = header["tid"], header["num_layers"]
        with self._lock:
            rec = self._transfers.get(tid)
            if rec is None:
                reason = f"unknown transfer {tid!r} (never expected, or released)"
            elif rec.status == S.FAILED:
                reason = rec.reason
            elif rec.status != S.DONE or num_layers != len(rec.dst_ids):
                reason = (f"sender finished after {num_layers} layers; expected {len(rec.dst_ids)}, "
                          f"{len(rec.written)} written")
                self._fail(rec, reason)
            else:
                reason = ""
        status = S.FAILED if reason else S.DONE
        self._reply(conn, {"op": "finish_ack", "tid": tid, "status": int(status), "reason": reason})

    def _on_abort(self, conn: _Conn, header: dict[str, Any], payload_len: int) -> None:
        with self._lock:
            rec = self._transfers.get(header["tid"])
            if rec is not None and not rec.status.terminal:
                self._fail(rec, f"aborted by the sender {conn.peer}")

    def _write(self, layer: int, dst: torch.Tensor, data: torch.Tensor) -> None:
        """Caller holds the lock. On CUDA the copy runs on the receiver's own stream and is
        waited for here, so DONE (set by the caller) implies the bytes are in the cache."""
        cache = self.kv_caches[layer]
        if self._stream is None:
            cache.index_copy_(1, dst, data)
            return
        with torch.cuda.stream(self._stream):
            cache.index_copy_(1, dst, data.to(self.device, non_blocking=True))
        self._stream.synchronize()

    # ---- data plane hooks (TCP: the payload follows the header on the socket)

    def _check_data_plane(self) -> None:
        pass

    def _accept_data_plane(self, conn: _Conn, hello: dict[str, Any]) -> dict[str, Any]:
        return {}

    def _connect_data_plane(self, conn: _Conn) -> None:
        pass

    def _teardown_data_plane(self, conn: _Conn) -> None:
        pass

    def _payload_problem(self, header: dict[str, Any], payload_len: int) -> str | None:
        dtype = dtype_from_name(header["dtype"])
        want = dtype.itemsize
        for n in header["shape"]:
            want *= n
        return None if payload_len == want else f"payload of {payload_len} bytes, want {want}"

    def _receive_payload(self, conn: _Conn, header: dict[str, Any], payload_len: int) -> torch.Tensor:
        buf = wire.recv_payload(conn.sock, payload_len, pin_memory=self.device.type == "cuda")
        return buf.view(dtype_from_name(header["dtype"])).view(header["shape"])

    def _discard_payload(self, conn: _Conn, header: dict[str, Any], payload_len: int) -> None:
        wire.discard(conn.sock, payload_len)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# --------------------------------------------------------------------------- sender


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
    inflight: dict[tuple[str, int], Any] = field(default_factory=dict)  # kept alive until acked


@dataclass(eq=False)
class _Outgoing:
    address: str
    status: S = S.BOOTSTRAPPING
    peer: _Peer | None = None
    layers_queued: set[int] = field(default_factory=set)
    layers_acked: set[int] = field(default_factory=set)
    finished: bool = False
    reason: str = ""


@dataclass
class _Staged:
    tensor: torch.Tensor  # [2, n, bs, kvh, d], contiguous
    ready: Any = None  # torch.cuda.Event recorded after the gather/copy; None on CPU


class TcpSender(KVSender):
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
        _check_blocks(self.kv_caches, layer, src_blocks, "src_blocks")
        if len(dst_blocks) != len(src_blocks):
            raise ValueError(f"dst_blocks: {len(dst_blocks)} ids for {len(src_blocks)} src_blocks")
        with self._lock:
            rec = self._transfers.setdefault(transfer_id, _Outgoing(address))
            if rec.address != address:
                raise ValueError(f"transfer_id: {transfer_id!r} goes to {rec.address}, not {address}")
            if rec.finished:
                raise ValueError(f"transfer_id: {transfer_id!r} already finished")
            if layer in rec.layers_queued:
                raise ValueError(f"layer: {layer} already sent for {transfer_id!r}")
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
        staged = self._stage(layer, src_blocks)
        header = {"op": "layer", "tid": transfer_id, "layer": layer, "dst": list(dst_blocks),
                  "shape": list(staged.tensor.shape), "dtype": self.layout.dtype}
        with self._lock:
            if rec.status.terminal:
                return
            if not peer.alive:
                self._fail(rec, f"connection to {address} lost")
                return
            rec.peer = peer
            rec.layers_queued.add(layer)
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
            if rec.peer is None or num_layers != len(rec.layers_queued):
                raise ValueError(f"num_layers: {num_layers}, but {len(rec.layers_queued)} layers were sent")
            rec.finished = True
            rec.peer.queue.put(("finish", transfer_id,
                                {"op": "finish", "tid": transfer_id, "num_layers": num_layers}, None))

    def poll(self, transfer_id: str) -> S:
        with self._lock:
            rec = self._transfers.get(transfer_id)
            if rec is None:
                raise KeyError(f"transfer_id: unknown {transfer_id!r}")
            return rec.status

    def reason(self, transfer_id: str) -> str:
        with self._lock:
            rec = self._transfers.get(transfer_id)
            return "" if rec is None else rec.reason

    def wait(self, transfer_id: str, timeout: float) -> S:
        return _wait_status(self._cond, self._transfers, transfer_id, timeout)

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
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
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
            peer.inflight.clear()
        if reason != "sender closed":
            log.warning("KV connection to %s lost: %s", peer.address, reason)
        peer.queue.put(None)
        _shutdown(peer.sock)
        self._teardown_data_plane(peer)

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
                        peer.inflight.pop((tid, msg["layer"]), None)
                    if op == "ack":
                        self._stats["layers_acked"] += 1
                        if rec is not None:
                            rec.layers_acked.add(msg["layer"])
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

    def _gather(self, layer: int, src_blocks: list[int]) -> torch.Tensor:
        cache = self.kv_caches[layer]  # [2, num_blocks, bs, kvh, d]
        idx = torch.tensor(src_blocks, dtype=torch.long, device=cache.device)
        return cache.index_select(1, idx)  # [2, n, bs, kvh, d], a new contiguous tensor

    def _stage(self, layer: int, src_blocks: list[int]) -> _Staged:
        buf = self._gather(layer, src_blocks)
        if not buf.is_cuda:
            return _Staged(buf)
        host = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
        host.copy_(buf, non_blocking=True)  # ordered after the gather on the caller's stream
        ready = torch.cuda.Event()
        ready.record()
        return _Staged(host, ready)

    def _transmit(self, peer: _Peer, header: dict[str, Any], staged: _Staged) -> int:
        if staged.ready is not None:
            staged.ready.synchronize()
        with peer.write_lock:
            return wire.send_frame(peer.sock, header, wire.tensor_bytes(staged.tensor))


register_backend("tcp")((TcpSender, TcpReceiver))
