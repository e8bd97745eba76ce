"""The load-testing harness against the real CPU stack: every request is reported, and
its token counts are the server's own (checked against the gateway's counters)."""

import re

import httpx
import pytest

from loadtest.bench import run_benchmark
from loadtest.cli import config_from_argv

from .conftest import API_KEY


def counters(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics").text
    out = {}
    for name in ("tandem_prompt_tokens_total", "tandem_generation_tokens_total",
                 'tandem_requests_total{outcome="finished"}'):
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


@pytest.mark.parametrize("backend", ["openai", "grpc"])
def test_bench_serve_against_the_stack(stack, backend):
    before = counters(stack.base_url)
    url = stack.base_url if backend == "openai" else stack.grpc_address
    cfg = config_from_argv(["--base-url", url, "--backend", backend, "--api-key", API_KEY, "--num-prompts", "30",
                            "--random-input-len", "24", "--random-output-len", "6", "--max-concurrency", "6",
                            "--request-rate", "inf", "--vocab-size", "5000", "--seed", "7", "--disable-tqdm"])
    res = run_benchmark(cfg)
    after = counters(stack.base_url)
    assert res["completed"] == 30 and res["failed"] == 0, res.get("errors_by_kind")
    assert res["total_output_tokens"] == 30 * 6
    assert res["total_output_tokens"] == after["tandem_generation_tokens_total"] - before["tandem_generation_tokens_total"]
    assert res["total_input_tokens"] == after["tandem_prompt_tokens_total"] - before["tandem_prompt_tokens_total"]
    assert after['tandem_requests_total{outcome="finished"}'] - before['tandem_requests_total{outcome="finished"}'] == 30
    assert 0 < res["median_ttft_ms"] <= res["p99_ttft_ms"] and res["mean_tpot_ms"] > 0
