"""PNG plots of results (matplotlib, Agg backend: no display needed).

    plot_latency_cdfs(result, path)   one run: the CDFs of TTFT, TPOT, ITL and E2E latency
    plot_sweep(runs, path)            a sweep: goodput, and p50 (dashed) / p90 (solid)
                                      TTFT, TPOT and E2E latency, against the request rate,
                                      one line per configuration

Both read only the result dicts (`metrics.compute_metrics` plus the run's metadata), so
they can redraw saved JSON files.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: a benchmark host has no display
    import matplotlib.pyplot as plt

    return plt


def latency_samples_ms(result: dict) -> dict[str, list[float]]:
    """The per-request latencies of the successful requests, in ms, by metric."""
    ok = [kind == "" for kind in result["error_kinds"]]
    return {
        "ttft": [t * 1000 for t, good in zip(result["ttfts"], ok) if good],
        "tpot": [t * 1000 for t in result["tpots"] if t is not None],
        "itl": [gap * 1000 for gaps in result["itls"] for gap in gaps],
        "e2el": [t * 1000 for t, good in zip(result["e2els"], ok) if good],
    }


_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}


def plot_latency_cdfs(result: dict, path: str | Path, title: str | None = None) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, values) in zip(axes.flat, latency_samples_ms(result).items()):
        ax.set_title(_NAMES[name])
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
        if not values:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
            continue
        xs = sorted(values)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post")
        ax.set_ylim(0, 1.02)
    fig.suptitle(title or _run_title(result))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _run_title(result: dict) -> str:
    rate = result.get("request_rate", math.inf)
    parts = [str(result.get("model_id", "")), f"rate {rate} req/s"]
    if result.get("max_concurrency"):
        parts.append(f"concurrency {result['max_concurrency']}")
    parts.append(f"{result['completed']} ok / {result['failed']} failed")
    return ", ".join(p for p in parts if p)


def _rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def plot_sweep(runs: Mapping[str, Sequence[dict]], path: str | Path, title: str = "") -> Path:
    """`runs`: configuration name -> its results, each with a "request_rate" key.

    Rates sit at even spacing in increasing order (so "inf", all at once, fits at the right).
    Goodput falls back to request throughput when the runs had no SLOs.
    """
    plt = _pyplot()
    rates = sorted({float(r["request_rate"]) for results in runs.values() for r in results})
    x_of = {rate: i for i, rate in enumerate(rates)}
    has_goodput = any(r.get("request_goodput") is not None for results in runs.values() for r in results)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax_good, ax_ttft, ax_tpot, ax_e2el = axes.flat

    finite = [r for r in rates if math.isfinite(r)]
    if finite:  # what a server that keeps up would deliver
        ax_good.plot([x_of[r] for r in finite], finite, ":", color="gray", label="offered rate")
    for i, (name, results) in enumerate(runs.items()):
        color = f"C{i}"
        results = sorted(results, key=lambda r: float(r["request_rate"]))
        xs = [x_of[float(r["request_rate"])] for r in results]
        key = "request_goodput" if has_goodput else "request_throughput"
        ax_good.plot(xs, [r.get(key) or 0.0 for r in results], "o-", color=color, label=name)
        for ax, metric in ((ax_ttft, "ttft"), (ax_tpot, "tpot"), (ax_e2el, "e2el")):
            ax.plot(xs, [r[f"median_{metric}_ms"] for r in results], "o--", color=color, alpha=0.6,
                    label=f"{name} p50")
            ax.plot(xs, [r.get(f"p90_{metric}_ms", math.nan) for r in results], "o-", color=color,
                    label=f"{name} p90")
    ax_good.set_title("goodput (requests/s within SLOs)" if has_goodput else "request throughput (no SLOs given)")
    ax_good.set_ylabel("req/s")
    for ax, metric in ((ax_ttft, "ttft"), (ax_tpot, "tpot"), (ax_e2el, "e2el")):
        ax.set_title(f"{_NAMES[metric]}: p50 (dashed), p90 (solid)")
        ax.set_ylabel("ms")
    for ax in axes.flat:
        ax.set_xticks(range(len(rates)), [_rate_label(r) for r in rates])
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
