"""Receiver side (decode) of the control plane every backend shares, with the TCP data
plane as the default hooks. The TCP backend as a whole: tcp.py.

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

On CUDA caches the TCP data plane moves bytes through pinned host memory on both sides.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from kv_transfer import wire
from kv_transfer.base import (CacheLayout, KVReceiver, TransferStatus, check_blocks, dtype_from_name,
                              TransferRecords)

log = logging.getLogger(__name__)
S = TransferStatus


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
    written: set[int] = field(default_factory=set)  # layers whose every expected block arrived
    pending: dict[int, set[int]] = field(default_factory=dict)  # layer -> blocks not yet written
    messages: int = 0  # layer messages written (a layer may come in several, one per prefill chunk)
    conns: set[_Conn] = field(default_factory=set)  # connections that sent data for it
    reason: str = ""


class TcpReceiver(TransferRecords, KVReceiver):
    data_plane = "tcp"

    def __init__(self, layout: CacheLayout, kv_caches: Sequence[torch.Tensor],
                 host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None):
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
        # What senders dial: the listening host, or the name peers know us by (0.0.0.0 is no address)
        self._address = f"{advertise_host or host}:{self._listener.getsockname()[1]}"
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
        dst = {}
        for layer, blocks in layers.items():
            ids = check_blocks(self.kv_caches, layer, blocks, "layers")
            if len(set(blocks)) != len(blocks):
                raise ValueError(f"layers: layer {layer} lists a destination block twice")
            dst[layer] = ids.to(self.device)
        with self._lock:
            if transfer_id in self._transfers:
                raise ValueError(f"transfer_id: {transfer_id!r} is already expected; release() it first")
            self._transfers[transfer_id] = _Incoming({l: list(b) for l, b in layers.items()}, dst,
                                                     pending={l: set(b) for l, b in layers.items()})

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
        wire.shutdown(self._listener)  # wakes accept() at once on Linux; the timeout is the backstop
        self._listener.close()
        self._accept_thread.join(timeout=5)
        for conn in conns:
            wire.shutdown(conn.sock)
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
            sock.settimeout(wire.HANDSHAKE_TIMEOUT_S)
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
                    header, payload_len = self._next_header(conn)
                    handler = self._handlers.get(header.get("op"))
                    if handler is None:
                        raise ConnectionError(f"unknown message {header.get('op')!r}")
                    handler(conn, header, payload_len)
        except wire.PeerClosed as e:
            reason = f"connection closed ({e})"
        except Exception as e:  # the wire or the data plane broke: fail its transfers
            reason = f"{type(e).__name__}: {e}"
            if not self._closed:
                log.info("KV sender %s disconnected: %s", conn.peer, reason)
        finally:
            self._drop(conn, reason)

    def _next_header(self, conn: _Conn) -> tuple[dict[str, Any], int]:
        """The next frame's header (a data plane may have read it ahead)."""
        return wire.recv_header(conn.sock)

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
        wire.shutdown(conn.sock)
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
        dst = header["dst"]
        if len(set(dst)) != len(dst) or not set(dst) <= rec.pending[layer]:
            return f"layer {layer}: destination blocks not expected by expect(), or already written"
        want = [2, len(dst), self.layout.block_size, self.layout.num_kv_heads, self.layout.head_dim]
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
                    dst = header["dst"]
                    whole = len(dst) == len(rec.dst_ids[layer])
                    index = rec.dst[layer] if whole else torch.tensor(dst, dtype=torch.long, device=self.device)
                    self._write(layer, index, data)
                    rec.pending[layer] -= set(dst)
                    rec.messages += 1
                    if not rec.pending[layer]:
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
            elif rec.status != S.DONE or num_layers != rec.messages:
                reason = (f"sender finished after {num_layers} layer messages; {rec.messages} written, "
                          f"{len(rec.written)} of {len(rec.dst_ids)} layers complete")
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

