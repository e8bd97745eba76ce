"""NCCL backend: the TCP control plane (receiver.py, sender.py), a GPU-to-GPU data plane
over NCCL send/recv.

Everything but the bytes of a layer goes exactly as in the TCP backend: the handshake,
layer headers, acks, finish, aborts and all failure handling (see the lifecycles in
receiver.py and sender.py). What changes is where a layer's bytes travel:

  pair set-up (once per connection, i.e. per sender-GPU / receiver-GPU pair):
    the receiver answers the hello with the port of a fresh `TCPStore` it hosts for this
    connection alone plus a unique key prefix; both sides build a 2-rank
    `ProcessGroupNCCL` on that store (rank 0 = sender, rank 1 = receiver) and exchange a
    one-element warm-up send/recv, so NCCL communicator set-up (and its errors) happen at
    connect time rather than inside the first transfer. There is no global world: each
    pair's group is private, made on first contact and reused for every later transfer.
  a layer:
    sender   gather the src blocks into a contiguous [2, n, bs, kvh, d] buffer on the GPU
             (index_select; stream-ordered after the caller's compute, so the caller may go
             on), then on its writer thread: the header on TCP, then `send` on the pair's
             group (the NCCL stream is made to wait for the gather via a CUDA event). The
             buffer is kept alive until the receiver acks the layer.
    receiver read the header; `recv` into a contiguous staging buffer on its own CUDA
             stream; wait for it (polling, so a dead sender is noticed on the TCP socket
             instead of hanging); `index_copy_` into kv_caches[layer][:, dst]; sync; ack.
    Per connection, NCCL matches sends and recvs in posting order, and both sides post
    in header order, so no tags or ids are needed on the data plane. Read-ahead: when the
    next header is already on the socket, its recv is posted before the current layer is
    copied and acknowledged (at most one message ahead, so two staging buffers at most). Data for an unknown
    or aborted transfer is still received (into scratch) to keep that order, then dropped.

Staging copies: one device-side copy on each side (the sender's gather, the receiver's
index_copy_ out of the staging buffer), each at HBM speed (~3-4 TB/s, far above the
NVLink/RDMA link) but each costs memory of one layer's message. Removing the receiver's
would take receiving straight into the cache: NCCL needs contiguous buffers, so either
the destination blocks are allocated as contiguous runs (one recv per run), or the cache
is laid out [num_blocks, 2, bs, kvh, d] so a block is contiguous and the n per-block recvs
are posted in one NCCL group (`batch_isend_irecv`); per-block messages are latency-bound
unless grouped (see NOTES.md: 0.8 GB/s at 64 KiB vs 358 GB/s at 256 MiB).

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
from kv_transfer.base import TransferError, dtype_from_name, register_backend
from kv_transfer.receiver import TcpReceiver, _Conn
from kv_transfer.sender import TcpSender, _Peer, _Staged

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
    # Receiver read-ahead: the next frame's header, read while the current layer is still
    # being written, and (for a layer) its recv, already posted so the link stays busy.
    ahead: tuple[dict[str, Any], int] | None = None
    posted: tuple[dict[str, Any], torch.Tensor, Any] | None = None

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


def _readable(sock: socket.socket) -> bool:
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return False


def _poll_work(work, alive: Callable[[], bool], timeout: float, what: str) -> None:
    """NCCL: wait for a p2p op without ever hanging on a dead peer (an NCCL op whose peer
    died never completes); then `work.wait()`, which orders the current stream after it."""
    deadline = time.monotonic() + timeout
    delay, spins = 0.0, 0
    while not work.is_completed():
        if not alive():
            raise ConnectionError(f"peer went away during {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not complete in {timeout:.0f} s")
        spins += 1
        if spins > 100:  # spin briefly (a layer takes tens of microseconds on NVLink), then back off
            delay = min(max(delay * 2, 2e-5), 1e-3)
        time.sleep(delay)
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
    # Post the next layer's recv early. Measured on 2x H100 (BENCHMARKS.md): no gain yet
    # (38-43 ms either way for 2.67 GB), so off until the real per-message cost is found;
    # bench/kv_transfer.py times both.
    read_ahead = False

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
            self._recv(conn, probe, "warm-up recv")

    def _teardown_data_plane(self, conn: _Conn) -> None:
        if conn.data is not None:
            conn.data.abort()

    def _payload_problem(self, header: dict[str, Any], payload_len: int) -> str | None:
        return None if payload_len == 0 else f"nccl layer message carries {payload_len} TCP bytes"

    def _recv(self, conn: _Conn, buf: torch.Tensor, what: str) -> None:
        self._wait(conn, conn.data.group.recv([buf], SENDER_RANK, TAG), what)

    def _wait(self, conn: _Conn, work, what: str) -> None:
        _WAIT[self.pg_backend](work, lambda: _socket_open(conn.sock), self.pg_timeout.total_seconds(), what)

    def _post(self, conn: _Conn, header: dict[str, Any]):
        """Allocate the staging buffer and post its recv, on the receiver's stream."""
        with _on_device(self.device), _on_stream(self._stream):
            buf = torch.empty(header["shape"], dtype=dtype_from_name(header["dtype"]), device=self.device)
            return buf, conn.data.group.recv([buf], SENDER_RANK, TAG)

    def _next_header(self, conn: _Conn) -> tuple[dict[str, Any], int]:
        pair = conn.data
        if pair is not None and pair.ahead is not None:
            header, pair.ahead = pair.ahead, None
            return header
        return wire.recv_header(conn.sock)

    def _read_ahead(self, conn: _Conn) -> None:
        """If the next frame is already here and is a layer, post its recv now: NCCL then
        moves layer i+1 while layer i is copied into the cache and acknowledged."""
        pair = conn.data
        if not self.read_ahead or pair.ahead is not None or not _readable(conn.sock):
            return
        header, payload_len = wire.recv_header(conn.sock)
        pair.ahead = (header, payload_len)
        shape = header.get("shape")
        if (header.get("op") == "layer" and payload_len == 0 and header.get("dtype") == self.layout.dtype
                and isinstance(shape, list) and len(shape) == 5):
            pair.posted = (header, *self._post(conn, header))

    def _receive_payload(self, conn: _Conn, header: dict[str, Any], payload_len: int) -> torch.Tensor:
        # Allocated and received on the receiver's stream; _write's index_copy_ runs on the
        # same stream, after the recv (work.wait() ordered the stream after the NCCL stream).
        pair = conn.data
        if pair.posted is not None and pair.posted[0] is header:
            _, buf, work = pair.posted
            pair.posted = None
        else:
            buf, work = self._post(conn, header)
        what = f"recv of {header['tid']!r} layer {header['layer']}"
        self._read_ahead(conn)  # the next layer's recv queues behind this one on the link
        with _on_device(self.device), _on_stream(self._stream):
            self._wait(conn, work, what)
        self._read_ahead(conn)
        return buf  # [2, n, bs, kvh, d] staging buffer

    def _discard_payload(self, conn: _Conn, header: dict[str, Any], payload_len: int) -> None:
        if payload_len:  # a malformed message: its bytes came on TCP
            wire.discard(conn.sock, payload_len)
        else:  # the sender posted a send for it: match it to keep the pair's order
            self._receive_payload(conn, header, payload_len)


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

    def _stage(self, layer: int, src_ids: torch.Tensor) -> _Staged:
        buf = self._gather(layer, src_ids)  # [2, n, bs, kvh, d] on the cache's device
        ready = None
        if buf.is_cuda:  # the writer thread's stream must wait for the gather on the caller's
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(buf.device))
        return _Staged(buf, ready)

    def _transmit(self, peer: _Peer, header: dict[str, Any], staged: _Staged) -> int:
        key = (header["tid"], header["layer"])
        entry = [staged.tensor]
        with self._lock:  # keep the buffer alive until the receiver acks (or the pair dies)
            peer.inflight.setdefault(key, []).append(entry)  # a layer may take several messages
        with peer.write_lock:
            nbytes = wire.send_frame(peer.sock, header)
        with _on_device(self.device):
            if staged.ready is not None:
                torch.cuda.current_stream().wait_event(staged.ready)
            work = peer.data.group.send([staged.tensor], RECEIVER_RANK, TAG)
        with self._lock:
            entry.append(work)
        return nbytes + staged.tensor.numel() * staged.tensor.element_size()


register_backend("nccl")((NcclSender, NcclReceiver))
