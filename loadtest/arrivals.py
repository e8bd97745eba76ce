"""When jobs are sent: Poisson (or gamma-bursty) arrivals, a concurrency cap, a time bound.

The two controls combine as in `vllm bench serve`: jobs *arrive* on a schedule set by the
request rate, and a job that arrives while `max_concurrency` jobs are in flight waits
(first come, first served) for one of them to finish. With an infinite rate every job
arrives at time 0, so `max_concurrency` alone sets the load (a closed loop).

Inter-arrival gaps are gamma-distributed with shape `burstiness` and mean `1/rate`:
burstiness 1 is a Poisson process (exponential gaps); below 1 arrivals come in bursts,
above 1 they are more even. Replayed jobs with a `timestamp` arrive at that time instead.

A session job holds its concurrency slot from its first turn until its last: its turns
are sequential, so at most one of its requests is in flight at any time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Iterator, TypeVar

import numpy as np

from loadtest.workloads import Job

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ArrivalConfig:
    request_rate: float = math.inf   # jobs per second; inf: all at once
    burstiness: float = 1.0
    max_concurrency: int | None = None
    duration: float | None = None    # seconds: no job starts after this; in-flight ones finish

    def __post_init__(self):
        if not self.request_rate > 0:  # also rejects NaN
            raise ValueError(f"request_rate must be > 0 (or inf), got {self.request_rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a positive number, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.duration is not None and not self.duration > 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration}")


_BATCH = 1024  # gaps drawn per numpy call; fixed, so the schedule depends only on the seed


def arrival_gaps(rate: float, burstiness: float, rng: np.random.Generator) -> Iterator[float]:
    """Endless seconds between consecutive arrivals; mean 1/rate, all 0 for an infinite rate."""
    if math.isinf(rate):
        while True:
            yield 0.0
    # gamma(k, theta) has mean k*theta: theta = 1/(rate*k) keeps the mean at 1/rate.
    shape, scale = burstiness, 1.0 / (rate * burstiness)
    while True:
        yield from rng.gamma(shape, scale, size=_BATCH).tolist()


def arrival_times(jobs: Iterable[Job], cfg: ArrivalConfig, rng: np.random.Generator) -> Iterator[tuple[float, Job]]:
    """(seconds from the start, job) in sending order; the first job arrives at 0."""
    gaps = arrival_gaps(cfg.request_rate, cfg.burstiness, rng)
    t = 0.0
    for job in jobs:
        if job.timestamp is not None:
            yield job.timestamp, job
        else:
            yield t, job
            t += next(gaps)


async def dispatch(jobs: Iterable[Job], run_job: Callable[[Job], Awaitable[T]], cfg: ArrivalConfig,
                   rng: np.random.Generator, *, clock: Callable[[], float] = time.perf_counter) -> list[T]:
    """Runs `run_job(job)` for each job at its arrival time, never more than
    `cfg.max_concurrency` at once, until the jobs or `cfg.duration` run out.

    Returns the results of the jobs that started, in arrival order. Slots are taken here,
    before a job's task exists, so an endless job stream under a concurrency cap never
    piles up waiting tasks.
    """
    start = clock()
    slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    tasks: list[asyncio.Task] = []

    async def run_and_release(job: Job) -> T:
        try:
            return await run_job(job)
        finally:
            if slots is not None:
                slots.release()

    def past_deadline(t: float) -> bool:
        return cfg.duration is not None and t >= cfg.duration

    try:
        for at, job in arrival_times(jobs, cfg, rng):
            if past_deadline(at):
                break
            delay = start + at - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is not None:
                await slots.acquire()
            if past_deadline(clock() - start):
                if slots is not None:
                    slots.release()
                break
            tasks.append(asyncio.create_task(run_and_release(job)))
        if cfg.duration is not None:
            log.info("sent %d jobs in %.1f s; waiting for the %d still running",
                     len(tasks), clock() - start, sum(not t.done() for t in tasks))
        return list(await asyncio.gather(*tasks))
    finally:
        # Interrupted (Ctrl-C, an exception in run_job): don't leave streams open.
        for t in tasks:
            t.cancel()
