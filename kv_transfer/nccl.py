"""NCCL backend: the TCP control plane (receiver.py, sender.py), a GPU-to-GPU data plane
over NCCL send/recv.

Everything but the bytes of a part goes exactly as in the TCP backend: the handshake,
parts headers with their block ids and direct runs, acks, finish, aborts and all failure
handling (see the lifecycles in receiver.py and sender.py, the message list in wire.py).
What changes is where a part's bytes travel:

  pair set-up (once per connection, i.e. per sender-GPU / receiver-GPU pair):
    the receiver answers the hello with the port of a fresh `TCPStore` it hosts for this
    connection alone, a unique key prefix, and whether the pair groups its ops (below);
    both sides build a 2-rank NCCL communicator through that store (rank 0 = sender,
    rank 1 = receiver): by default NCCL called through ctypes (nccl_lib.py: the receiver
    publishes the unique id in the store), or torch's `ProcessGroupNCCL` (pg_backend
    "nccl-torch", tens of microseconds more per op); the hello names the kind
    ("nccl/<pg_backend>"), so a mismatch is refused before either side builds one.
    They exchange a one-element warm-up send/recv, posted the way data will be, so NCCL
    communicator set-up (and its errors) happen at connect time rather than inside the
    first transfer. There is no global world: each pair's group is private,
    made on first contact and reused for every later transfer.
  a parts message (several layers, maybe of several transfers; see sender.py):
    sender   send_layer gathers each part's staged blocks into a contiguous
             [2, m, bs, kvh, d] buffer on the GPU (index_select on the caller's stream)
             and takes its direct runs as views of the cache, K and V of each run one
             contiguous region; then records an event from a pool on the caller's stream.
             The writer thread sends the header and block ids on TCP, then posts the
             message's p2p sends -- per part: the staged buffer, then K and V of each run
             -- from the pair's own stream, which first waits for each part's event (the
             event then goes back to the pool): no host wait anywhere. Then the pair's
             stream waits for the sends (`work.wait()`: a stream wait, not a host one),
             so an event recorded on it later marks them complete: that is what fence()
             makes the caller's stream wait for. The staged buffers stay alive until the
             receiver acks the message.
    receiver the reader thread reads the header and ids, claims the direct runs it may
             write (receiver.py), and at once posts the message's recvs, on the
             receiver's stream: staged blocks into a staging buffer, a claimed run's K
             and V straight into `kv_caches[layer][0|1, d:d+n]`, an unclaimed run into
             scratch; then goes on to the next header (up to `max_queued_messages`
             ahead), so the link always has recvs posted. The completer waits for each
             part in turn (polling with short sleeps, never spinning, so the reader gets
             the GIL, and more slowly while a later message's recvs are posted
             behind it: see _poll_work; polling, so a dead sender is noticed on the TCP socket instead
             of hanging), settles its claim, enqueues the `index_copy_` of its staged
             blocks into kv_caches[layer][:, dst] on the receiver's stream, and acks the
             message once all its parts are handled; it synchronizes only for DONE and
             FAILED.
    The reader and the completer share the GIL, and so do the sender's caller, writer
    and ack reader: what a message costs in Python on either side, not the link, set
    the pace (~1 ms a message once, against ~0.6 ms for 200 MB on the wire). Hence
    binary headers (wire.py), block ids kept as bytes rather than tensors (every torch
    call releases and retakes the GIL), and checks done once per distinct block list.
    Per connection, NCCL matches sends and recvs in posting order, and both sides post
    in header order with the same sizes, so no tags or ids are needed on the data plane.
    Data for an unknown or aborted transfer is still received (into staging or scratch)
    to keep that order, then dropped.

  CUDA events (`ctypes_events`, both sides): the per-message event calls -- a part's
    ready event recorded on the caller's stream, the pair's stream waiting for it, the
    event after each posted group (nccl_lib.Work) and its polls, fence()'s event --
    go through the CUDA driver with ctypes and keep the GIL (cuda_events.py), like the
    NCCL calls themselves: torch's events let go of it on every call, and getting it
    back can take a switch interval. Events are pooled and recorded again. Off
    (`ctypes_events = False`): torch.cuda.Event everywhere, for bench/kv_transfer.py's
    comparison row. Host waits (the receiver's synchronize for DONE) stay on torch.

  grouped ops (`group_ops`, the receiver's choice, told to the sender at hello): a
    message's ops are posted as one NCCL group (ncclGroupStart/End; through torch:
    `_start_coalescing` / `_end_coalescing`), one launch and one work for the lot
    instead of one per op; a direct run doubles a part's ops (K and V), so
    a 48-layer transfer of fresh blocks is ~96 ops in ~12 messages. torch runs grouped
    p2p on another communicator than single p2p, so both sides must agree, warm-up
    included. gloo cannot group, and runs one op at a time.

Copies: a staged block costs one device-side copy on each side (the sender's gather,
the receiver's index_copy_ out of staging), each at HBM speed (~3-4 TB/s, far above the
NVLink/RDMA link) and overlapped with the link, plus memory: a queued part on the
sender, up to (max_queued_messages + 1) messages of staging on the receiver. A direct
run costs neither. A fresh pool gives consecutive ids, so most transfers go direct; a
fragmented one falls back to staging, run by run.

Failure: a peer that dies is seen on the TCP socket (EOF, keepalive); the pair's group is
then aborted (`abort()`), which ends any NCCL op still waiting for the dead peer (NCCL's
comm abort stops the comm's kernels before it returns: no recv writes after that), and
its transfers turn FAILED as in TCP. The group's own timeout (`pg_timeout`) is a
backstop. NOTE: torch's NCCL watchdog may terminate the process when an op times out
(TORCH_NCCL_ASYNC_ERROR_HANDLING); we abort the group long before, but this is untested
on GPUs so far: kill a peer on the GPU machine before relying on it.

Environment: NCCL_* variables already set are respected; this module sets none (in
particular never NCCL_NVLS_ENABLE: NVLink multicast stays off). Sender and receiver must
use different GPUs (NCCL cannot pair a device with itself).

The pair's group kinds are a small registry (`PG_BACKENDS`, keyed by `pg_backend`; it and
the group shims live in nccl_groups.py): "nccl" (ctypes, the default) and "nccl-torch";
tests and `bench/kv_transfer.py --cpu` use "gloo" to run this exact control flow on CPU
tensors, since those machines have no GPU, and "gloo-grouped", a gloo that takes NCCL's
grouping calls, to run the grouped flow.
"""

from __future__ import annotations

import contextlib
import datetime
import select
import socket
import uuid
from typing import Any

import torch

from kv_transfer import cuda_events, nccl_lib, wire
from kv_transfer.base import TransferError, register_backend
from kv_transfer.incoming import _Arrived, _Conn, _InPart, _Message
from kv_transfer.nccl_groups import PG_BACKENDS, RECEIVER_RANK, SENDER_RANK, PgBackend, _dist, _Pair
from kv_transfer.outgoing import _BlockIds, _Part, _Payload, _Peer, _Sent
from kv_transfer.receiver import TcpReceiver
from kv_transfer.sender import TcpSender


def _socket_open(sock: socket.socket) -> bool:
    """False once the peer closed the TCP connection. Only peeks: frames stay unread."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return not readable or sock.recv(1, socket.MSG_PEEK) != b""
    except (OSError, ValueError):
        return False


def _latest_per_stream(payloads: list[_Payload]) -> list:
    """The ready events a message's sends must wait for: per stream, the one recorded last.
    Events recorded on one stream complete in order, so it covers the others, and each
    wait is a driver call (and with torch's events one that lets go of the GIL, which
    can take a switch interval to get back). Last by ready_seq, not by queue order:
    fence() records a queued part's event again."""
    last: dict[Any, _Payload] = {}
    for pl in payloads:
        seen = last.get(pl.ready_stream)
        if seen is None or pl.ready_seq > seen.ready_seq:
            last[pl.ready_stream] = pl
    return [pl.ready for pl in last.values()]


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _on_stream(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class _NcclOptions:
    pg_backend = "nccl"  # which PG_BACKENDS entry builds and waits on the pair's group
    ctypes_events = True  # CUDA events through the driver, GIL kept (cuda_events.py); False: torch's
    pg_timeout = datetime.timedelta(seconds=120)  # backstop; dead peers are seen on TCP first
    store_timeout = datetime.timedelta(seconds=30)

    @property
    def data_plane(self) -> str:
        """What the hello names: the two sides must build the same kind of group (their
        rendezvous and ops differ), so a mismatch is refused before either starts one."""
        return f"nccl/{self.pg_backend}"

    @property
    def _pg(self) -> PgBackend:
        return PG_BACKENDS[self.pg_backend]

    def _make_group(self, store, rank: int):
        group = self._pg.make_group(store, rank, self.pg_timeout, self.device)
        if isinstance(group, nccl_lib.NcclComm):
            group.ctypes_events = self.ctypes_events  # its per-group events follow ours
        return group

    def _new_event(self):
        """A CUDA event for this side's device, of the kind ctypes_events says."""
        return cuda_events.CudaEvent(self.device) if self.ctypes_events else torch.cuda.Event()


class NcclReceiver(_NcclOptions, TcpReceiver):
    group_ops = True  # post each message's recvs as one NCCL group, where the pg backend can

    def _check_data_plane(self) -> None:
        self._pg.require(self.device)

    def _accept_data_plane(self, conn: _Conn, hello: dict[str, Any]) -> dict[str, Any]:
        host = self.address.rpartition(":")[0]
        store = _dist().TCPStore(host, 0, None, True, self.store_timeout, wait_for_workers=False)
        conn.data = _Pair(store, f"tandem-kv/{uuid.uuid4().hex}/", self.group_ops and self._pg.can_group)
        return {"store_port": store.port, "store_prefix": conn.data.prefix, "grouped": conn.data.grouped}

    def _connect_data_plane(self, conn: _Conn) -> None:
        pair = conn.data
        store = _dist().PrefixStore(pair.prefix, pair.store)
        with _on_device(self.device):
            pair.group = self._make_group(store, RECEIVER_RANK)
            probe = torch.empty(1, dtype=torch.uint8, device=self.device)
            (work,) = pair.post([probe], send=False)
            self._wait(conn, work, -1, "warm-up recv")

    def _teardown_data_plane(self, conn: _Conn) -> None:
        if conn.data is not None:
            conn.data.abort()

    def _wait(self, conn: _Conn, work, seq: int, what: str) -> None:
        """Wait for a recv of parts message `seq`; patiently while a later message's recvs
        are posted behind it (the link has work; not so for the last one, which DONE waits for)."""
        self._pg.wait(work, lambda: _socket_open(conn.sock), self.pg_timeout.total_seconds(), what,
                      lambda: conn.last_started > seq)

    def _receives_in_place(self) -> bool:
        return True

    def _recv_targets(self, part: _InPart) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Reader, on the receiver's stream: the part's staging buffer, and every tensor its
        recvs write into, in wire order (a claimed run's K and V are cache views)."""
        dtype, (k, v) = self.kv_caches[0].dtype, self._kv[part.layer]
        staged = None
        if part.num_staged:
            staged = torch.empty(self._staged_shape(part), dtype=dtype, device=self.device)
        targets = [] if staged is None else [staged]
        for first, n in part.run_dst():
            if part.claim is not None:
                targets += (k[first:first + n], v[first:first + n])
            else:
                scratch = torch.empty((2, n, *self._block_shape), dtype=dtype, device=self.device)
                targets += [scratch[0], scratch[1]]
        return staged, targets

    def _take_data(self, conn: _Conn, msg: _Message, nbytes: int) -> str | None:
        """Post the message's recvs, in wire order, on the receiver's stream (the stream
        _write copies staging out on)."""
        if nbytes:  # a malformed message: its bytes came on TCP, no p2p message follows
            conn.reader.discard(nbytes)
            return f"nccl parts message carries {nbytes} TCP bytes"
        pair = conn.data
        with _on_device(self.device), _on_stream(self._stream):
            targets = [self._recv_targets(p) for p in msg.parts]
            works = pair.post([t for _, ts in targets for t in ts], send=False)
            per_op = iter(works)
            for p, (staged, ts) in zip(msg.parts, targets):
                # Grouped: every part shares the list holding the group's one work, and the
                # first part to wait for it empties it (a work is waited for once: a second
                # wait() on a gloo work never returns). Else: the part's own ops' works.
                mine = works if pair.grouped else [next(per_op) for _ in ts]
                p.data = (staged, ts, mine, msg.seq)  # ts: the scratch buffers live until the recvs are done
        return None

    def _await_data(self, conn: _Conn, part: _InPart) -> _Arrived:
        staged, _, works, seq = part.data
        if works:  # grouped: only the message's first part waits
            with _on_device(self.device), _on_stream(self._stream):  # work.wait() orders this stream after the recv
                while works:
                    self._wait(conn, works[0], seq, f"recv of {part.tid!r} layer {part.layer}")
                    works.pop(0)
        return _Arrived(staged)


class NcclSender(_NcclOptions, TcpSender):
    write_inline = True  # posting a message's ops is quick; the link is watched through CUDA events
    stages_on_host = False  # GPU to GPU: no host staging

    def _check_data_plane(self) -> None:
        self._pg.require(self.device)

    def _connect_data_plane(self, peer: _Peer, reply: dict[str, Any]) -> None:
        dist = _dist()
        host = wire.parse_address(peer.address)[0]
        pair = _Pair(dist.TCPStore(host, reply["store_port"], None, False, self.store_timeout),
                     reply["store_prefix"], bool(reply.get("grouped")))
        if pair.grouped and not self._pg.can_group:
            raise TransferError(f"KV receiver at {peer.address} groups its ops; pg backend "
                                f"{self.pg_backend!r} cannot")
        peer.data = pair
        try:
            with _on_device(self.device):
                if self.device.type == "cuda":
                    pair.stream = torch.cuda.Stream(self.device)
                pair.group = self._make_group(dist.PrefixStore(pair.prefix, pair.store), SENDER_RANK)
                probe = torch.zeros(1, dtype=torch.uint8, device=self.device)
                (work,) = pair.post([probe], send=True)
                self._pg.wait(work, lambda: _socket_open(peer.sock), self.pg_timeout.total_seconds(),
                              f"warm-up send to {peer.address}")
        except Exception:
            pair.abort()
            raise

    def _teardown_data_plane(self, peer: _Peer) -> None:
        if peer.data is not None:
            peer.data.abort()

    def __init__(self, *args, **kwargs):
        # CUDA events whose waits are enqueued and that nothing queries: free to record
        # again (a stream waits for the record that was last at the time of its wait call).
        self._free_events: list = []
        super().__init__(*args, **kwargs)

    def _stage(self, layer: int, ids: _BlockIds) -> _Payload:
        """Staged blocks gathered on the caller's stream, direct runs as cache views; one
        event on the caller's stream orders the sends after both."""
        staged = None if ids.staged is None else self._gather(layer, ids.staged)  # [2, m, bs, kvh, d]
        runs = self._run_views(layer, ids)
        payload = _Payload(staged, runs, views=bool(runs))
        if self.device.type == "cuda":
            payload.ready = self._free_event()
            self._record_ready(payload, torch.cuda.current_stream(self.device))
        return payload

    def _free_event(self):
        """An event from the pool, or a new one."""
        try:
            return self._free_events.pop()
        except IndexError:
            return self._new_event()

    def _transmit(self, peer: _Peer, header: bytes, ids: list[memoryview], parts: list[_Part],
                  sent: _Sent) -> int:
        """The header and block ids on TCP, then the message's p2p sends posted back to
        back (or as one group) with no host wait, on the pair's stream after each part's
        event."""
        pair = peer.data
        nbytes = wire.send_frame(peer.sock, header, ids)
        with self._lock:  # from here fence() can no longer copy these parts' runs
            tensors = self._take(peer, parts, sent)
            recorded = [p.payload for p in parts if p.payload.ready is not None]
            waits = _latest_per_stream(recorded)
            readies = [pl.ready for pl in recorded]
            for p in parts:
                p.payload.ready = None
        sent.keep.extend(tensors)  # alive until the ack (or the pair's teardown)
        with _on_device(self.device), _on_stream(pair.stream):
            for ready in waits:
                ready.wait(pair.stream)
            self._free_events.extend(readies)  # their waits are enqueued: free to record again
            works = pair.post(tensors, send=True)
            sent.keep.extend(works)
            pair.posted.append(works)
            if len(pair.posted) > self.LINK_DEPTH:
                pair.posted.popleft()
            if self.device.type == "cuda":
                # The pair's stream now follows the sends (fence() records an event on it),
                # and torch drops its own references to the sent tensors at once; ours in
                # `keep` hold them until the ack, when the receiver has every byte.
                for work in works:
                    work.wait()
        with self._lock:
            sent.posted = True
            self._cond.notify_all()
        return nbytes + sum(p.payload.nbytes for p in parts)

    def _link_wants_more(self, peer: _Peer) -> bool:
        """Fewer than LINK_DEPTH messages in flight. CUDA: of the last LINK_DEPTH posted,
        those whose sends are not complete (a CUDA event query each). gloo (CPU tests): the
        messages not acked yet."""
        if self.device.type != "cuda":
            return len(peer.inflight) < self.LINK_DEPTH
        busy = sum(not all(w.is_completed() for w in works) for works in tuple(peer.data.posted))
        return busy < self.LINK_DEPTH

    def _fence_sent(self) -> None:
        """CUDA: the caller's stream waits for every posted send that reads the cache (an
        event on each such pair's stream, which follows its sends); no host wait, except
        for a message the writer is posting right now. gloo (CPU): the acks, as in TCP."""
        if self.device.type != "cuda":
            return super()._fence_sent()
        with self._cond:
            posted = self._cond.wait_for(lambda: all(s.posted for s in self._live_reading()),
                                         timeout=self.fence_timeout)
            stuck = {s.peer for s in self._live_reading() if not s.posted}
            caller = torch.cuda.current_stream(self.device)
            for peer in {s.peer for s in self._reading if s.posted} - stuck:
                done = self._free_event()
                done.record(peer.data.stream)
                done.wait(caller)
                self._free_events.append(done)  # its wait is enqueued: free to record again
        if not posted:
            for peer in stuck:
                self._peer_failed(peer, f"fence(): sends not posted within {self.fence_timeout:g} s")

    def _release_sent(self, peer: _Peer, sent: _Sent) -> None:
        """gloo: `work.wait()` on each send of the acked message (gloo's works complete
        only inside wait()). CUDA: waited for when posted (see _transmit)."""
        if self.device.type == "cuda":
            return
        for obj in sent.keep:
            if not isinstance(obj, torch.Tensor):
                obj.wait()


register_backend("nccl")((NcclSender, NcclReceiver))
