"""One benchmark run: a workload sent on an arrival schedule, measured into a result.

    cfg = config_from_argv(["--base-url", url, "--num-prompts", "30"])   # loadtest.cli
    result = run_benchmark(cfg)          # or `await arun_benchmark(cfg)` inside a loop

A run: resolve the model (the server's first, unless given) -> send the warm-up requests
(their own prompts, all at once under the concurrency cap; not measured) -> start the
clock -> send the measured jobs through `arrivals.dispatch` -> stop the clock when the last
one ends -> `metrics.compute_metrics`. The result dict holds the run's settings (under
vLLM's names where they exist) and the metrics; nothing is printed or written here.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import resource
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Mapping

import numpy as np

from loadtest.arrivals import ArrivalConfig, dispatch
from loadtest.clients import ClientConfig, RequestRecord, make_client
from loadtest.metrics import SLO_METRICS, compute_metrics
from loadtest.workloads import Job, WorkloadConfig, make_workload, num_requests, take

log = logging.getLogger(__name__)

# Warm-up prompts come from a different seed, so they don't put the measured prompts in
# the server's prefix cache.
WARMUP_SEED_OFFSET = 1_000_003


class ServerUnavailable(RuntimeError):
    """The server could not be reached or listed no model."""


@dataclass(frozen=True)
class BenchConfig:
    client: ClientConfig = field(default_factory=ClientConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    arrivals: ArrivalConfig = field(default_factory=ArrivalConfig)
    num_prompts: int | None = 1000   # measured requests; None: as many as arrivals.duration allows
    num_warmups: int = 0
    percentiles: tuple[float, ...] = (90.0, 99.0)
    slos_ms: Mapping[str, float] = field(default_factory=dict)   # {"ttft": ms, "tpot": ms, "e2el": ms}
    progress: bool = True            # a tqdm bar over requests, on stderr

    def __post_init__(self):
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        finite_data = self.workload.dataset_name == "jsonl"
        if self.num_prompts is None and self.arrivals.duration is None and not finite_data:
            raise ValueError("num_prompts: give a request count or a duration (--duration)")
        if (self.num_prompts is None and not finite_data and math.isinf(self.arrivals.request_rate)
                and self.arrivals.max_concurrency is None):
            raise ValueError("duration: a time-bounded run at an infinite rate needs --max-concurrency "
                             "(or a --num-prompts), else it would start requests without end")
        if self.num_warmups < 0:
            raise ValueError(f"num_warmups must be >= 0, got {self.num_warmups}")
        for name in self.slos_ms:
            if name not in SLO_METRICS:
                raise ValueError(f"slos_ms: unknown metric {name!r}, expected one of {SLO_METRICS}")


def run_benchmark(cfg: BenchConfig) -> dict:
    """Runs one benchmark to the end and returns its result (see module docstring)."""
    return asyncio.run(arun_benchmark(cfg))


async def arun_benchmark(cfg: BenchConfig) -> dict:
    raise_open_file_limit()
    async with make_client(cfg.client) as client:
        model = cfg.client.model or await first_model(client, cfg.client.base_url)
        if cfg.num_warmups:
            await _warm_up(client, model, cfg)
        jobs = _jobs(cfg.workload, cfg.num_prompts, session_prefix=uuid.uuid4().hex[:12])
        total = num_requests(jobs) if isinstance(jobs, list) else None
        if cfg.num_prompts is not None and total is not None and total < cfg.num_prompts:
            log.warning("the dataset has only %d requests (asked for %d)", total, cfg.num_prompts)
        if isinstance(jobs, list) and jobs and jobs[0].timestamp is not None:
            log.info("replaying the file's timestamps; --request-rate and --burstiness do not apply")
        log.info("sending %s requests to %s (model %s) at %s req/s%s%s", "?" if total is None else total,
                 cfg.client.base_url, model, cfg.arrivals.request_rate,
                 f", at most {cfg.arrivals.max_concurrency} at once" if cfg.arrivals.max_concurrency else "",
                 f", for at most {cfg.arrivals.duration} s" if cfg.arrivals.duration else "")
        from tqdm import tqdm

        # What exists now (the dataset's requests, the client, imported modules) lives to
        # the end: out of the collector's sight, a full collection during the run scans
        # only the records it made, instead of pausing every request in flight. Not when
        # the caller froze its own objects already (unfreeze would undo that too).
        freeze = gc.get_freeze_count() == 0
        if freeze:
            gc.collect()
            gc.freeze()
        try:
            with tqdm(total=total, disable=not cfg.progress, unit="req", desc="requests") as bar:
                rng = np.random.default_rng([cfg.workload.seed, 1])  # arrivals' own stream
                start = time.perf_counter()
                per_job = await dispatch(jobs, _job_runner(client, model, bar.update), cfg.arrivals, rng)
                duration = time.perf_counter() - start
        finally:
            if freeze:
                gc.unfreeze()
    records = [r for recs in per_job for r in recs]
    if not records:
        raise ValueError("duration: no request was sent before the run's time was up")
    failed = sum(not r.success for r in records)
    log.info("%d requests in %.2f s, %d failed", len(records), duration, failed)
    metrics = compute_metrics(records, duration, percentiles=cfg.percentiles, slos_ms=dict(cfg.slos_ms))
    return {**run_settings(cfg, model), **metrics}


def run_settings(cfg: BenchConfig, model: str) -> dict:
    """The settings a result carries: vLLM's keys first, then ours."""
    rate = cfg.arrivals.request_rate
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": cfg.client.backend,
        "endpoint": cfg.client.endpoint,
        "base_url": cfg.client.base_url,
        "model_id": model,
        "num_prompts": cfg.num_prompts,
        "request_rate": "inf" if math.isinf(rate) else rate,  # JSON has no infinity
        "burstiness": cfg.arrivals.burstiness,
        "max_concurrency": cfg.arrivals.max_concurrency,
        "duration_limit": cfg.arrivals.duration,
        "num_warmups": cfg.num_warmups,
        "dataset_name": cfg.workload.dataset_name,
        "random_input_len": cfg.workload.input_len,
        "random_output_len": cfg.workload.output_len,
        "random_range_ratio": cfg.workload.range_ratio,
        "seed": cfg.workload.seed,
        "goodput_slos_ms": dict(cfg.slos_ms) or None,
        "metric_percentiles": list(cfg.percentiles),
    }


async def first_model(client, base_url: str) -> str:
    try:
        models = await client.list_models()
    except Exception as e:  # connection refused, HTTP error, gRPC error: all mean the same here
        raise ServerUnavailable(f"could not list the models at {base_url} ({type(e).__name__}: {e}); "
                                "is the server up? (or pass --model)") from e
    if not models:
        raise ServerUnavailable(f"{base_url} lists no models")
    return models[0]


def _jobs(workload: WorkloadConfig, count: int | None, session_prefix: str):
    jobs = make_workload(workload, session_prefix=session_prefix)
    if count is not None:
        return take(jobs, count)
    return list(jobs) if workload.dataset_name == "jsonl" else jobs


def _job_runner(client, model: str, on_request_done):
    """A job's requests, one after another. When a turn of a session fails, the session's
    later turns are not sent (the server's history would be wrong) and count as failed."""

    async def run_job(job: Job) -> list[RequestRecord]:
        records = []
        for i, spec in enumerate(job.requests):
            rec = await client.send(spec, model)
            records.append(rec)
            on_request_done(1)
            if not rec.success:
                for rest in job.requests[i + 1:]:
                    skipped = RequestRecord(prompt_len=rest.prompt_len or 0, start_time=time.perf_counter())
                    skipped.fail("session_aborted", "an earlier turn of this session failed")
                    records.append(skipped)
                on_request_done(len(job.requests) - i - 1)
                break
        return records

    return run_job


async def _warm_up(client, model: str, cfg: BenchConfig) -> None:
    workload = replace(cfg.workload, seed=cfg.workload.seed + WARMUP_SEED_OFFSET)
    jobs = _jobs(workload, cfg.num_warmups, session_prefix="warmup-" + uuid.uuid4().hex[:12])
    log.info("warming up with %d requests (not measured)", num_requests(jobs))
    arrivals = ArrivalConfig(max_concurrency=cfg.arrivals.max_concurrency)
    per_job = await dispatch(jobs, _job_runner(client, model, lambda n: None), arrivals, np.random.default_rng(0))
    failed = [r for recs in per_job for r in recs if not r.success]
    if failed:
        log.warning("%d warm-up requests failed (first: %s %s)", len(failed), failed[0].error,
                    failed[0].error_message)


def raise_open_file_limit() -> None:
    """Every open stream is a socket: lift the soft open-file limit to the hard one."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # An unlimited hard limit still can't be a soft one above the kernel's nr_open.
        target = max(soft, 1 << 16) if hard == resource.RLIM_INFINITY else hard
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.debug("could not raise the open-file limit: %s", e)
