"""From request records to results: latency statistics, throughput, goodput, errors.

Definitions (the same as `vllm bench serve`, and so are the result's keys):

    TTFT  send -> first token arrival                      one value per successful request
    TPOT  (e2e - TTFT) / (output_tokens - 1)               one value per successful request
                                                           with more than one output token
    ITL   gap between consecutive token arrivals           every gap of every successful request
    E2EL  send -> end of the stream                        one value per successful request

Percentiles are numpy's linear ones, reported in milliseconds. Throughputs divide by the
benchmark's wall duration. A request counts towards goodput when it succeeded and meets
every SLO given (TTFT, TPOT and/or E2EL, in ms); a one-token request has no TPOT and
passes a TPOT SLO, as in vLLM. Failed requests count in `failed` and `errors_by_kind`,
not in any latency or token total.

The per-request arrays (`input_lens`, `output_lens`, `ttfts`, `itls`, `errors`, ...) are
in seconds and in sending order; a failed request has output length 0 and TTFT 0.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from loadtest.clients import RequestRecord

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")  # ITL has no per-request value to judge
_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
           "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


def parse_goodput(items: Iterable[str]) -> dict[str, float]:
    """["ttft:200", "tpot:50"] -> {"ttft": 200.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"goodput: expected METRIC:MS with METRIC one of {SLO_METRICS}, got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"goodput: {name}'s SLO must be a number of ms, got {value!r}") from None
        if not (ms >= 0 and math.isfinite(ms)):
            raise ValueError(f"goodput: {name}'s SLO must be >= 0 ms, got {value!r}")
        slos[name] = ms
    return slos


def parse_percentiles(text: str) -> tuple[float, ...]:
    """"90,99" -> (90.0, 99.0); each in (0, 100]."""
    try:
        ps = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"metric_percentiles: expected comma-separated numbers, got {text!r}") from None
    if not ps or any(not 0 < p <= 100 for p in ps):
        raise ValueError(f"metric_percentiles: each must be in (0, 100], got {text!r}")
    return ps


def percentile_key(p: float) -> str:
    """99 -> "p99", 99.9 -> "p99.9" (vLLM's key spelling)."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def request_tpot(rec: RequestRecord) -> float | None:
    """Seconds per output token after the first; None when there is none after the first."""
    if not rec.success or rec.output_tokens <= 1:
        return None
    return (rec.latency - rec.ttft) / (rec.output_tokens - 1)


def meets_slos(rec: RequestRecord, slos_ms: dict[str, float]) -> bool:
    if not rec.success:
        return False
    values_ms = {"ttft": rec.ttft * 1000, "tpot": (request_tpot(rec) or 0.0) * 1000, "e2el": rec.latency * 1000}
    return all(values_ms[name] <= slo for name, slo in slos_ms.items())


def latency_stats(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    """mean/median/std and the percentiles of `values_s`, in ms, under vLLM's key names.
    No values gives zeros (vLLM does the same), so the keys are always there."""
    ms = np.asarray(values_s, dtype=np.float64) * 1000 if len(values_s) else np.zeros(1)
    out = {f"mean_{name}_ms": float(np.mean(ms)), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(np.std(ms))}
    for p in percentiles:
        out[f"{percentile_key(p)}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """The most requests in flight at once, from their start and end times."""
    events = sorted([(r.start_time, 1) for r in records] + [(r.start_time + r.latency, -1) for r in records],
                    key=lambda e: (e[0], e[1]))  # at a tie, an end before a start
    peak = now = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


def compute_metrics(records: Sequence[RequestRecord], duration: float, *,
                    percentiles: Sequence[float] = (90, 99), slos_ms: dict[str, float] | None = None) -> dict:
    """The result of one run: `records` in sending order, `duration` its wall time in seconds."""
    if duration <= 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    ok = [r for r in records if r.success]
    tpots = [request_tpot(r) for r in records]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    result: dict = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "total_cached_tokens": sum(cached) if cached else None,
        "request_throughput": len(ok) / duration,
        "request_goodput": None,
        "good_requests": None,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "max_concurrent_requests": peak_concurrency(records),
    }
    if slos_ms:
        good = sum(meets_slos(r, slos_ms) for r in ok)
        result["request_goodput"] = good / duration
        result["good_requests"] = good
    samples = {"ttft": [r.ttft for r in ok], "tpot": [t for t in tpots if t is not None],
               "itl": [gap for r in ok for gap in r.itl], "e2el": [r.latency for r in ok]}
    for name in METRICS:
        result.update(latency_stats(name, samples[name], percentiles))
    result["errors_by_kind"] = dict(Counter(r.error for r in records if not r.success))
    t0 = min((r.start_time for r in records), default=0.0)
    result.update({
        "input_lens": [r.prompt_len for r in records],
        "output_lens": [r.output_tokens if r.success else 0 for r in records],
        "cached_lens": [r.cached_tokens for r in records],
        "ttfts": [r.ttft if r.success else 0.0 for r in records],
        "tpots": tpots,
        "itls": [list(r.itl) if r.success else [] for r in records],
        "e2els": [r.latency if r.success else 0.0 for r in records],
        "start_times": [r.start_time - t0 for r in records],
        "errors": [r.error_message or r.error if not r.success else "" for r in records],
        "error_kinds": [r.error for r in records],
        "generated_texts": [r.generated_text for r in records],
    })
    return result


def _line(label: str, value) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    return f"{label:<40}{value:<10}"


def format_result(result: dict, percentiles: Sequence[float], title: str = "Serving Benchmark Result") -> str:
    """A readable table of `result`, laid out like vllm bench serve's."""
    width = 50
    rows = [f" {title} ".center(width, "="),
            _line("Successful requests:", result["completed"]),
            _line("Failed requests:", result["failed"]),
            _line("Benchmark duration (s):", result["duration"]),
            _line("Total input tokens:", result["total_input_tokens"]),
            _line("Total generated tokens:", result["total_output_tokens"])]
    if result.get("total_cached_tokens") is not None:
        rows.append(_line("Total cached prompt tokens:", result["total_cached_tokens"]))
    rows.append(_line("Request throughput (req/s):", result["request_throughput"]))
    if result.get("request_goodput") is not None:
        rows.append(_line("Request goodput (req/s):", result["request_goodput"]))
        sent = result["completed"] + result["failed"]
        rows.append(_line("Requests within SLOs:", f"{result['good_requests']}/{sent}"))
    rows += [_line("Output token throughput (tok/s):", result["output_throughput"]),
             _line("Total token throughput (tok/s):", result["total_token_throughput"]),
             _line("Peak concurrent requests:", result["max_concurrent_requests"])]
    for name in METRICS:
        upper = name.upper()
        rows.append(f"{_TITLES[name]}".center(width, "-"))
        rows.append(_line(f"Mean {upper} (ms):", result[f"mean_{name}_ms"]))
        rows.append(_line(f"Median {upper} (ms):", result[f"median_{name}_ms"]))
        for p in percentiles:
            key = percentile_key(p)
            rows.append(_line(f"P{key[1:]} {upper} (ms):", result[f"{key}_{name}_ms"]))
    if result["errors_by_kind"]:
        rows.append("Errors".center(width, "-"))
        for kind, count in sorted(result["errors_by_kind"].items(), key=lambda kv: -kv[1]):
            rows.append(_line(f"{kind}:", count))
    rows.append("=" * width)
    return "\n".join(rows)
