"""`tandem bench sweep`: request rates x configurations, one table and one plot.

A configuration (`Target`) is a server that is already running, or a stack the sweep
starts itself from a shell command. A started stack's lifecycle:

    start   `sh -c COMMAND` in its own process group (start_new_session), output to
            LOG_DIR/stack-NAME.log
    ready   poll until GET URL/health answers 200 (openai) or ListModels answers (grpc);
            the stack exiting first, or the start timeout, fails this configuration
    run     one benchmark per rate, in the order given
    stop    SIGINT to the whole group (a clean shutdown), then SIGTERM, then SIGKILL,
            each after a wait; always, even when a run failed or on Ctrl-C

Run i of every configuration uses seed + i: all configurations get the same prompts at a
given rate, and a later rate doesn't find the earlier rate's prompts in the prefix cache.
A configuration that fails to start is reported and skipped; the others still run.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

from loadtest.bench import BenchConfig, ServerUnavailable, run_benchmark
from loadtest.clients import ClientConfig, make_client

log = logging.getLogger(__name__)

# Per-request arrays: left out of a sweep's JSON unless asked for (they dominate its size).
PER_REQUEST_KEYS = ("input_lens", "output_lens", "cached_lens", "ttfts", "tpots", "itls", "e2els",
                    "start_times", "errors", "error_kinds", "generated_texts")


class StackError(RuntimeError):
    """A stack did not start or did not become ready."""


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    command: str | None = None   # None: already running at `url`


@dataclass(frozen=True)
class SweepConfig:
    bench: BenchConfig               # everything but the URL, the rate and the seed
    targets: tuple[Target, ...]
    rates: tuple[float, ...]
    start_timeout: float = 600.0     # seconds for a started stack to become ready
    stop_timeout: float = 30.0       # seconds after SIGINT before SIGTERM
    log_dir: str = "."
    keep_per_request: bool = False

    def __post_init__(self):
        if not self.targets:
            raise ValueError("targets: give at least one --base-url NAME=URL or --stack NAME=COMMAND")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"targets: configuration names must be unique, got {names}")
        if not self.rates or any(not r > 0 for r in self.rates):
            raise ValueError(f"rates: need one or more rates > 0 (or inf), got {self.rates}")


class Stack:
    """A stack started from a shell command, in its own process group; see the module docstring."""

    def __init__(self, name: str, command: str, log_path: Path):
        self.name, self.command, self.log_path = name, command, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log.info("[%s] starting: %s (log: %s)", self.name, self.command, self.log_path)
        with open(self.log_path, "ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.command, shell=True, start_new_session=True,
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def exited(self) -> int | None:
        return self.proc.poll()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _group_alive(self) -> bool:
        self.proc.poll()  # reap the leader, so a dead group doesn't look alive through its zombie
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self, timeout: float) -> None:
        if self.proc is None:
            return
        # The shell may be gone while the servers it started live on: signal the group.
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if not self._group_alive():
                break
            log.info("[%s] stopping: %s to the process group", self.name, sig.name)
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while self._group_alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        self.proc.poll()
        log.info("[%s] stopped", self.name)


def wait_ready(client_cfg: ClientConfig, timeout: float, stack: Stack | None = None) -> float:
    """Polls until the server answers its readiness check; returns the seconds it took."""

    async def poll() -> float:
        start = time.monotonic()
        async with make_client(client_cfg) as client:
            while not await client.ready():
                if stack is not None and stack.exited() is not None:
                    raise StackError(f"stack exited with status {stack.exited()} before it was ready; "
                                     f"the end of {stack.log_path}:\n{stack.log_tail()}")
                if time.monotonic() - start > timeout:
                    raise StackError(f"{client_cfg.base_url} not ready after {timeout:.0f} s")
                await asyncio.sleep(0.5)
        return time.monotonic() - start

    return asyncio.run(poll())


def run_sweep(cfg: SweepConfig, on_run=None) -> dict:
    """Runs every rate against every target. `on_run(sweep)` is called after each run with
    the results so far (to save them as they come)."""
    sweep: dict = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "rates": ["inf" if math.isinf(r) else r for r in cfg.rates],
        "goodput_slos_ms": dict(cfg.bench.slos_ms) or None,
        "configurations": [asdict(t) for t in cfg.targets],
        "runs": {},
        "errors": {},
    }
    log_dir = Path(cfg.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    for target in cfg.targets:
        sweep["runs"][target.name] = []
        client_cfg = replace(cfg.bench.client, base_url=target.url)
        stack = Stack(target.name, target.command, log_dir / f"stack-{target.name}.log") if target.command else None
        try:
            if stack is not None:
                stack.start()
            took = wait_ready(client_cfg, cfg.start_timeout if stack else 10.0, stack)
            log.info("[%s] ready at %s after %.1f s", target.name, target.url, took)
            for i, rate in enumerate(cfg.rates):
                bench = replace(cfg.bench, client=client_cfg,
                                arrivals=replace(cfg.bench.arrivals, request_rate=rate),
                                workload=replace(cfg.bench.workload, seed=cfg.bench.workload.seed + i))
                log.info("[%s] run %d/%d: %s req/s", target.name, i + 1, len(cfg.rates), rate)
                result = run_benchmark(bench)
                if not cfg.keep_per_request:
                    result = {k: v for k, v in result.items() if k not in PER_REQUEST_KEYS}
                result["configuration"] = target.name
                sweep["runs"][target.name].append(result)
                if on_run is not None:
                    on_run(sweep)
        except (StackError, ServerUnavailable) as e:
            log.error("[%s] skipped: %s", target.name, e)
            sweep["errors"][target.name] = str(e)
        finally:
            if stack is not None:
                stack.stop(cfg.stop_timeout)
    return sweep


def _ms(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def format_sweep(sweep: dict) -> str:
    """One comparison table: a row per (configuration, rate)."""
    header = ("config", "rate", "ok", "failed", "req/s", "goodput", "out tok/s", "TTFT p50", "TTFT p90",
              "TPOT p50", "TPOT p90", "E2EL p90")
    rows = [header]
    for name, results in sweep["runs"].items():
        for r in results:
            rows.append((name, str(r["request_rate"]), str(r["completed"]), str(r["failed"]),
                         f"{r['request_throughput']:.2f}",
                         "-" if r.get("request_goodput") is None else f"{r['request_goodput']:.2f}",
                         f"{r['output_throughput']:.1f}",
                         _ms(r["median_ttft_ms"]), _ms(r.get("p90_ttft_ms")),
                         _ms(r["median_tpot_ms"]), _ms(r.get("p90_tpot_ms")), _ms(r.get("p90_e2el_ms"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    text = "latencies in ms, rates and goodput in requests/s\n" + "\n".join(lines)
    for name, err in sweep["errors"].items():
        text += f"\n{name}: FAILED: {err.splitlines()[0]}"
    return text
