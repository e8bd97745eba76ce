"""One benchmark run, in process, against the fake OpenAI server: every request reported,
token counts matching the server's usage, warm-ups excluded, sessions sequential."""

import asyncio
import socket

import pytest

from loadtest.bench import ServerUnavailable, arun_benchmark
from loadtest.cli import config_from_argv
from tests.loadtest.fake_server import FakeServer


def bench(argv, **server_kwargs):
    async def main():
        server = await FakeServer(**server_kwargs).start()
        try:
            cfg = config_from_argv(["--base-url", server.url, "--disable-tqdm", *argv])
            return await arun_benchmark(cfg), server
        finally:
            await server.stop()

    return asyncio.run(main())


def test_every_request_is_reported_with_the_servers_token_counts():
    result, server = bench(["--num-prompts", "30", "--max-concurrency", "4", "--random-input-len", "12",
                            "--random-output-len", "6", "--random-range-ratio", "0.5", "--seed", "3",
                            "--goodput", "ttft:10000", "tpot:10000"])
    assert result["completed"] == 30 and result["failed"] == 0 and len(server.requests) == 30
    assert result["model_id"] == "fake-model" and result["max_concurrency"] == 4
    assert server.peak_in_flight <= 4 and result["max_concurrent_requests"] <= 4
    assert result["total_output_tokens"] == sum(r["max_tokens"] for r in server.requests)
    assert result["total_input_tokens"] == sum(len(r["prompt"]) for r in server.requests)
    assert sorted(result["input_lens"]) == sorted(len(r["prompt"]) for r in server.requests)
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])  # generous SLOs: all good
    for key in ("duration", "request_throughput", "output_throughput", "total_token_throughput", "mean_ttft_ms",
                "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p90_itl_ms", "std_e2el_ms", "ttfts", "itls"):
        assert key in result, key
    assert result["request_rate"] == "inf"


def test_warmups_are_sent_but_not_measured():
    result, server = bench(["--num-prompts", "5", "--num-warmups", "3", "--random-input-len", "8",
                            "--random-output-len", "2"])
    assert len(server.requests) == 8 and result["completed"] == 5
    warm, measured = server.requests[:3], server.requests[3:]
    assert not {tuple(r["prompt"]) for r in warm} & {tuple(r["prompt"]) for r in measured}


def test_session_turns_go_one_after_another():
    result, server = bench(["--dataset-name", "sessions", "--num-prompts", "12", "--session-turns", "3",
                            "--random-input-len", "10", "--session-turn-len", "4", "--random-output-len", "2",
                            "--max-concurrency", "8"])
    # the fake server answers 409 to a turn sent while the same session is busy
    assert result["completed"] == 12 and result["errors_by_kind"] == {}
    assert len({r["session_id"] for r in server.requests}) == 4
    # the server's usage counts the session's history: 10, then 10+2+4, then 16+2+4
    assert sorted(set(result["input_lens"])) == [10, 16, 22]


def test_failures_are_counted_by_kind_and_end_sessions():
    result, _ = bench(["--model", "overloaded", "--num-prompts", "6", "--random-input-len", "4",
                       "--random-output-len", "2"])
    assert result["completed"] == 0 and result["errors_by_kind"] == {"http_429": 6}
    result, server = bench(["--model", "overloaded", "--dataset-name", "sessions", "--session-turns", "3",
                            "--num-prompts", "6", "--random-input-len", "4", "--random-output-len", "2"])
    assert result["errors_by_kind"] == {"http_429": 2, "session_aborted": 4} and len(server.requests) == 2


def test_a_duration_bounds_the_run():
    result, server = bench(["--duration", "0.3", "--max-concurrency", "2", "--random-input-len", "4",
                            "--random-output-len", "3"])
    assert result["completed"] == len(server.requests) > 5 and result["failed"] == 0
    assert result["num_prompts"] is None and 0.3 <= result["duration"] < 1.0


def test_an_unreachable_server_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServerUnavailable, match="is the server up"):
        asyncio.run(arun_benchmark(config_from_argv(["--port", str(port), "--num-prompts", "1"])))


def test_flags_become_configs():
    cfg = config_from_argv(["--host", "10.0.0.1", "--port", "9", "--slo-ttft-ms", "300",
                            "--goodput", "tpot:40", "e2el:9000", "--metric-percentiles", "50,99.9"])
    assert cfg.client.base_url == "http://10.0.0.1:9" and cfg.num_prompts == 1000
    assert dict(cfg.slos_ms) == {"ttft": 300.0, "tpot": 40.0, "e2el": 9000.0}
    assert cfg.percentiles == (50.0, 99.9)
    cfg = config_from_argv(["--backend", "grpc", "--port", "50051", "--duration", "5", "--request-rate", "3",
                            "--num-prefixes", "2", "--prefix-repetition-prefix-len", "7"])
    assert cfg.client.base_url == "127.0.0.1:50051" and cfg.num_prompts is None
    assert cfg.arrivals.request_rate == 3.0 and cfg.workload.prefix_groups == 2 and cfg.workload.prefix_len == 7
    with pytest.raises(ValueError, match="max-concurrency"):
        config_from_argv(["--duration", "5"])  # endless requests all at once
