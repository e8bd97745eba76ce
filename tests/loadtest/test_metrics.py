"""The metric code on synthetic timings whose statistics are known by hand."""

import math

import numpy as np
import pytest

from loadtest.clients import RequestRecord
from loadtest.metrics import (compute_metrics, format_result, parse_goodput, parse_percentiles, peak_concurrency,
                              percentile_key)


def synthetic(n: int = 100) -> list[RequestRecord]:
    """Request i (1..n): TTFT i ms, 11 output tokens arriving 2i ms apart (TPOT = ITL = 2i ms),
    so E2E = i + 10 * 2i = 21i ms; 10 prompt tokens each."""
    recs = []
    for i in range(1, n + 1):
        ttft, gap = i / 1000, 2 * i / 1000
        recs.append(RequestRecord(success=True, prompt_len=10, output_tokens=11, ttft=ttft, itl=[gap] * 10,
                                  latency=ttft + 10 * gap, start_time=float(i)))
    return recs


def failures() -> list[RequestRecord]:
    out = []
    for kind in ("http_500", "http_500", "ClientPayloadError"):
        r = RequestRecord(prompt_len=10, start_time=0.5, latency=0.1)
        r.fail(kind, "boom")
        out.append(r)
    return out


def test_latency_statistics_match_hand_computed_values():
    res = compute_metrics(synthetic() + failures(), duration=10.0, percentiles=(90, 99))
    # TTFT 1..100 ms: mean = median = 50.5; linear p90 at rank 89.1 -> 90.1; p99 at rank 98.01 -> 99.01
    assert res["mean_ttft_ms"] == pytest.approx(50.5)
    assert res["median_ttft_ms"] == pytest.approx(50.5)
    assert res["p90_ttft_ms"] == pytest.approx(90.1)
    assert res["p99_ttft_ms"] == pytest.approx(99.01)
    assert res["std_ttft_ms"] == pytest.approx(math.sqrt((100 ** 2 - 1) / 12))  # population std of 1..100
    # TPOT = (E2E - TTFT) / 10 = 2i ms: 2 x the TTFT statistics
    assert res["median_tpot_ms"] == pytest.approx(101.0)
    assert res["p90_tpot_ms"] == pytest.approx(180.2)
    assert res["p99_tpot_ms"] == pytest.approx(198.02)
    # ITL pools 1000 gaps (2i ms, ten each): median between ranks 499 (i=50 -> 100) and 500 (i=51 -> 102)
    assert res["median_itl_ms"] == pytest.approx(101.0)
    assert res["p99_itl_ms"] == pytest.approx(198.0 + 0.01 * 2)  # rank 989.01: 198 then 200
    assert res["mean_itl_ms"] == pytest.approx(101.0)
    # E2E = 21i ms
    assert res["median_e2el_ms"] == pytest.approx(21 * 50.5)
    assert res["p99_e2el_ms"] == pytest.approx(21 * 99.01)


def test_counts_throughput_and_errors():
    res = compute_metrics(synthetic() + failures(), duration=10.0)
    assert res["completed"] == 100 and res["failed"] == 3
    assert res["total_input_tokens"] == 1000  # failed requests' prompts are not counted
    assert res["total_output_tokens"] == 1100
    assert res["request_throughput"] == pytest.approx(10.0)
    assert res["output_throughput"] == pytest.approx(110.0)
    assert res["total_token_throughput"] == pytest.approx(210.0)
    assert res["errors_by_kind"] == {"http_500": 2, "ClientPayloadError": 1}
    assert res["request_goodput"] is None  # no SLOs given
    # per-request arrays, in sending order, vLLM's conventions for failures
    assert len(res["ttfts"]) == len(res["errors"]) == len(res["output_lens"]) == 103
    assert res["output_lens"][-1] == 0 and res["ttfts"][-1] == 0.0 and res["errors"][-1] == "boom"
    assert res["errors"][0] == "" and res["itls"][0] == [0.002] * 10
    assert res["tpots"][0] == pytest.approx(0.002) and res["tpots"][-1] is None


def test_goodput_counts_exactly_the_requests_within_every_slo():
    recs = synthetic()
    # TTFT <= 40.5 ms keeps i <= 40; TPOT (2i ms) <= 60.5 keeps i <= 30: 30 good requests
    res = compute_metrics(recs, duration=10.0, slos_ms=parse_goodput(["ttft:40.5", "tpot:60.5"]))
    assert res["good_requests"] == 30 and res["request_goodput"] == pytest.approx(3.0)
    # E2E 21i ms <= 220 keeps i <= 10
    res = compute_metrics(recs, duration=10.0, slos_ms={"e2el": 220.0})
    assert res["good_requests"] == 10 and res["request_goodput"] == pytest.approx(1.0)
    # failed requests are never good; a one-token request has no TPOT and passes a TPOT SLO
    one = RequestRecord(success=True, prompt_len=3, output_tokens=1, ttft=0.001, latency=0.001)
    res = compute_metrics(failures() + [one], duration=1.0, slos_ms={"tpot": 0.5, "ttft": 5})
    assert res["good_requests"] == 1 and res["completed"] == 1


def test_no_successful_request_still_gives_every_key():
    res = compute_metrics(failures(), duration=2.0, percentiles=(50, 99.9))
    assert res["completed"] == 0 and res["mean_ttft_ms"] == 0.0 and res["p99.9_itl_ms"] == 0.0
    assert "p50_e2el_ms" in res


def test_percentile_keys_and_parsing():
    assert percentile_key(99) == "p99" and percentile_key(99.9) == "p99.9" and percentile_key(50.0) == "p50"
    assert parse_percentiles("50, 90,99.9") == (50.0, 90.0, 99.9)
    for bad in ("", "abc", "0", "101"):
        with pytest.raises(ValueError, match="metric_percentiles"):
            parse_percentiles(bad)
    assert np.percentile(np.arange(1, 101), 99) == pytest.approx(99.01)  # linear, as the metrics use


@pytest.mark.parametrize("bad", ["ttft", "itl:10", "ttft:abc", "tpot:-1", "e2el:inf"])
def test_goodput_parsing_rejects_bad_slos(bad):
    with pytest.raises(ValueError, match="goodput"):
        parse_goodput([bad])
    assert parse_goodput(["TTFT:200", "e2el:1e3"]) == {"ttft": 200.0, "e2el": 1000.0}


def test_peak_concurrency():
    def rec(start, length):
        return RequestRecord(success=True, start_time=start, latency=length)

    # [0,3) [1,2) [1.5,4) overlap 3 deep at 1.5; [4,5) starts as the last one ends
    assert peak_concurrency([rec(0, 3), rec(1, 1), rec(1.5, 2.5), rec(4, 1)]) == 3
    assert peak_concurrency([]) == 0


def test_table_shows_the_metrics_and_errors():
    res = compute_metrics(synthetic() + failures(), duration=10.0, slos_ms={"ttft": 40.5})
    text = format_result(res, (90, 99))
    for line in ("Successful requests:", "Failed requests:", "Request goodput (req/s):", "Mean TTFT (ms):",
                 "P99 TTFT (ms):", "Median TPOT (ms):", "P90 ITL (ms):", "P99 E2EL (ms):", "http_500:"):
        assert line in text
    assert "99.01" in text
