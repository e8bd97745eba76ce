"""wire.py on its own: the binary parts and ack headers round-trip and refuse malformed
input with ConnectionError; the buffered Reader returns exactly the bytes sent, however
the stream is cut into recv calls, and reports a peer that closed mid-frame."""

import random
import socket
import struct
import threading

import pytest
import torch

from kv_transfer import wire


def test_parts_round_trip_and_shared_lists():
    a, b = wire.block_ids([7, 8, 9, 3], "dst"), wire.block_ids([1, 2], "dst")
    parts = [("req-1", 0, a, ((0, 3),)), ("req-2", 1, b, ()), ("req-1", 2, bytes(a), ((0, 2), (2, 2))),
             ("ünï", 47, b, ((1, 1),)), ("x" * 70_000, 3, b, ())]
    head, ids = wire.parts_header(5, parts)
    assert [bytes(i) for i in ids] == [a, b]  # equal lists travel once
    got = wire.parse_parts(head)
    assert got.seq == 5 and got.dst_lens == (4, 2)
    assert got.parts == [("req-1", 0, 0, ((0, 3),)), ("req-2", 1, 1, ()), ("req-1", 2, 0, ((0, 2), (2, 2))),
                         ("ünï", 47, 1, ((1, 1),)), ("x" * 70_000, 3, 1, ())]


def test_ack_round_trip():
    for failed in ([], [(0, "transfer 't' failed: aborted"), (3, "ünïcode reason")]):
        assert wire.parse_ack(wire.pack_ack(2 ** 40, failed)) == wire.Ack(2 ** 40, failed)


@pytest.mark.parametrize("head", [
    wire.pack_parts(0, [], [1]),  # no part
    wire.pack_parts(0, [("t", 0, 0, ())], [0]),  # an empty list
    wire.pack_parts(0, [("t", 0, 1, ())], [3]),  # list index out of range
    wire.pack_parts(0, [("t", 0, 0, ((0, 4),))], [3]),  # run past the list's end
    wire.pack_parts(0, [("t", 0, 0, ((0, 2), (1, 2)))], [3]),  # overlapping runs
    wire.pack_parts(0, [("t", 0, 0, ((2, 1), (0, 1)))], [3]),  # runs out of order
    wire.pack_parts(0, [("t", 0, 0, ((0, 0),))], [3]),  # an empty run
    wire.pack_parts(0, [("t", 0, 0, ())], [3])[:-1],  # cut short
    wire.pack_parts(0, [("t", 0, 0, ())], [3]) + b"x",  # trailing bytes
    struct.pack("<cQIII", b"P", 0, 1, 1, 0) + struct.pack("<5I", 3, 0, 0, 0, 0),  # tid index, no tid
    struct.pack("<cQIII", b"P", 0, 2 ** 32 - 1, 1, 1),  # counts far beyond the header
])
def test_malformed_parts_headers_are_connection_errors(head):
    with pytest.raises(ConnectionError, match="malformed parts"):
        wire.parse_parts(head)


def test_malformed_ack_is_a_connection_error():
    good = wire.pack_ack(1, [(0, "why")])
    for bad in (good[:-1], good + b"!", good[:5]):
        with pytest.raises(ConnectionError, match="malformed ack"):
            wire.parse_ack(bad)


class Dribble:
    """The far end of a socket pair, writing what it is given in random small pieces."""

    def __init__(self, seed: int):
        self.ours, self.theirs = socket.socketpair()
        self.rng = random.Random(seed)

    def send(self, data: bytes) -> threading.Thread:
        def run():
            at = 0
            while at < len(data):
                n = self.rng.randint(1, 700)
                self.ours.sendall(data[at:at + n])
                at += n
        t = threading.Thread(target=run)
        t.start()
        return t


def frame_bytes(header, payload: bytes) -> bytes:
    a, b = socket.socketpair()
    with a, b:
        wire.send_frame(a, header, [memoryview(payload)])
        a.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := b.recv(1 << 16):
            out += chunk
        return out


@pytest.mark.parametrize("buffer", [32, 1 << 18])  # smaller than a header and the ids; the default
def test_reader_returns_exactly_what_was_sent(buffer):
    ids = [wire.block_ids(range(100), "d"), wire.block_ids([5, 4], "d")]
    head, _ = wire.parts_header(9, [("t", 0, ids[0], ((0, 100),)), ("t", 1, ids[1], ())])
    data = torch.randn(3, 1000)
    stream = (frame_bytes(head, b"".join(ids) + wire.tensor_bytes(data).tobytes())
              + frame_bytes({"op": "finish", "tid": "t", "num_layers": 2}, b"")
              + frame_bytes(wire.pack_ack(3, []), b"skipped" * 50)
              + frame_bytes({"op": "abort", "tid": "t"}, b""))
    d = Dribble(seed=buffer)
    writer = d.send(stream)
    r = wire.Reader(d.theirs, size=buffer)
    op, parts, n = r.header()
    assert op == "parts" and parts.seq == 9 and n == 4 * 102 + data.nbytes  # the ids, then the data
    assert r.block_ids(parts.dst_lens) == ids
    got = torch.empty_like(data)
    r.into(wire.tensor_bytes(got))
    assert torch.equal(got, data)
    assert r.frame() == ("finish", {"op": "finish", "tid": "t", "num_layers": 2})
    assert r.frame() == ("ack", wire.Ack(3, []))  # its payload skipped
    assert r.frame() == ("abort", {"op": "abort", "tid": "t"})
    writer.join()
    d.ours.close()
    with pytest.raises(wire.PeerClosed):
        r.header()


def test_reader_reports_a_peer_gone_mid_frame_and_bad_json():
    d = Dribble(seed=1)
    d.send(frame_bytes({"op": "hello"}, b"")[:-3]).join()
    d.ours.close()
    with pytest.raises(wire.PeerClosed):
        wire.Reader(d.theirs).frame()
    d = Dribble(seed=2)
    d.send(struct.pack("!IQ", 5, 0) + b"{nope").join()
    with pytest.raises(ConnectionError, match="malformed frame header"):
        wire.Reader(d.theirs).frame()
