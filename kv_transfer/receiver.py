"""Receiver side (decode) of the control plane every backend shares. Its data side
(direct runs' destinations checked, the cache writes, the TCP data plane as the default
hooks): ReceiverDataPlane in data_plane.py. The TCP backend as a whole: tcp.py. The
per-transfer and per-connection bookkeeping types (_Incoming, _Conn, _Message, _InPart,
...): incoming.py.

Receiver lifecycle (decode side), one record per transfer_id:

    expect() ──► WAITING ──first part header──► TRANSFERRING ──last expected layer
                    │                                 │          written──► DONE
                    └──── abort() / sender abort / bad part / sender disconnect ──► FAILED
    release() forgets the record (any state). A part for an id with no record, or whose
    record is FAILED, is received and dropped, and the sender gets it listed as failed.

  Threads: one accept loop; per accepted connection a *reader* and a *completer*, with a
  bounded FIFO of messages between them (`max_queued_messages`):
    reader     reads frames in order. A parts message (wire.py): mark its transfers
               TRANSFERRING, read the block ids, *claim* the parts' direct runs (below),
               then start its data moving -- TCP: read each part's bytes, staged blocks
               into a staging buffer and claimed runs straight into the cache; NCCL: post
               one recv per region, likewise -- and queue it. finish is queued behind it;
               abort applies at once.
    completer  takes messages in order; waits for each part's data in turn, settles its
               claim and writes its staged blocks into the cache (checked under the
               receiver lock), so part j is written while part j+1, and the next
               messages queued behind, are still arriving; then sends one ack for the
               message, listing the parts it discarded. Answers finish (DONE or FAILED)
               after every earlier message.
  A layer may arrive in several parts (chunked prefill), in one message or several.

  Direct runs land in the cache before the completer has looked at the part, so the
  reader checks first, under the lock: a part's runs go into the cache only if its
  transfer is live (WAITING or TRANSFERRING) and the whole part fits its expected,
  unwritten blocks (the completer's own check), and each run's destination ids are
  consecutive (else the stream is broken). Such a part is *claimed*: it counts in its
  transfer's `direct_inflight` until the completer has seen its data complete, or the
  connection was torn down (which ends its posted recvs). Runs that may not land are
  received into scratch and dropped, keeping the stream in step. The rule that makes
  freeing blocks safe: abort() and release() wait until the transfer's direct_inflight
  is 0 -- no claim can start once it is FAILED or forgotten -- and a transfer turns DONE
  only with nothing in flight. The wait is bounded: after `abort_wait` seconds the
  connections feeding the transfer are torn down (failing their other transfers too;
  the pair's data stream could not be trusted after abandoning a recv), which ends
  the recvs.

  Cache writes of staged blocks: on CUDA they are enqueued on the receiver's own stream
  and not waited for one by one. Two transitions wait for them (under the lock, where
  every write is enqueued): DONE, so DONE is never visible before the last byte landed;
  and FAILED (abort included), so after abort() returns no byte of the transfer lands
  any more. An ack means "written, or enqueued to be written unless the transfer fails".
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections import Counter
from typing import Any, Sequence

import torch

from kv_transfer import wire
from kv_transfer.base import CacheLayout, KVReceiver, TransferStatus, check_blocks, raw, TransferRecords
from kv_transfer.data_plane import ReceiverDataPlane
from kv_transfer.incoming import _Arrived, _Conn, _Finish, _Incoming, _InPart, _Message

log = logging.getLogger(__name__)
S = TransferStatus


class TcpReceiver(TransferRecords, ReceiverDataPlane, KVReceiver):
    data_plane = "tcp"
    max_queued_messages = 2  # per connection: messages read ahead of the one being written
    MAX_CHECKED_RUNS = 64  # (list, runs) pairs whose destination ids are known consecutive
    abort_wait = 2.0  # s: abort()/release() wait this long for direct recvs before tearing their connection down
    teardown_wait = 30.0  # s: ...and this long more once it is torn down (a backstop; see _await_direct)

    def __init__(self, layout: CacheLayout, kv_caches: Sequence[torch.Tensor],
                 host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None):
        layout.check_caches(kv_caches)
        self.layout = layout
        self.kv_caches = list(kv_caches)
        self._raw = [raw(c) for c in self.kv_caches]  # the caches as bits: what staged writes copy into (base.raw)
        self._kv = [(c[0], c[1]) for c in self.kv_caches]  # K and V of each layer, [num_blocks, bs, kvh, d]
        self.device = self.kv_caches[0].device
        self._block_shape = (layout.block_size, layout.num_kv_heads, layout.head_dim)
        self._block_bytes = 2 * self.kv_caches[0][0, 0].nbytes  # K and V of one block of one layer
        self._check_data_plane()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._transfers: dict[str, _Incoming] = {}
        self._checked_runs: dict[tuple[bytes, wire.Runs], list[int]] = {}  # see _run_first
        self._conns: set[_Conn] = set()
        self._stats: Counter[str] = Counter()
        self._closed = False
        # Cache writes (and their indices) go on their own stream; see _write.
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(0.2)  # so the accept loop sees close()
        # What senders dial: the listening host, or the name peers know us by (0.0.0.0 is no address)
        self._address = f"{advertise_host or host}:{self._listener.getsockname()[1]}"
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name=f"kv-recv-accept-{self._address}")
        self._accept_thread.start()

    # ---- public API

    @property
    def address(self) -> str:
        return self._address

    def expect(self, transfer_id: str, layers: dict[int, list[int]]) -> None:
        """Each distinct list is checked and converted once: layers of one group (one
        pool) usually share a list, so a 48-layer transfer converts about two."""
        if not layers:
            raise ValueError("layers: empty; a transfer must name at least one layer")
        dst_raw, dst = {}, {}
        done: list[tuple[int, list[int], bytes, torch.Tensor]] = []  # (pool size, list, raw, index)
        for layer, blocks in layers.items():
            nb = self.kv_caches[layer].shape[1] if 0 <= layer < len(self.kv_caches) else -1
            same = next((d for d in done if d[0] == nb and type(blocks) is list and d[1] == blocks), None)
            if same is None:
                ids = check_blocks(self.kv_caches, layer, blocks, "layers")
                if len(set(blocks)) != len(blocks):
                    raise ValueError(f"layers: layer {layer} lists a destination block twice")
                same = (nb, list(blocks), ids.to(torch.int32).numpy().tobytes(), self._index(ids))
                done.append(same)
            dst_raw[layer], dst[layer] = same[2], same[3]
        with self._lock:
            if transfer_id in self._transfers:
                raise ValueError(f"transfer_id: {transfer_id!r} is already expected; release() it first")
            self._transfers[transfer_id] = _Incoming(dst_raw, dst)

    def abort(self, transfer_id: str) -> None:
        """FAILED unless already DONE; unknown ids are ignored. Holding the lock that every
        cache write holds, and waiting for the writes already enqueued and the direct
        recvs already landing (see the module docstring), so no byte of this transfer
        lands after this returns."""
        with self._lock:
            rec = self._transfers.get(transfer_id)
            if rec is None:
                return
            if not rec.status.terminal:
                self._fail(rec, "aborted by the receiver")
            self._await_direct(transfer_id, rec)

    def release(self, transfer_id: str) -> None:
        """Forget the transfer; returns once no recv lands in its blocks any more."""
        with self._lock:
            rec = self._transfers.pop(transfer_id, None)
            if rec is not None:
                self._await_direct(transfer_id, rec)

    def stats(self) -> dict[str, int]:
        """layers_*: parts (a layer's share of a message); messages_received: parts messages;
        blocks_direct / blocks_staged: blocks of the parts written, by path (a direct block
        was received in place, or on CUDA over TCP copied in from host memory)."""
        with self._lock:
            out = dict.fromkeys(("bytes_received", "layers_received", "layers_discarded", "messages_received",
                                 "blocks_direct", "blocks_staged", "transfers_done", "transfers_failed",
                                 "connections_accepted", "connections_refused"), 0)
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
            conn = _Conn(sock, f"{host}:{port}", queue.Queue(maxsize=self.max_queued_messages))
            conn.thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                           name=f"kv-recv-{conn.peer}")
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._conns.add(conn)
                self._stats["connections_accepted"] += 1
            conn.thread.start()

    def _use_device(self) -> None:
        """Our threads start here: CUDA calls that use the current device (pinned memory
        among them) must not create a context on another GPU."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _serve(self, conn: _Conn) -> None:
        """The connection's reader (see the module docstring)."""
        self._use_device()
        reason = "closed"
        try:
            if self._handshake(conn):
                conn.sock.settimeout(None)
                conn.completer = threading.Thread(target=self._complete_loop, args=(conn,), daemon=True,
                                                  name=f"kv-recv-write-{conn.peer}")
                conn.completer.start()
                while True:
                    op, header, payload_len = conn.reader.header()
                    if op == "parts":
                        conn.arrivals.put(self._on_parts(conn, header, payload_len))  # blocks while the queue is full
                        continue
                    conn.reader.discard(payload_len)
                    if op == "finish":
                        conn.arrivals.put(_Finish(header["tid"], header["num_layers"]))
                    elif op == "abort":
                        self._on_abort(conn, header)
                    else:
                        raise ConnectionError(f"unknown message {op!r}")
        except wire.PeerClosed as e:
            reason = f"connection closed ({e})"
        except Exception as e:  # the wire or the data plane broke: fail its transfers
            reason = f"{type(e).__name__}: {e}"
            if not self._closed:
                log.info("KV sender %s disconnected: %s", conn.peer, reason)
        finally:
            self._drop(conn, reason)

    def _handshake(self, conn: _Conn) -> bool:
        op, hello = conn.reader.frame()
        try:
            if op != "hello":
                raise ValueError(f"expected hello, got {op!r}")
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
        """The reader ends the connection: stop the completer (tearing the data plane
        down first ends any wait of it on a dead peer, and any recv still posted), then
        settle the claims left and fail the transfers it fed."""
        wire.shutdown(conn.sock)
        self._teardown_data_plane(conn)
        if conn.completer is not None:
            conn.arrivals.put(None)
            conn.completer.join()
        with self._lock:
            for part in list(conn.claims):
                self._settle(conn, part)
            self._conns.discard(conn)
            for rec in self._transfers.values():
                if conn in rec.conns and not rec.status.terminal:
                    self._fail(rec, f"sender {conn.peer} disconnected mid-transfer ({reason})")
        conn.sock.close()

    def _reply(self, conn: _Conn, header: dict[str, Any] | bytes) -> None:
        with conn.write_lock:
            wire.send_frame(conn.sock, header)

    def _fail(self, rec: _Incoming, reason: str) -> None:
        """Caller holds the lock. Waits for the transfer's enqueued cache writes: FAILED
        means no more of its bytes land."""
        self._sync(rec)
        rec.status, rec.reason = S.FAILED, reason
        self._stats["transfers_failed"] += 1
        self._cond.notify_all()

    def _await_direct(self, tid: str, rec: _Incoming) -> None:
        """Caller holds the lock; rec is FAILED or forgotten, so no new claim on it can
        start. Wait until no claimed part of it is landing; after abort_wait, tear down
        the connections feeding it (their readers settle the claims once their data
        plane is down) and wait for that."""
        if self._cond.wait_for(lambda: rec.direct_inflight == 0, timeout=self.abort_wait):
            return
        log.warning("KV transfer %s: %d direct recvs still landing after %g s; dropping its connections",
                    tid, rec.direct_inflight, self.abort_wait)
        for conn in rec.conns:
            wire.shutdown(conn.sock)
        if not self._cond.wait_for(lambda: rec.direct_inflight == 0, timeout=self.teardown_wait):
            log.error("KV transfer %s: %d direct recvs still not settled after tearing down their connections",
                      tid, rec.direct_inflight)

    def _sync(self, rec: _Incoming) -> None:
        """Caller holds the lock."""
        if rec.unsynced:
            self._stream.synchronize()
            rec.unsynced = False

    # ---- the reader's side of a message

    def _on_parts(self, conn: _Conn, header: wire.Parts, payload_len: int) -> _Message:
        ids_bytes = wire.ID_BYTES * sum(header.dst_lens)
        if payload_len < ids_bytes:
            raise ConnectionError(f"parts message {header.seq}: payload of {payload_len} bytes cannot hold "
                                  "its block ids")
        dsts = conn.reader.block_ids(header.dst_lens)
        msg = _Message(header.seq, [_InPart(tid, layer, dsts[d], runs, self._run_first(dsts[d], runs, tid))
                                    for tid, layer, d, runs in header.parts])
        in_place = self._receives_in_place()
        with self._lock:
            for part in msg.parts:
                rec = self._transfers.get(part.tid)
                if rec is not None:
                    rec.conns.add(conn)
                    if rec.status == S.WAITING:
                        rec.status = S.TRANSFERRING  # nobody waits for this one: no notify
                if part.runs and in_place:
                    self._claim(conn, rec, part)
        msg.problem = self._take_data(conn, msg, payload_len - ids_bytes)
        conn.last_started = msg.seq
        return msg

    def _claim(self, conn: _Conn, rec: _Incoming | None, part: _InPart) -> None:
        """Caller holds the lock. May the part's runs land in the cache? Only if the part
        would pass the completer's check now, on a live transfer."""
        problem = self._part_problem(rec, part)
        if problem is not None:
            part.unclaimed = problem
            return
        part.claim = rec
        rec.direct_inflight += 1
        conn.claims.add(part)

    def _settle(self, conn: _Conn, part: _InPart) -> None:
        """Caller holds the lock: the part's runs have landed (or their recvs were ended)."""
        rec, part.claim = part.claim, None
        if rec is not None:
            conn.claims.discard(part)
            rec.direct_inflight -= 1
            if rec.direct_inflight == 0:  # what _await_direct waits for
                self._cond.notify_all()

    def _on_abort(self, conn: _Conn, header: dict[str, Any]) -> None:
        with self._lock:
            rec = self._transfers.get(header["tid"])
            if rec is not None and not rec.status.terminal:
                self._fail(rec, f"aborted by the sender {conn.peer}")

    # ---- the completer

    def _complete_loop(self, conn: _Conn) -> None:
        self._use_device()
        broken = False
        while (item := conn.arrivals.get()) is not None:
            if broken:
                continue  # the connection is going down; drain so the reader never blocks on a full queue
            try:
                if isinstance(item, _Message):
                    self._complete(conn, item)
                else:
                    self._on_finish(conn, item)
            except Exception as e:
                broken = True
                if not self._closed:
                    log.info("KV sender %s: %s: %s", conn.peer, type(e).__name__, e)
                wire.shutdown(conn.sock)  # the reader sees it and ends the connection

    def _complete(self, conn: _Conn, msg: _Message) -> None:
        failed = []
        for j, part in enumerate(msg.parts):
            data = None if msg.problem else self._await_data(conn, part)
            with self._lock:
                claimed = part.claim
                self._settle(conn, part)
                rec = self._transfers.get(part.tid)
                problem = msg.problem or part.unclaimed or self._part_problem(rec, part)
                if problem is None and claimed is not None and claimed is not rec:  # released, then expected anew
                    problem = f"transfer {part.tid!r} was released while its data arrived"
                if problem is None:
                    self._write_part(rec, part, data)
                else:
                    if rec is not None and not rec.status.terminal:
                        self._fail(rec, problem)
                    self._stats["layers_discarded"] += 1
                    failed.append((j, problem))
            part.data = data = None  # the staging buffer can go
            if problem is not None:
                log.info("KV layer from %s discarded: %s", conn.peer, problem)
        with self._lock:
            self._stats["messages_received"] += 1
        self._reply(conn, wire.pack_ack(msg.seq, failed))

    def _whole(self, rec: _Incoming, part: _InPart) -> bool:
        """The part is its layer's whole expected block list, nothing of it written yet."""
        layer = part.layer
        return layer not in rec.written and layer not in rec.pending and part.dst_raw == rec.dst_raw[layer]

    def _part_problem(self, rec: _Incoming | None, part: _InPart) -> str | None:
        """Caller holds the lock."""
        tid, layer = part.tid, part.layer
        if rec is None:
            return f"unknown transfer {tid!r} (never expected, or released)"
        if rec.status == S.FAILED:
            return f"transfer {tid!r} failed: {rec.reason}"
        if rec.status == S.DONE:
            return f"transfer {tid!r} is already complete (layer {layer} again)"
        if layer not in rec.dst_raw:
            return f"layer {layer} not expected (expected {sorted(rec.dst_raw)})"
        if layer in rec.written:
            fits = False
        elif self._whole(rec, part):
            return None
        else:
            ids = part.dst.tolist()
            pending = rec.pending.get(layer) or self._all_ids(rec, layer)
            fits = len(set(ids)) == len(ids) and pending.issuperset(ids)
        return None if fits else f"layer {layer}: destination blocks not expected by expect(), or already written"

    def _write_part(self, rec: _Incoming, part: _InPart, data: _Arrived) -> None:
        """Caller holds the lock; _part_problem found nothing. Bookkeeping, and the
        writes of what did not land in place."""
        layer = part.layer
        index = None
        if self._whole(rec, part):
            if not part.runs:
                index = rec.dst[layer]
            rec.written.add(layer)
        else:
            pending = rec.pending.setdefault(layer, self._all_ids(rec, layer))
            pending.difference_update(part.dst.tolist())
            if not pending:
                del rec.pending[layer]
                rec.written.add(layer)
        if data.staged is not None:
            self._write(layer, self._index(part.staged_dst()) if index is None else index, data.staged)
        for (first, n), buf in zip(part.run_dst(), data.runs):
            self._write_run(layer, first, buf)
        if data.staged is not None or data.runs:
            rec.unsynced = self._stream is not None  # (runs received in place landed already)
        rec.parts_written += 1
        stats = self._stats
        stats["layers_received"] += 1
        stats["bytes_received"] += len(part.dst) * self._block_bytes
        stats["blocks_direct"] += part.num_direct
        stats["blocks_staged"] += part.num_staged
        if len(rec.written) == len(rec.dst_raw) and rec.direct_inflight == 0:
            self._sync(rec)
            rec.status = S.DONE
            stats["transfers_done"] += 1
            self._cond.notify_all()

    @staticmethod
    def _all_ids(rec: _Incoming, layer: int) -> set[int]:
        return set(memoryview(rec.dst_raw[layer]).cast("i").tolist())

    def _on_finish(self, conn: _Conn, item: _Finish) -> None:
        tid, num_layers = item.tid, item.num_layers
        with self._lock:
            rec = self._transfers.get(tid)
            if rec is None:
                reason = f"unknown transfer {tid!r} (never expected, or released)"
            elif rec.status == S.FAILED:
                reason = rec.reason
            elif rec.status != S.DONE or num_layers != rec.parts_written:
                reason = (f"sender finished after {num_layers} layer messages; {rec.parts_written} written, "
                          f"{len(rec.written)} of {len(rec.dst_raw)} layers complete")
                self._fail(rec, reason)
            else:
                reason = ""
        status = S.FAILED if reason else S.DONE
        self._reply(conn, {"op": "finish_ack", "tid": tid, "status": int(status), "reason": reason})
