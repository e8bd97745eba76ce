"""Framing on a TCP stream: `!IQ` prefix (header length, payload length), a JSON header,
then `payload length` raw bytes. Used by every backend's control plane and by the TCP
backend's data plane.

Messages (header "op"):
  sender -> receiver
    hello   {layout, data_plane, proto}   first message on a connection
    parts   {seq, parts: [[tid, layer, d(, runs)], ...], dst_lens: [n_0, n_1, ...]}
            one message carries one or more *parts*: a part is one send_layer call,
            the layer's n blocks. Parts of several transfers may share a message.
            Destination block ids travel as binary, not JSON: the payload starts with
            the distinct destination lists back to back as native int32 (list i has
            dst_lens[i] ids); part j writes into list parts[j][2], so its block count n
            is that list's length.
            runs (present only when non-empty): the part's DIRECT runs, [[offset,
            count], ...] in increasing order, non-overlapping: positions
            offset..offset+count-1 of the part's list, whose source and destination
            ids both step by one. Every other block is STAGED. The sender decides;
            the receiver checks that each run's destination ids are consecutive.
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
    ack     {seq, failed: [[j, reason], ...]}  one per parts message, in message order:
            part j of message seq was discarded for reason (its transfer failed);
            every part not listed was written into the receiver's cache
    finish_ack {tid, status, reason}
"""

from __future__ import annotations

import array
import json
import socket
import struct
from typing import Any, Sequence

import torch

PROTO_VERSION = 3  # 2: coalesced parts messages, binary block ids; 3: direct runs
_PREFIX = struct.Struct("!IQ")
MAX_HEADER_BYTES = 64 << 20  # a header lists block ids; 64 MiB is far beyond any real one
_CHUNK = 8 << 20  # bytes per recv call
HANDSHAKE_TIMEOUT_S = 30.0
ID_BYTES = 4  # block ids travel as native int32 (array "i", torch.int32)


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


def send_frame(sock: socket.socket, header: dict[str, Any], payload: Sequence[memoryview] = ()) -> int:
    """Write one frame whose payload is the `payload` views back to back; returns the
    bytes written. Callers serialize writers per socket."""
    head = json.dumps(header, separators=(",", ":")).encode()
    n = sum(p.nbytes for p in payload)
    sock.sendall(_PREFIX.pack(len(head), n) + head)
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


def recv_block_ids(sock: socket.socket, lens: Sequence[int]) -> list[torch.Tensor]:
    """Read the int32 id lists that start a parts message's payload; one CPU tensor each."""
    flat = torch.empty(sum(lens), dtype=torch.int32)
    if flat.numel():
        recv_exact_into(sock, memoryview(flat.numpy()))
    return list(flat.split(list(lens)))


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    view = view.cast("B")
    got, total = 0, view.nbytes
    while got < total:
        n = sock.recv_into(view[got:], min(total - got, _CHUNK))
        if n == 0:
            raise PeerClosed(f"peer closed after {got} of {total} bytes")
        got += n


def recv_header(sock: socket.socket) -> tuple[dict[str, Any], int]:
    """Read a frame's prefix and header; the caller must then consume exactly the payload."""
    prefix = bytearray(_PREFIX.size)
    recv_exact_into(sock, memoryview(prefix))
    head_len, payload_len = _PREFIX.unpack(prefix)
    if head_len > MAX_HEADER_BYTES:
        raise ConnectionError(f"frame header of {head_len} bytes: stream out of sync")
    head = bytearray(head_len)
    recv_exact_into(sock, memoryview(head))
    return json.loads(head), payload_len


def recv_payload(sock: socket.socket, nbytes: int, pin_memory: bool = False) -> torch.Tensor:
    """The payload as a flat uint8 CPU tensor (pinned when it is headed for a GPU)."""
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin_memory)
    if nbytes:
        recv_exact_into(sock, memoryview(buf.numpy()))
    return buf


def discard(sock: socket.socket, nbytes: int) -> None:
    scratch = memoryview(bytearray(min(nbytes, _CHUNK) or 1))
    while nbytes > 0:
        n = min(nbytes, scratch.nbytes)
        recv_exact_into(sock, scratch[:n])
        nbytes -= n


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    """A control frame (no payload expected); any payload is skipped."""
    header, payload_len = recv_header(sock)
    discard(sock, payload_len)
    return header


Runs = list[tuple[int, int]]  # a part's direct runs: (offset into its block list, count)


def parts_header(seq: int, parts: Sequence[tuple[str, int, bytes, Runs]]) -> tuple[dict[str, Any], list[memoryview]]:
    """A parts message's header and the block ids that start its payload, for parts
    given as (tid, layer, destination ids as block_ids() bytes, direct runs).
    Identical destination lists (every global layer of a step has the same) travel once."""
    dsts: dict[bytes, int] = {}
    rows = []
    for tid, layer, dst, runs in parts:
        row = [tid, layer, dsts.setdefault(dst, len(dsts))]
        if runs:
            row.append([list(r) for r in runs])
        rows.append(row)
    header = {"op": "parts", "seq": seq, "parts": rows, "dst_lens": [len(d) // ID_BYTES for d in dsts]}
    return header, [memoryview(d) for d in dsts]


def _runs_ok(runs: Any, n: int) -> bool:
    """Increasing, non-overlapping [offset, count] pairs inside a list of n ids."""
    if not isinstance(runs, list) or not runs:
        return False
    end = 0
    for r in runs:
        if not (isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)):
            return False
        offset, count = r
        if offset < end or count < 1:
            return False
        end = offset + count
    return end <= n


def parse_parts_header(header: dict[str, Any]) -> tuple[int, list[tuple[str, int, int, Runs]], list[int]]:
    """(seq, [(tid, layer, dst list index, runs)], dst_lens) of a parts header;
    ConnectionError if it is malformed (the stream cannot be trusted after that)."""
    try:
        seq, lens = header["seq"], header["dst_lens"]
        ok = isinstance(seq, int) and all(isinstance(n, int) and n > 0 for n in lens)
        rows = []
        for row in header["parts"]:
            tid, layer, d, *rest = row
            ok = ok and (isinstance(tid, str) and isinstance(layer, int) and isinstance(d, int)
                         and 0 <= d < len(lens) and len(rest) <= 1 and (not rest or _runs_ok(rest[0], lens[d])))
            rows.append((tid, layer, d, [tuple(r) for r in rest[0]] if rest and ok else []))
        ok = ok and bool(rows)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ConnectionError(f"malformed parts message: {str(header)[:200]}")
    return seq, rows, lens
