"""Peers in real processes (tests/kv_transfer/peer.py): exact data, and peers killed
mid-transfer, over TCP and over the NCCL control flow with a gloo data plane."""

import time

import pytest
import torch

from kv_transfer import TcpSender, TransferStatus as S
from tests.kv_transfer.helpers import (BACKENDS, Peer, check_written, dst_of, eventually, layout_of, make_caches, make_plan,
                                       plan_to_json, run_plan)


@pytest.fixture
def peers():
    started = []
    yield lambda *args: started.append(Peer(*args)) or started[-1]
    for p in started:
        p.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_receiver_process_gets_exact_data(peers, tmp_path, dtype):
    src = make_caches(getattr(torch, dtype), seed=21)
    plan = make_plan(seed=21, n=7)
    rx = peers("receiver", dtype, plan_to_json(plan), str(tmp_path / "caches.pt"))
    address = rx.expect_line("ADDRESS")
    with TcpSender(layout_of(src), src) as tx:
        for layer, (s, d) in plan.items():
            tx.send_layer(address, "t", layer, s, d)
        tx.finish(address, "t", len(plan))
        assert tx.wait("t", 15) == S.DONE, tx.reason("t")
    assert int(rx.expect_line("STATUS")) == S.DONE
    got = torch.load(tmp_path / "caches.pt")
    check_written(got, make_caches(getattr(torch, dtype), seed=None), src, [plan])


@pytest.mark.parametrize("backend", BACKENDS)
def test_receiver_killed_mid_transfer_sender_fails(peers, tmp_path, backend):
    src = make_caches(torch.float32, seed=22)
    plan = make_plan(seed=22)
    rx = peers("receiver", "float32", plan_to_json(plan), str(tmp_path / "unused.pt"), backend)
    address = rx.expect_line("ADDRESS")
    with BACKENDS[backend][0](layout_of(src), src) as tx:
        for layer in (0, 1):
            tx.send_layer(address, "t", layer, *plan[layer])
        eventually(lambda: tx.stats()["layers_acked"] == 2, what="two acks")
        rx.kill()
        t0 = time.monotonic()
        for layer in (2, 3):
            tx.send_layer(address, "t", layer, *plan[layer])
        if tx.poll("t") != S.FAILED:
            tx.finish(address, "t", 4)
        assert tx.wait("t", 10) == S.FAILED
        assert time.monotonic() - t0 < 10
        assert address in tx.reason("t")  # "connection to ADDR lost" or "cannot reach ... at ADDR"
        # a later transfer to the dead address fails cleanly too, without hanging
        tx.send_layer(address, "t2", 0, *plan[0])
        assert tx.wait("t2", 10) == S.FAILED and address in tx.reason("t2")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["staged", "direct"])
def test_sender_killed_mid_transfer_receiver_fails(peers, backend, path):
    """direct: the plan has runs of 4 blocks, which go direct (min_direct_blocks 2)."""
    dst = make_caches(torch.bfloat16, seed=None)
    before = [c.clone() for c in dst]
    plan = make_plan(seed=23) if path == "staged" else run_plan(23, lengths=(4, 1, 4))
    with BACKENDS[backend][1](layout_of(dst), dst) as rx:
        rx.expect("t", dst_of(plan))
        tx = peers("sender", "bfloat16", "23", plan_to_json(plan), rx.address, "2", backend,
                   *(["2"] if path == "direct" else []))
        tx.expect_line("SENT")
        assert rx.poll("t") == S.TRANSFERRING
        tx.kill()
        assert rx.wait("t", 10) == S.FAILED
        assert "disconnected" in rx.reason("t")
        t0 = time.monotonic()
        rx.abort("t")  # nothing can be landing: returns at once
        assert time.monotonic() - t0 < 1
        # the two layers that arrived are complete; the others were never touched
        src = make_caches(torch.bfloat16, seed=23)
        check_written(dst, before, src, [plan], layers_written={0, 1})
        stats = rx.stats()
        assert stats["transfers_failed"] == 1 and stats["connections"] == 0
        assert stats["blocks_direct"] == (16 if path == "direct" else 0)
