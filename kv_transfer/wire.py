"""Framing on a TCP stream: `!IQ` prefix (header length, payload length), a header, then
`payload length` raw bytes. Used by every backend's control plane and by the TCP
backend's data plane.

Headers: the two messages of every parts message's round trip -- parts and ack -- have
binary headers (struct-packed, first byte b"P" / b"A"): a JSON header and its checks
cost ~0.1 ms a message on each side, on threads that hold the GIL the link waits on.
The rare control messages are JSON objects (first byte "{").

Messages (op):
  sender -> receiver
    hello   {layout, data_plane, proto}   first message on a connection
    parts   binary (pack_parts / parse_parts), numbers little-endian:
              b"P", seq u64, lists u32, parts u32, tids u32
              dst_lens   lists x u32: the length of each destination list
              parts      parts x (tid index u32, layer u32, list index u32, runs u32)
              runs       for each part in order, its runs x (offset u32, count u32)
              tids       tids x (length u32, utf-8 bytes)
            one message carries one or more *parts*: a part is one send_layer call,
            the layer's n blocks. Parts of several transfers may share a message.
            The payload starts with the distinct destination lists back to back as
            native int32 (list i has dst_lens[i] ids); a part writes into its list
            index, so its block count n is that list's length.
            runs: the part's DIRECT runs, (offset, count) in increasing order,
            non-overlapping: positions offset..offset+count-1 of the part's list,
            whose source and destination ids both step by one. Every other block is
            STAGED. The sender decides; the receiver checks that each run's
            destination ids are consecutive.
            A part's data is, in this order: its staged blocks gathered into
            [2, m, bs, kvh, d] (m = n minus the run blocks; absent when m = 0), then
            for each run its K blocks [count, bs, kvh, d] and its V blocks, each of
            which is one contiguous region of a cache on both sides (see sender.py).
            On the TCP data plane these come as the frame's payload after the block
            ids, part after part; on the NCCL data plane each is one p2p op, in the
            same order, on the pair's process group.
    finish  {tid, num_layers}             num_layers: the parts sent for tid
    abort   {tid}
  receiver -> sender
    hello_ok {layout, ...backend extras} | hello_err {layout, reason}  (then closes)
    ack     binary (pack_ack / parse_ack): b"A", seq u64, failed u32, then failed x
            (part index u32, reason length u32, utf-8 reason). One per parts message,
            in message order: the parts listed were discarded for the reason given
            (their transfer failed); every other part was written into the cache
    finish_ack {tid, status, reason}
"""

from __future__ import annotations

import array
import json
import socket
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import torch

PROTO_VERSION = 4  # 2: coalesced parts messages, binary block ids; 3: direct runs; 4: binary parts/ack headers
_PREFIX = struct.Struct("!IQ")
MAX_HEADER_BYTES = 64 << 20  # a header lists block ids; 64 MiB is far beyond any real one
_CHUNK = 8 << 20  # bytes per recv call
HANDSHAKE_TIMEOUT_S = 30.0
ID_BYTES = 4  # block ids travel as native int32 (array "i", torch.int32)
_PARTS = struct.Struct("<cQIII")  # b"P", seq, lists, parts, tids
_ACK = struct.Struct("<cQI")  # b"A", seq, failed parts
_SMALL_FRAME = 64 << 10  # a frame up to this size goes out in one sendall


class PeerClosed(ConnectionError):
    """The stream ended (cleanly or not) before a full frame arrived."""


def tune_socket(sock: socket.socket) -> None:
    """Small control messages must not wait for Nagle; a dead peer must surface (keepalive)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


def shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address: want 'host:port', got {address!r}")
    return host.strip("[]"), int(port)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes without a copy (any dtype, bf16 included)."""
    assert t.device.type == "cpu" and t.is_contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def send_frame(sock: socket.socket, header: dict[str, Any] | bytes, payload: Sequence[memoryview] = ()) -> int:
    """Write one frame: a control header (a dict, sent as JSON) or a binary one (bytes:
    pack_parts, pack_ack), then the `payload` views back to back. Returns the bytes
    written. Callers serialize writers per socket."""
    head = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    n = sum(p.nbytes for p in payload)
    prefix = _PREFIX.pack(len(head), n)
    if n + len(head) <= _SMALL_FRAME:  # one syscall (and one TCP segment) for the usual small frame
        sock.sendall(b"".join([prefix, head, *payload]))
    else:
        sock.sendall(prefix + head)
        for p in payload:
            if p.nbytes:
                sock.sendall(p)
    return _PREFIX.size + len(head) + n


def block_ids(blocks: Sequence[int], name: str) -> bytes:
    """A block-id list as it travels in a parts message: native int32 bytes. ValueError
    naming `name` unless every id is an integer that fits."""
    try:
        return array.array("i", blocks).tobytes()
    except (TypeError, OverflowError) as e:
        raise ValueError(f"{name}: block ids must be integers in int32 range ({e})") from None


class Reader:
    """The receiving half of a connection: reads frames through a buffer, so a frame's
    prefix, header and block ids usually come in one recv call (three unbuffered reads
    cost ~40 us more a message, on the thread the link waits on). Large payloads go
    straight into their destination once the buffer is drained. One per connection,
    used for every read on it, the handshake included, so no buffered byte is lost."""

    def __init__(self, sock: socket.socket, size: int = 256 << 10):
        self.sock = sock
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = self._end = 0  # buffered bytes: _buf[_start:_end]

    def _fill(self, n: int) -> memoryview:
        """At least n buffered bytes (n <= the buffer's size); returns n of them, consumed."""
        if self._end - self._start < n:
            if self._start:  # move what is left to the front
                left = self._end - self._start
                self._view[:left] = self._view[self._start:self._end]
                self._start, self._end = 0, left
            while self._end < n:
                got = self.sock.recv_into(self._view[self._end:])
                if got == 0:
                    raise PeerClosed(f"peer closed after {self._end} of {n} bytes")
                self._end += got
        out = self._view[self._start:self._start + n]
        self._start += n
        return out

    def read(self, n: int) -> bytes:
        if n <= len(self._buf):
            return bytes(self._fill(n))
        out = bytearray(n)
        self.into(memoryview(out))
        return bytes(out)

    def into(self, view: memoryview) -> None:
        """Fill `view` (any contiguous buffer) from the stream: buffered bytes first, then
        straight from the socket."""
        view = view.cast("B")
        got = min(self._end - self._start, view.nbytes)
        view[:got] = self._view[self._start:self._start + got]
        self._start += got
        total = view.nbytes
        while got < total:
            n = self.sock.recv_into(view[got:], min(total - got, _CHUNK))
            if n == 0:
                raise PeerClosed(f"peer closed after {got} of {total} bytes")
            got += n

    def header(self) -> tuple[str, Any, int]:
        """A frame's prefix and header: (op, header, payload length), the header a dict
        (control messages), Parts or Ack; the caller must then consume exactly the
        payload. ConnectionError if the header is malformed (the stream cannot be
        trusted after it)."""
        head_len, payload_len = _PREFIX.unpack(self._fill(_PREFIX.size))
        if head_len > MAX_HEADER_BYTES:
            raise ConnectionError(f"frame header of {head_len} bytes: stream out of sync")
        head = self.read(head_len)
        kind = head[:1]
        if kind == b"P":
            return "parts", parse_parts(head), payload_len
        if kind == b"A":
            return "ack", parse_ack(head), payload_len
        try:
            header = json.loads(head)
            op = header.get("op")
        except (ValueError, AttributeError):
            raise ConnectionError(f"malformed frame header: {head[:80]!r}") from None
        return op, header, payload_len

    def frame(self) -> tuple[str, Any]:
        """A control frame, (op, header) (no payload expected; any payload is skipped)."""
        op, header, payload_len = self.header()
        self.discard(payload_len)
        return op, header

    def block_ids(self, lens: Sequence[int]) -> list[bytes]:
        """The int32 id lists that start a parts message's payload, as block_ids() made
        them (bytes: compared with ==, read as ints through memoryview(...).cast("i"))."""
        return [self.read(ID_BYTES * n) for n in lens]

    def payload(self, nbytes: int, pin_memory: bool = False) -> torch.Tensor:
        """`nbytes` of payload as a flat uint8 CPU tensor (pinned when headed for a GPU)."""
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin_memory)
        if nbytes:
            self.into(memoryview(buf.numpy()))
        return buf

    def discard(self, nbytes: int) -> None:
        while nbytes > 0:
            n = min(nbytes, len(self._buf))
            self._fill(n)
            nbytes -= n


Runs = tuple[tuple[int, int], ...]  # a part's direct runs: (offset into its block list, count)


@dataclass(frozen=True)
class Parts:
    """A parts message's header."""
    seq: int
    parts: list[tuple[str, int, int, Runs]]  # (tid, layer, index into dst_lens, runs), in wire order
    dst_lens: tuple[int, ...]  # ids in each destination list


@dataclass(frozen=True)
class Ack:
    seq: int
    failed: list[tuple[int, str]]  # (part index, reason) of each part discarded


def pack_parts(seq: int, parts: Sequence[tuple[str, int, int, Runs]], dst_lens: Sequence[int]) -> bytes:
    """The binary header of a parts message, as Parts lays it out. No checks: the
    receiver's parse_parts does them (tests build malformed headers with this)."""
    tids: dict[str, int] = {}
    rows: list[int] = []
    runs: list[int] = []
    for tid, layer, d, part_runs in parts:
        rows += (tids.setdefault(tid, len(tids)), layer, d, len(part_runs))
        for offset, count in part_runs:
            runs += (offset, count)
    names = [t.encode() for t in tids]
    return b"".join([_PARTS.pack(b"P", seq, len(dst_lens), len(parts), len(names)),
                     struct.pack(f"<{len(dst_lens) + len(rows) + len(runs)}I", *dst_lens, *rows, *runs),
                     *(struct.pack("<I", len(n)) + n for n in names)])


def parts_header(seq: int, parts: Sequence[tuple[str, int, bytes, Runs]]) -> tuple[bytes, list[memoryview]]:
    """A parts message's header and the block ids that start its payload, for parts
    given as (tid, layer, destination ids as block_ids() bytes, direct runs).
    Identical destination lists (every global layer of a step has the same) travel once."""
    dsts: dict[bytes, int] = {}
    rows = [(tid, layer, dsts.setdefault(dst, len(dsts)), runs) for tid, layer, dst, runs in parts]
    return pack_parts(seq, rows, [len(d) // ID_BYTES for d in dsts]), [memoryview(d) for d in dsts]


def parse_parts(head: bytes) -> Parts:
    """A parts header, checked: at least one part; every list non-empty; every list and
    tid index in range; each part's runs increasing, non-overlapping, of at least one
    block and inside its list; nothing left over. ConnectionError if it is malformed."""
    try:
        _, seq, num_lists, num_parts, num_tids = _PARTS.unpack_from(head)
        at = _PARTS.size
        lens = struct.unpack_from(f"<{num_lists}I", head, at)
        at += 4 * num_lists
        rows = struct.unpack_from(f"<{4 * num_parts}I", head, at)
        at += 16 * num_parts
        num_runs = sum(rows[3::4])
        flat_runs = struct.unpack_from(f"<{2 * num_runs}I", head, at)
        at += 8 * num_runs
        tids = []
        for _ in range(num_tids):
            (n,) = struct.unpack_from("<I", head, at)
            tids.append(head[at + 4:at + 4 + n].decode())
            at += 4 + n
        ok = at == len(head) and num_parts > 0 and all(lens)
        parts, r = [], 0
        for j in range(0, len(rows), 4):
            t, layer, d, k = rows[j:j + 4]
            ok = ok and t < num_tids and d < num_lists
            runs = tuple(zip(flat_runs[r:r + 2 * k:2], flat_runs[r + 1:r + 2 * k:2]))
            r += 2 * k
            end = 0
            for offset, count in runs:
                ok = ok and offset >= end and count >= 1
                end = offset + count
            ok = ok and end <= (lens[d] if d < num_lists else 0)
            if not ok:
                break
            parts.append((tids[t], layer, d, runs))
    except (struct.error, UnicodeDecodeError):
        ok = False
    if not ok:
        raise ConnectionError(f"malformed parts message header: {head[:80]!r}")
    return Parts(seq, parts, lens)


def pack_ack(seq: int, failed: Sequence[tuple[int, str]]) -> bytes:
    reasons = [(j, why.encode()) for j, why in failed]
    return b"".join([_ACK.pack(b"A", seq, len(reasons)),
                     *(struct.pack("<II", j, len(why)) + why for j, why in reasons)])


def parse_ack(head: bytes) -> Ack:
    try:
        _, seq, num_failed = _ACK.unpack_from(head)
        at, failed = _ACK.size, []
        for _ in range(num_failed):
            j, n = struct.unpack_from("<II", head, at)
            failed.append((j, head[at + 8:at + 8 + n].decode()))
            at += 8 + n
        if at != len(head):
            raise ValueError("trailing bytes")
    except (struct.error, UnicodeDecodeError, ValueError):
        raise ConnectionError(f"malformed ack header: {head[:80]!r}") from None
    return Ack(seq, failed)
