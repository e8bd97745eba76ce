"""NCCL backend: the TCP control plane (receiver.py, sender.py), a GPU-to-GPU data plane
over NCCL send/recv.

Everything but the bytes of a part goes exactly as in the TCP backend: the handshake,
parts headers with their block ids, acks, finish, aborts and all failure handling (see
the lifecycles in receiver.py and sender.py, the message list in wire.py). What changes
is where a part's bytes travel:

  pair set-up (once per connection, i.e. per sender-GPU / receiver-GPU pair):
    the receiver answers the hello with the port of a fresh `TCPStore` it hosts for this
    connection alone plus a unique key prefix; both sides build a 2-rank
    `ProcessGroupNCCL` on that store (rank 0 = sender, rank 1 = receiver) and exchange a
    one-element warm-up send/recv, so NCCL communicator set-up (and its errors) happen at
    connect time rather than inside the first transfer. There is no global world: each
    pair's group is private, made on first contact and reused for every later transfer.
  a parts message (several layers, maybe of several transfers; see sender.py):
    sender   send_layer gathers each part's src blocks into a contiguous [2, n, bs, kvh, d]
             buffer on the GPU (index_select on the caller's stream, then an event taken
             from a pool). The writer thread sends the header and block ids on TCP, then
             posts one NCCL `send` per part back to back from the pair's own stream, which
             first waits for that part's gather event (the event then goes back to the
             pool): no host wait anywhere. The buffers stay alive until the receiver acks
             the message; then the reader calls wait() on its sends, so torch drops its
             own references at once and the memory is reused by the next gathers.
    receiver the reader thread reads the header and ids and at once posts one `recv` per
             part into staging buffers on the receiver's stream, then goes on to the next
             header (up to `max_queued_messages` ahead), so the link always has recvs
             posted. The completer waits for each part in turn (polling with short sleeps,
             never spinning, so the reader gets the GIL; polling, so a dead sender is
             noticed on the TCP socket instead of hanging), enqueues its `index_copy_`
             into kv_caches[layer][:, dst] on the receiver's stream, and acks the message
             once all its parts are handled; it synchronizes only for DONE and FAILED.
    Per connection, NCCL matches sends and recvs in posting order, and both sides post
    in header order, so no tags or ids are needed on the data plane. Data for an unknown
    or aborted transfer is still received (into staging) to keep that order, then dropped.
    One NCCL op per part, not one per message: the parts are separate gathers, and a
    per-layer message (30-130 MB for a 32k-token Scout prompt) is already near link
    bandwidth; bench/kv_transfer.py times raw NCCL both ways.

Staging copies: one device-side copy on each side (the sender's gather, the receiver's
index_copy_ out of the staging buffer), each at HBM speed (~3-4 TB/s, far above the
NVLink/RDMA link) and overlapped with the link, but each costs memory: a queued part on
the sender, up to (max_queued_messages + 1) messages of staging on the receiver. Not
done: receiving straight into the cache. NCCL needs contiguous buffers and the cache is
[2, num_blocks, ...], so a run of consecutive destination blocks is two contiguous
regions (K and V); both sides could split each part by the runs of its dst ids (the
sender knows them) and post two ops per run. But a recv posted into the cache cannot be
cancelled, so abort() would have to wait for a slow or dead sender before decode may
reuse the blocks; and short runs (a fragmented free list) are latency-bound (NOTES.md:
0.8 GB/s at 64 KiB vs 358 GB/s at 256 MiB).

Failure: a peer that dies is seen on the TCP socket (EOF, keepalive); the pair's group is
then aborted (`abort()`), which ends any NCCL op still waiting for the dead peer, and its
transfers turn FAILED as in TCP. The group's own timeout (`pg_timeout`) is a backstop.
NOTE: torch's NCCL watchdog may terminate the process when an op times out
(TORCH_NCCL_ASYNC_ERROR_HANDLING); we abort the group long before, but this is untested
on GPUs so far: kill a peer on the GPU machine before relying on it.

Environment: NCCL_* variables already set are respected; this module sets none (in
particular never NCCL_NVLS_ENABLE: NVLink multicast stays off). Sender and receiver must
use different GPUs (NCCL cannot pair a device with itself).

The process-group factory is a small registry keyed by `pg_backend`; tests use "gloo" to
run this exact control flow on CPU tensors, since this machine has no GPU.
"""

from __future__ import annotations

import contextlib
import datetime
import select
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kv_transfer import wire
from kv_transfer.base import TransferError, register_backend
from kv_transfer.receiver import TcpReceiver, _Conn, _InPart, _Message
from kv_transfer.sender import TcpSender, _Part, _Peer, _Sent, _Staged

SENDER_RANK, RECEIVER_RANK, WORLD = 0, 1, 2
TAG = 0


def _dist():
    """torch.distributed, imported on use: this module must import on any torch build."""
    import torch.distributed as dist
    return dist


# ---- per-backend requirements and process-group factories (registries, keyed by pg_backend)

def _require_nccl(device: torch.device) -> None:
    dist = _dist()
    if not (dist.is_available() and dist.is_nccl_available()):
        raise TransferError(f"kv_transfer backend 'nccl': this torch build ({torch.__version__}) has no "
                            f"NCCL (CUDA available: {torch.cuda.is_available()}); on CPU-only machines use 'tcp'")
    if device.type != "cuda":
        raise TransferError(f"kv_transfer backend 'nccl': the KV caches are on {device}; NCCL moves CUDA "
                            "tensors only; use 'tcp' for CPU caches")


def _require_gloo(device: torch.device) -> None:
    if device.type != "cpu":
        raise TransferError(f"pg_backend 'gloo' (tests only) needs CPU caches, got {device}")


def _nccl_group(store, rank: int, name: str, timeout: datetime.timedelta):
    dist = _dist()
    opts = dist.ProcessGroupNCCL.Options()
    opts.is_high_priority_stream = False
    opts._timeout = timeout
    opts.group_name = name
    return dist.ProcessGroupNCCL(store, rank, WORLD, opts)


def _gloo_group(store, rank: int, name: str, timeout: datetime.timedelta):
    return _dist().ProcessGroupGloo(store, rank, WORLD, timeout=timeout)


_REQUIRE: dict[str, Callable[[torch.device], None]] = {"nccl": _require_nccl, "gloo": _require_gloo}
_GROUP: dict[str, Callable[..., Any]] = {"nccl": _nccl_group, "gloo": _gloo_group}


@dataclass
class _Pair:
    """One connection's data plane."""
    store: Any  # TCPStore: the receiver hosts it, the sender is its client
    prefix: str  # unique per pair: store keys and the group's name
    group: Any = None  # the 2-rank process group (a c10d Backend)
    stream: Any = None  # sender, CUDA: the stream its sends are posted from

    def abort(self) -> None:
        if self.group is not None:
            with contextlib.suppress(Exception):  # abort is best effort on a broken group
                self.group.abort()
            self.group = None


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _on_stream(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _socket_open(sock: socket.socket) -> bool:
    """False once the peer closed the TCP connection. Only peeks: frames stay unread."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return not readable or sock.recv(1, socket.MSG_PEEK) != b""
    except (OSError, ValueError):
        return False


def _poll_work(work, alive: Callable[[], bool], timeout: float, what: str) -> None:
    """NCCL: wait for a p2p op without ever hanging on a dead peer (an NCCL op whose peer
    died never completes); then `work.wait()`, which orders the current stream after it.
    Sleeps between polls, 20 us at first, doubling up to 100 us, and never spins: a
    thread that spins in Python keeps the GIL (a sleep(0) hands it over only if the
    waiter wins the race; otherwise the waiter waits out the 5 ms switch interval), and
    the reader thread of the same connection needs the GIL to post the next recvs. The
    wait is on the completer, behind recvs that are already posted, so its latency does
    not idle the link; it adds at most ~0.15 ms (with the OS timer slack) after the last
    part. The peer is checked every 10 ms."""
    start = checked = time.monotonic()
    delay = 2e-5
    while not work.is_completed():
        time.sleep(delay)
        delay = min(2 * delay, 1e-4)
        now = time.monotonic()
        if now - checked > 0.01:
            if not alive():
                raise ConnectionError(f"peer went away during {what}")
            if now - start > timeout:
                raise TimeoutError(f"{what} did not complete in {timeout:.0f} s")
            checked = now
    work.wait()


def _block_on_work(work, alive: Callable[[], bool], timeout: float, what: str) -> None:
    """gloo: its send/recv works only complete inside wait(); gloo's own sockets see a dead
    peer and its timeout bounds the wait."""
    work.wait(datetime.timedelta(seconds=timeout))


_WAIT: dict[str, Callable[..., None]] = {"nccl": _poll_work, "gloo": _block_on_work}


class _NcclOptions:
    pg_backend = "nccl"  # which _GROUP factory builds the pair's group
    pg_timeout = datetime.timedelta(seconds=120)  # backstop; dead peers are seen on TCP first
    store_timeout = datetime.timedelta(seconds=30)


class NcclReceiver(_NcclOptions, TcpReceiver):
    data_plane = "nccl"

    def _check_data_plane(self) -> None:
        _REQUIRE[self.pg_backend](self.device)

    def _accept_data_plane(self, conn: _Conn, hello: dict[str, Any]) -> dict[str, Any]:
        host = self.address.rpartition(":")[0]
        store = _dist().TCPStore(host, 0, None, True, self.store_timeout, wait_for_workers=False)
        conn.data = _Pair(store, f"tandem-kv/{uuid.uuid4().hex}/")
        return {"store_port": store.port, "store_prefix": conn.data.prefix}

    def _connect_data_plane(self, conn: _Conn) -> None:
        pair = conn.data
        store = _dist().PrefixStore(pair.prefix, pair.store)
        with _on_device(self.device):
            pair.group = _GROUP[self.pg_backend](store, RECEIVER_RANK, pair.prefix, self.pg_timeout)
            probe = torch.empty(1, dtype=torch.uint8, device=self.device)
            self._wait(conn, pair.group.recv([probe], SENDER_RANK, TAG), "warm-up recv")

    def _teardown_data_plane(self, conn: _Conn) -> None:
        if conn.data is not None:
            conn.data.abort()

    def _wait(self, conn: _Conn, work, what: str) -> None:
        _WAIT[self.pg_backend](work, lambda: _socket_open(conn.sock), self.pg_timeout.total_seconds(), what)

    def _take_data(self, conn: _Conn, msg: _Message, nbytes: int) -> str | None:
        """Post one recv per part, in part order, into a staging buffer allocated on the
        receiver's stream (the stream _write copies out of it on)."""
        if nbytes:  # a malformed message: its bytes came on TCP, no p2p message follows
            wire.discard(conn.sock, nbytes)
            return f"nccl parts message carries {nbytes} TCP bytes"
        group = conn.data.group
        with _on_device(self.device), _on_stream(self._stream):
            for p in msg.parts:
                buf = torch.empty(self._part_shape(p), dtype=self.kv_caches[0].dtype, device=self.device)
                p.data = (buf, group.recv([buf], SENDER_RANK, TAG))
        return None

    def _await_data(self, conn: _Conn, part: _InPart) -> torch.Tensor:
        buf, work = part.data
        with _on_device(self.device), _on_stream(self._stream):  # work.wait() orders this stream after the recv
            self._wait(conn, work, f"recv of {part.tid!r} layer {part.layer}")
        return buf


class NcclSender(_NcclOptions, TcpSender):
    data_plane = "nccl"

    def _check_data_plane(self) -> None:
        _REQUIRE[self.pg_backend](self.device)

    def _connect_data_plane(self, peer: _Peer, reply: dict[str, Any]) -> None:
        dist = _dist()
        host = wire.parse_address(peer.address)[0]
        pair = _Pair(dist.TCPStore(host, reply["store_port"], None, False, self.store_timeout),
                     reply["store_prefix"])
        peer.data = pair
        try:
            with _on_device(self.device):
                if self.device.type == "cuda":
                    pair.stream = torch.cuda.Stream(self.device)
                pair.group = _GROUP[self.pg_backend](dist.PrefixStore(pair.prefix, pair.store),
                                                     SENDER_RANK, pair.prefix, self.pg_timeout)
                probe = torch.zeros(1, dtype=torch.uint8, device=self.device)
                work = pair.group.send([probe], RECEIVER_RANK, TAG)
                _WAIT[self.pg_backend](work, lambda: _socket_open(peer.sock), self.pg_timeout.total_seconds(),
                                       f"warm-up send to {peer.address}")
        except Exception:
            pair.abort()
            raise

    def _teardown_data_plane(self, peer: _Peer) -> None:
        if peer.data is not None:
            peer.data.abort()

    def __init__(self, *args, **kwargs):
        # CUDA events whose waits the writer has enqueued: free to record again (a stream
        # waits for the record that was last at the time of its wait_event call).
        self._free_events: list = []
        super().__init__(*args, **kwargs)

    def _stage(self, layer: int, src_ids: torch.Tensor) -> _Staged:
        buf = self._gather(layer, src_ids)  # [2, n, bs, kvh, d] on the cache's device
        ready = None
        if buf.is_cuda:  # the sends wait for the gather on the caller's stream
            try:
                ready = self._free_events.pop()
            except IndexError:
                ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(buf.device))
        return _Staged(buf, ready)

    def _transmit(self, peer: _Peer, header: dict[str, Any], ids: list[memoryview], parts: list[_Part],
                  sent: _Sent) -> int:
        """The header and block ids on TCP, then one NCCL send per part, posted back to
        back with no host wait (each on the pair's stream after its gather's event)."""
        pair = peer.data
        sent.keep.extend(p.staged.tensor for p in parts)  # alive until the ack (or the pair's teardown)
        with peer.write_lock:
            nbytes = wire.send_frame(peer.sock, header, ids)
        with _on_device(self.device), _on_stream(pair.stream):
            for p in parts:
                if p.staged.ready is not None:
                    pair.stream.wait_event(p.staged.ready)
                    self._free_events.append(p.staged.ready)
                    p.staged.ready = None
                sent.keep.append(pair.group.send([p.staged.tensor], RECEIVER_RANK, TAG))
                nbytes += p.staged.tensor.nbytes
        return nbytes

    def _release_sent(self, peer: _Peer, sent: _Sent) -> None:
        """`work.wait()` on each send of the acked message (its sends are complete: the
        receiver has every byte). torch's NCCL group stashes a reference to each sent
        tensor until wait() is called or its watchdog, polling every ~100 ms, reaps the
        op; unwaited, a transfer's gathered buffers (GBs) would stay allocated that long,
        and the next transfer's gathers would have to cudaMalloc fresh memory. wait() only
        orders the current stream (here the pair's idle stream) after the op."""
        pair = peer.data
        with _on_device(self.device), _on_stream(pair.stream if pair is not None else None):
            for obj in sent.keep:
                if not isinstance(obj, torch.Tensor):
                    obj.wait()


register_backend("nccl")((NcclSender, NcclReceiver))
