"""The committed stubs are what protoc generates from the committed .proto files, and
sampling parameters survive the trip through protobuf."""

import filecmp
from pathlib import Path

from engine.sampling import SamplingParams
from protos.convert import sampling_from_pb, sampling_to_pb
from protos.generate import ROOT, generate


def test_regeneration_changes_nothing(tmp_path):
    generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "protoc wrote nothing"
    for rel in fresh:
        assert filecmp.cmp(tmp_path / rel, ROOT / rel, shallow=False), f"{rel} is stale: run python -m protos.generate"


def test_sampling_params_round_trip():
    for p in [SamplingParams(), SamplingParams(max_tokens=7, temperature=0.0, top_p=0.5, top_k=3, min_p=0.1, seed=9,
                                               stop=("a", "bc"), stop_token_ids=(4, 5), ignore_eos=True,
                                               include_stop_str_in_output=True, logprobs=0, skip_special_tokens=False)]:
        back = sampling_from_pb(sampling_to_pb(p))
        assert back == SamplingParams(**{**p.__dict__, "temperature": back.temperature, "top_p": back.top_p,
                                         "min_p": back.min_p})
        assert abs(back.temperature - p.temperature) < 1e-6 and abs(back.top_p - p.top_p) < 1e-6
