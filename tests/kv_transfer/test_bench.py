"""bench/kv_transfer.py's code path, run on CPU with gloo (--cpu): every row is produced
and every tandem transfer ends DONE on both sides. The GPU numbers come from the GPU run."""

import json

import torch

from bench.kv_transfer import block_tables, coalesced_groups, main, plan
from kv_transfer.base import direct_runs


def test_plan_and_coalesced_groups():
    blocks = plan(tokens=9000, layers=4)  # 563 blocks; local layers keep the last chunk's 51
    assert blocks == {0: 51, 1: 51, 2: 51, 3: 563}
    kib64 = 64 << 10  # bytes of one block of one layer
    assert coalesced_groups(blocks, 200 * kib64, kib64) == [153 * kib64, 563 * kib64]
    assert coalesced_groups(blocks, 1, kib64) == [51 * kib64] * 3 + [563 * kib64]


def test_block_tables():
    consecutive = block_tables({0: 5, 1: 9, 2: 5}, "consecutive")
    assert consecutive == {5: ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]), 9: (list(range(9)), list(range(9)))}
    fragmented = block_tables({0: 50}, "fragmented")
    src, dst = fragmented[50]
    assert sorted(src) == sorted(dst) == list(range(50))
    assert direct_runs(torch.tensor(src), torch.tensor(dst), 2) == []  # every run is one block long
    assert block_tables({0: 50}, "fragmented") == fragmented  # both processes alike


def test_cpu_smoke_run(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["--cpu", "--tokens", "64", "--layers", "4", "--reps", "1", "--min-direct-blocks", "2",
                 "--profile", "--timeline", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["bytes"] == 4 * 4 * 512  # 4 blocks a layer, 512 B a block on CPU
    assert r["raw"]["per-layer"]["messages"] == 4 and r["raw"]["coalesced"]["messages"] == 1
    assert set(r["tandem"]) == {"fresh pool", "fresh pool, ungrouped", "fresh pool, writer thread only",
                                "fragmented pool"}
    for name, row in r["tandem"].items():
        assert row["states"] == [["DONE", "DONE"]] and row["s"] > 0
        assert {"send_layer", "_stage", "_await_data", "_write_part"} <= set(row["stages_s"])
        wall, cpu, calls = row["stages_s"]["send_layer"]
        assert wall > 0 and cpu > 0 and calls == 4
        assert row["device_allocs"] == {"sender": 0, "receiver": 0}  # no CUDA here
        for side, roles in (("sender", {"caller", "writer", "ack reader"}), ("receiver", {"reader", "completer"})):
            assert roles <= set(row["thread_cpu_s"][side]) and row["thread_cpu_s"][side]["caller"] >= 0
        # 16 blocks a transfer: every one direct from a fresh pool, every one staged from a fragmented one
        want = {"blocks_direct": 0, "blocks_staged": 16} if name == "fragmented pool" else \
            {"blocks_direct": 16, "blocks_staged": 0}
        assert row["blocks"] == {"sender": want, "receiver": want}
    assert "_gather" not in r["tandem"]["fresh pool"]["stages_s"]  # nothing staged: no gather at all
    assert r["tandem"]["fragmented pool"]["stages_s"]["_gather"][2] == 4
    printed = capsys.readouterr().out  # --profile on CPU: each thread's top functions, the transfer's own among them
    assert "receiver reader: own / with callees us" in printed and "(_on_parts)" in printed
    assert "sender writer: own / with callees us" in printed and "(_send_parts)" in printed
    assert "timeline of the last transfer" in printed and "receiver _take_data: " in printed
