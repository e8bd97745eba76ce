"""bench/kv_transfer.py's code path, run on CPU with gloo (--cpu): every row is produced
and every tandem transfer ends DONE on both sides. The GPU numbers come from the GPU run."""

import json

from bench.kv_transfer import coalesced_groups, main, plan


def test_plan_and_coalesced_groups():
    blocks = plan(tokens=9000, layers=4)  # 563 blocks; local layers keep the last chunk's 51
    assert blocks == {0: 51, 1: 51, 2: 51, 3: 563}
    kib64 = 64 << 10  # bytes of one block of one layer
    assert coalesced_groups(blocks, cap=200 * kib64) == [153 * kib64, 563 * kib64]
    assert coalesced_groups(blocks, cap=1) == [51 * kib64] * 3 + [563 * kib64]


def test_cpu_smoke_run(tmp_path):
    out = tmp_path / "results.json"
    assert main(["--cpu", "--tokens", "64", "--layers", "4", "--reps", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["bytes"] == 4 * 4 * (64 << 10)
    assert r["raw"]["per-layer"]["messages"] == 4 and r["raw"]["coalesced"]["messages"] == 1
    assert set(r["tandem"]) == {"coalescing on", "coalescing off"}
    for row in r["tandem"].values():
        assert row["states"] == [["DONE", "DONE"]] and row["s"] > 0
        assert {"send_layer", "_gather", "_await_data", "_write_part"} <= set(row["stages_s"])
        wall, cpu, calls = row["stages_s"]["send_layer"]
        assert wall > 0 and cpu > 0 and calls == 4
        assert row["device_allocs"] == {"sender": 0, "receiver": 0}  # no CUDA here
    assert r["tandem"]["coalescing off"]["messages"] == 4
