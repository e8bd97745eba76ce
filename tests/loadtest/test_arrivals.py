"""Arrival schedules and the dispatcher: Poisson gaps, the concurrency cap, the time bound."""

import asyncio
import itertools
import math
import random
import time

import numpy as np
import pytest

from loadtest.arrivals import ArrivalConfig, arrival_gaps, arrival_times, dispatch
from loadtest.workloads import Job, RequestSpec


def jobs(n=None, timestamps=None):
    spec = RequestSpec((1, 2, 3), 1)
    if timestamps is not None:
        return [Job((spec,), t) for t in timestamps]
    it = (Job((RequestSpec((i,), 1),)) for i in itertools.count())
    return it if n is None else list(itertools.islice(it, n))


def test_poisson_gaps_have_mean_one_over_rate():
    gaps = np.array(list(itertools.islice(arrival_gaps(8.0, 1.0, np.random.default_rng(0)), 20000)))
    assert gaps.mean() == pytest.approx(1 / 8, rel=0.03)
    assert gaps.std() == pytest.approx(1 / 8, rel=0.05)  # exponential: std = mean


def test_burstiness_keeps_the_rate_and_changes_the_spread():
    bursty = np.array(list(itertools.islice(arrival_gaps(4.0, 0.25, np.random.default_rng(1)), 40000)))
    even = np.array(list(itertools.islice(arrival_gaps(4.0, 4.0, np.random.default_rng(1)), 40000)))
    for g in (bursty, even):
        assert g.mean() == pytest.approx(0.25, rel=0.05)
    # gamma with shape k: coefficient of variation 1/sqrt(k)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.1)
    assert even.std() / even.mean() == pytest.approx(0.5, rel=0.1)


def test_infinite_rate_and_timestamps():
    times = [t for t, _ in itertools.islice(arrival_times(jobs(), ArrivalConfig(), np.random.default_rng(0)), 5)]
    assert times == [0.0] * 5
    timed = [t for t, _ in arrival_times(jobs(timestamps=[0.0, 0.3, 1.5]), ArrivalConfig(request_rate=1.0),
                                         np.random.default_rng(0))]
    assert timed == [0.0, 0.3, 1.5]
    a = [t for t, _ in arrival_times(jobs(50), ArrivalConfig(request_rate=3.0), np.random.default_rng(7))]
    b = [t for t, _ in arrival_times(jobs(50), ArrivalConfig(request_rate=3.0), np.random.default_rng(7))]
    assert a == b and a[0] == 0.0 and all(x < y for x, y in zip(a, a[1:]))


class FakeSender:
    """Stands in for a client: each job sleeps a random few ms; counts jobs in flight."""

    def __init__(self, seed=0):
        self.in_flight = self.peak = 0
        self.started: list[float] = []
        self.rand = random.Random(seed)

    async def __call__(self, job):
        self.started.append(time.perf_counter())
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.rand.uniform(0.001, 0.01))
            return job.requests[0].prompt[0]
        finally:
            self.in_flight -= 1


@pytest.mark.parametrize("rate", [math.inf, 2000.0])
def test_max_concurrency_is_never_exceeded(rate):
    sender = FakeSender()
    cfg = ArrivalConfig(request_rate=rate, max_concurrency=5)
    results = asyncio.run(dispatch(jobs(120), sender, cfg, np.random.default_rng(0)))
    assert results == list(range(120))  # every job ran, results in arrival order
    assert sender.peak == 5  # reached, never exceeded


def test_no_job_starts_before_its_arrival_time():
    sender = FakeSender()
    cfg = ArrivalConfig(request_rate=200.0)
    schedule = [t for t, _ in arrival_times(jobs(40), cfg, np.random.default_rng(3))]

    async def main():
        t0 = time.perf_counter()
        await dispatch(jobs(40), sender, cfg, np.random.default_rng(3))
        return t0

    t0 = asyncio.run(main())
    lateness = [s - t0 - at for s, at in zip(sender.started, schedule)]
    assert min(lateness) > -0.002  # dispatch's own clock starts a hair after t0
    assert np.median(lateness) < 0.02


def test_duration_bounds_an_endless_stream():
    sender = FakeSender()
    cfg = ArrivalConfig(max_concurrency=3, duration=0.2)
    t0 = time.perf_counter()
    results = asyncio.run(dispatch(jobs(), sender, cfg, np.random.default_rng(0)))
    elapsed = time.perf_counter() - t0
    assert 0.2 <= elapsed < 0.5
    assert len(results) == len(sender.started) > 10
    assert max(sender.started) - t0 < 0.21  # nothing started after the deadline


@pytest.mark.parametrize("kwargs, field", [
    ({"request_rate": 0}, "request_rate"), ({"request_rate": float("nan")}, "request_rate"),
    ({"burstiness": 0}, "burstiness"), ({"max_concurrency": 0}, "max_concurrency"), ({"duration": -1}, "duration"),
])
def test_bad_arrival_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ArrivalConfig(**kwargs)
