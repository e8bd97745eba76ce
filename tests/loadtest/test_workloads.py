"""Request generators: lengths, seeds, shared prefixes, sessions, JSONL replay and its errors."""

import json

import numpy as np
import pytest

from loadtest.workloads import (TOKEN_ID_FLOOR, Job, WorkloadConfig, load_jsonl, make_workload, num_requests,
                                sample_lengths, take)


def lengths(jobs):
    return [len(r.prompt) for j in jobs for r in j.requests], [r.output_len for j in jobs for r in j.requests]


def test_random_fixed_lengths_and_token_range():
    jobs = take(make_workload(WorkloadConfig(input_len=37, output_len=5, vocab_size=500)), 50)
    ins, outs = lengths(jobs)
    assert len(jobs) == 50 and set(ins) == {37} and set(outs) == {5}
    ids = [t for j in jobs for t in j.requests[0].prompt]
    assert min(ids) >= TOKEN_ID_FLOOR and max(ids) < 500
    assert len(set(ids)) > 300  # really random, not a constant


def test_uniform_lengths_cover_the_range_ratio():
    cfg = WorkloadConfig(input_len=100, output_len=20, range_ratio=0.5)
    assert cfg.distribution("input") == "uniform"  # a range ratio implies uniform, as in vLLM
    ins, outs = lengths(take(make_workload(cfg), 2000))
    assert 50 <= min(ins) < 55 and 145 < max(ins) <= 150
    assert 10 <= min(outs) and max(outs) <= 30
    assert abs(np.mean(ins) - 100) < 3


def test_lognormal_lengths_have_the_given_mean_and_a_right_tail():
    rng = np.random.default_rng(0)
    xs = sample_lengths("lognormal", 200, 20000, rng, sigma=0.5)
    assert abs(xs.mean() - 200) < 4 and xs.min() >= 1
    assert np.median(xs) < xs.mean() < np.percentile(xs, 99) / 1.5  # skewed right


def test_a_seed_fixes_the_whole_workload():
    cfg = WorkloadConfig(input_len=20, output_len=8, range_ratio=0.3, input_len_distribution="lognormal")
    a, b = take(make_workload(cfg), 30), take(make_workload(cfg), 30)
    assert a == b
    other = take(make_workload(WorkloadConfig(input_len=20, output_len=8, range_ratio=0.3,
                                              input_len_distribution="lognormal", seed=1)), 30)
    assert other != a


def test_shared_prefix_groups_really_share_their_prefix():
    cfg = WorkloadConfig(dataset_name="shared-prefix", prefix_groups=3, prefix_len=16, input_len=4, output_len=2)
    jobs = take(make_workload(cfg), 300)
    prompts = [j.requests[0].prompt for j in jobs]
    assert {len(p) for p in prompts} == {20}
    prefixes = {p[:16] for p in prompts}
    assert len(prefixes) == 3  # every group used, no other prefix
    assert len({p[16:] for p in prompts}) > 250  # suffixes differ


def test_sessions_have_k_turns_sharing_a_session_id():
    cfg = WorkloadConfig(dataset_name="sessions", session_turns=4, input_len=30, session_turn_len=6, output_len=3)
    jobs = take(make_workload(cfg, session_prefix="run1"), 10)
    assert [len(j.requests) for j in jobs] == [4, 4, 2]  # cut so that exactly 10 requests are sent
    assert num_requests(jobs) == 10
    for j in jobs:
        assert len({r.session_id for r in j.requests}) == 1 and j.requests[0].session_id.startswith("run1-")
        assert len(j.requests[0].prompt) == 30 and all(len(r.prompt) == 6 for r in j.requests[1:])
    assert len({j.requests[0].session_id for j in jobs}) == 3


def write(tmp_path, lines):
    p = tmp_path / "reqs.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_jsonl_replay_reads_prompts_ids_and_timestamps(tmp_path):
    p = write(tmp_path, [
        json.dumps({"prompt": "hello there", "output_len": 4, "timestamp": 0.5}),
        "",
        json.dumps({"prompt_ids": [1, 2, 3], "output_len": 2, "timestamp": 0.1, "session_id": "a"}),
    ])
    jobs = load_jsonl(p)
    assert [j.timestamp for j in jobs] == [0.1, 0.5]  # sorted by time
    assert jobs[0].requests[0].prompt == (1, 2, 3) and jobs[0].requests[0].session_id == "a"
    assert jobs[1].requests[0].prompt == "hello there" and jobs[1].requests[0].prompt_len is None
    # through make_workload, session ids get the run's prefix (a later run must not extend them)
    via = list(make_workload(WorkloadConfig(dataset_name="jsonl", dataset_path=str(p)), session_prefix="r9"))
    assert via[0].requests[0].session_id == "r9-a"


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x"}', "line 2: missing field 'output_len'"),
    ('{"output_len": 3}', "line 2: missing field 'prompt'"),
    ('{"prompt": "x", "output_len": -1}', "line 2: 'output_len' must be a positive integer"),
    ('{"prompt_ids": [1, "a"], "output_len": 1}', "line 2: 'prompt_ids'"),
    ('{"prompt": "x", "prompt_ids": [1], "output_len": 1}', "line 2: give 'prompt' or 'prompt_ids'"),
    ('{"prompt": "x", "output_len": 1, "timestamp": -2}', "line 2: 'timestamp'"),
    ('{"prompt": "x", "output_len": 1', "line 2: not valid JSON"),
])
def test_jsonl_errors_name_the_line_and_field(tmp_path, line, message):
    p = write(tmp_path, ['{"prompt": "ok", "output_len": 1}', line])
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        load_jsonl(p)


def test_jsonl_half_timed_and_missing_files(tmp_path):
    p = write(tmp_path, ['{"prompt": "a", "output_len": 1, "timestamp": 1}', '{"prompt": "b", "output_len": 1}'])
    with pytest.raises(ValueError, match="timestamp.*request 2"):
        load_jsonl(p)
    with pytest.raises(FileNotFoundError, match="dataset_path"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no requests"):
        load_jsonl(write(tmp_path, [""]))


@pytest.mark.parametrize("kwargs, field", [
    ({"input_len": -1}, "input_len"), ({"output_len": 0}, "output_len"), ({"range_ratio": 1.0}, "range_ratio"),
    ({"input_len_distribution": "zipf"}, "input_len_distribution"), ({"vocab_size": 50}, "vocab_size"),
    ({"dataset_name": "jsonl"}, "dataset_path"), ({"dataset_name": "nope"}, "dataset_name"),
    ({"session_turns": 0}, "session_turns"), ({"prefix_len": -3}, "prefix_len"),
])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        WorkloadConfig(**kwargs)
    with pytest.raises(ValueError, match="num_prompts"):
        take(iter([Job(())]), -1)
