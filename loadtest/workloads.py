"""What a benchmark sends: request generators.

A workload is an iterator of `Job`s. A job is what one arrival sends: usually one
request, or for the `sessions` dataset a conversation whose turns go one after another
(turn k+1 only after turn k finished). Arrival times are `arrivals.py`'s business, except
for replayed JSONL files, whose jobs may carry their own timestamps.

Datasets (`WorkloadConfig.dataset_name`):

    random         random token ids; input/output lengths fixed, uniform or lognormal
    shared-prefix  `prefix_groups` groups, each with a common random prefix of
                   `prefix_len` tokens, followed by a random suffix per request
    sessions       multi-turn sessions of `session_turns` turns, every turn carrying the
                   session's `session_id`; turn 1 has `input_len` tokens, later turns only
                   the new tokens (`session_turn_len`): the server appends them to the
                   session's history (protos/api.proto, GenerateRequest.session_id)
    jsonl          replay of a file, one JSON object a line: `prompt` (text) or
                   `prompt_ids`, `output_len`, optional `timestamp` (seconds from the
                   start) and `session_id`

Everything random comes from one numpy Generator seeded with `seed`, so a seed fixes the
whole token content of a run. The random datasets are infinite (a duration-bounded run
takes as many as it needs); `take()` cuts them.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

LENGTH_DISTRIBUTIONS = ("fixed", "uniform", "lognormal")

# Random prompts draw token ids from [TOKEN_ID_FLOOR, vocab_size): BPE vocabularies keep
# their control and byte tokens at the low ids, which would make odd prompts.
TOKEN_ID_FLOOR = 100

# Chat requests need text. A random id prompt is rendered as one common English word per
# token (these are single tokens, with their leading space, in Llama-family BPE
# vocabularies), so a rendered prompt has about as many tokens as its ids.
_WORDS = (
    "the of and to in is was for on that with as by at from his her he she it this which "
    "are be or an had not but were have they their one all we been has there who more so "
    "can if its no out up other into only some time new would year also two about them "
    "first then over when after may such used than these most many city school world made "
    "state part film later where group life while known game three well team under "
    "between since both work name still music during found house"
).split()


@dataclass(frozen=True)
class RequestSpec:
    """One request. `prompt` is token ids (tuple) or text (str)."""

    prompt: tuple[int, ...] | str
    output_len: int
    session_id: str | None = None

    @property
    def prompt_len(self) -> int | None:
        """Known for token-id prompts; a text prompt's length comes from the server's usage."""
        return None if isinstance(self.prompt, str) else len(self.prompt)

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else ids_to_text(self.prompt)


@dataclass(frozen=True)
class Job:
    """What one arrival sends: its requests go one after another. `timestamp` (seconds from
    the run's start) is set only when replaying a file that has them."""

    requests: tuple[RequestSpec, ...]
    timestamp: float | None = None


@dataclass(frozen=True)
class WorkloadConfig:
    dataset_name: str = "random"
    dataset_path: str | None = None       # jsonl only
    input_len: int = 1024                 # shared-prefix: the suffix after the prefix
    output_len: int = 128
    range_ratio: float = 0.0              # uniform: lengths in [L*(1-r), L*(1+r)]
    # None: "uniform" when range_ratio > 0, else "fixed" (as vllm's --random-range-ratio)
    input_len_distribution: str | None = None
    output_len_distribution: str | None = None
    lognormal_sigma: float = 0.5
    vocab_size: int = 32000
    prefix_groups: int = 4
    prefix_len: int = 512
    session_turns: int = 4
    session_turn_len: int = 128
    seed: int = 0

    def __post_init__(self):
        if self.dataset_name not in DATASETS:
            raise ValueError(f"dataset_name must be one of {DATASETS}, got {self.dataset_name!r}")
        if self.dataset_name == "jsonl" and not self.dataset_path:
            raise ValueError("dataset_path: the jsonl dataset needs a file (--dataset-path)")
        for name in ("input_len", "output_len", "prefix_len", "session_turn_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.output_len < 1:
            raise ValueError(f"output_len must be >= 1, got {self.output_len}")
        if self.dataset_name != "shared-prefix" and self.input_len < 1:
            raise ValueError(f"input_len must be >= 1, got {self.input_len}")
        if self.dataset_name == "shared-prefix" and self.input_len + self.prefix_len < 1:
            raise ValueError("input_len, prefix_len: both 0 would make empty prompts")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        for name in ("input_len_distribution", "output_len_distribution"):
            d = getattr(self, name)
            if d is not None and d not in LENGTH_DISTRIBUTIONS:
                raise ValueError(f"{name} must be one of {LENGTH_DISTRIBUTIONS}, got {d!r}")
        if self.lognormal_sigma <= 0:
            raise ValueError(f"lognormal_sigma must be > 0, got {self.lognormal_sigma}")
        if self.vocab_size <= TOKEN_ID_FLOOR:
            raise ValueError(f"vocab_size must be > {TOKEN_ID_FLOOR}, got {self.vocab_size}")
        if self.prefix_groups < 1:
            raise ValueError(f"prefix_groups must be >= 1, got {self.prefix_groups}")
        if self.session_turns < 1:
            raise ValueError(f"session_turns must be >= 1, got {self.session_turns}")

    def distribution(self, which: str) -> str:
        """The length distribution of "input" or "output" lengths, defaults resolved."""
        d = getattr(self, f"{which}_len_distribution")
        return d if d is not None else ("uniform" if self.range_ratio > 0 else "fixed")


def ids_to_text(ids) -> str:
    return "".join(" " + _WORDS[i % len(_WORDS)] for i in ids).lstrip()


def sample_lengths(distribution: str, mean: int, n: int, rng: np.random.Generator, *,
                   range_ratio: float = 0.0, sigma: float = 0.5, minimum: int = 1) -> np.ndarray:
    """`n` integer lengths around `mean`, none below `minimum`.

    fixed: all `mean`. uniform: integers in [floor(mean*(1-r)), ceil(mean*(1+r))], both ends
    included. lognormal: mean `mean` (mu = ln(mean) - sigma^2/2), rounded; a long right tail
    like real prompt lengths.
    """
    if mean < 0 or n < 0:
        raise ValueError(f"lengths: mean and count must be >= 0, got mean={mean}, n={n}")
    if distribution == "fixed":
        out = np.full(n, mean, dtype=np.int64)
    elif distribution == "uniform":
        lo, hi = math.floor(mean * (1 - range_ratio)), math.ceil(mean * (1 + range_ratio))
        out = rng.integers(lo, hi + 1, size=n)
    elif distribution == "lognormal":
        if mean == 0:
            return np.full(n, max(minimum, 0), dtype=np.int64)
        mu = math.log(mean) - sigma * sigma / 2
        out = np.rint(rng.lognormal(mu, sigma, size=n)).astype(np.int64)
    else:
        raise ValueError(f"length distribution must be one of {LENGTH_DISTRIBUTIONS}, got {distribution!r}")
    return np.maximum(out, minimum)


def random_ids(n: int, rng: np.random.Generator, vocab_size: int) -> tuple[int, ...]:
    return tuple(int(x) for x in rng.integers(TOKEN_ID_FLOOR, vocab_size, size=n))


def make_workload(cfg: WorkloadConfig, *, session_prefix: str = "s") -> Iterator[Job]:
    """The jobs of `cfg`'s dataset, in sending order. Infinite except for jsonl.

    `session_prefix` starts every session id: give each run its own (e.g. a uuid), or a
    server that keeps sessions would append this run's turns to an earlier run's.
    """
    return _GENERATORS[cfg.dataset_name](cfg, np.random.default_rng(cfg.seed), session_prefix)


def take(jobs: Iterator[Job], num_requests: int) -> list[Job]:
    """The first jobs holding `num_requests` requests in all; the last session is cut short
    if needed, so the count is exact."""
    if num_requests < 0:
        raise ValueError(f"num_prompts must be >= 0, got {num_requests}")
    out, left = [], num_requests
    for job in jobs:
        if left <= 0:
            break
        if len(job.requests) > left:
            job = Job(job.requests[:left], job.timestamp)
        out.append(job)
        left -= len(job.requests)
    return out


def num_requests(jobs: list[Job]) -> int:
    return sum(len(j.requests) for j in jobs)


# Lengths are drawn in batches so a long run doesn't make one numpy call per request;
# the batch size is fixed, so the token content depends only on the seed.
_BATCH = 256


def _length_batches(cfg: WorkloadConfig, rng: np.random.Generator, mean_in: int, min_in: int):
    while True:
        ins = sample_lengths(cfg.distribution("input"), mean_in, _BATCH, rng, range_ratio=cfg.range_ratio,
                             sigma=cfg.lognormal_sigma, minimum=min_in)
        outs = sample_lengths(cfg.distribution("output"), cfg.output_len, _BATCH, rng,
                              range_ratio=cfg.range_ratio, sigma=cfg.lognormal_sigma, minimum=1)
        yield from zip(ins.tolist(), outs.tolist())


def _random_jobs(cfg: WorkloadConfig, rng: np.random.Generator, session_prefix: str) -> Iterator[Job]:
    for in_len, out_len in _length_batches(cfg, rng, cfg.input_len, 1):
        yield Job((RequestSpec(random_ids(in_len, rng, cfg.vocab_size), out_len),))


def _shared_prefix_jobs(cfg: WorkloadConfig, rng: np.random.Generator, session_prefix: str) -> Iterator[Job]:
    prefixes = [random_ids(cfg.prefix_len, rng, cfg.vocab_size) for _ in range(cfg.prefix_groups)]
    # A zero-length suffix is allowed here: the prompt is then just its group's prefix.
    for suffix_len, out_len in _length_batches(cfg, rng, cfg.input_len, 0):
        group = int(rng.integers(cfg.prefix_groups))
        prompt = prefixes[group] + random_ids(suffix_len, rng, cfg.vocab_size)
        yield Job((RequestSpec(prompt, out_len),))


def _session_jobs(cfg: WorkloadConfig, rng: np.random.Generator, session_prefix: str) -> Iterator[Job]:
    lengths = _length_batches(cfg, rng, cfg.input_len, 1)
    followups = _length_batches(cfg, rng, cfg.session_turn_len, 1)
    for index in itertools.count():
        sid = f"{session_prefix}-{index}"
        turns = []
        for turn in range(cfg.session_turns):
            in_len, out_len = next(lengths) if turn == 0 else next(followups)
            turns.append(RequestSpec(random_ids(in_len, rng, cfg.vocab_size), out_len, sid))
        yield Job(tuple(turns))


def _jsonl_jobs(cfg: WorkloadConfig, rng: np.random.Generator, session_prefix: str) -> Iterator[Job]:
    for job in load_jsonl(cfg.dataset_path):
        requests = tuple(
            r if r.session_id is None else RequestSpec(r.prompt, r.output_len, f"{session_prefix}-{r.session_id}")
            for r in job.requests)
        yield Job(requests, job.timestamp)


# dataset name -> generator(cfg, rng, session_prefix); each takes what it needs.
_GENERATORS = {"random": _random_jobs, "shared-prefix": _shared_prefix_jobs, "sessions": _session_jobs,
               "jsonl": _jsonl_jobs}
DATASETS = tuple(_GENERATORS)


def load_jsonl(path: str | Path) -> list[Job]:
    """Jobs of one request each, from a JSONL file; sorted by timestamp when it has them.

    Either every line has a `timestamp` or none does: a half-timed file has no clear
    meaning. Errors name the line (1-based) and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset_path: no such file {str(path)!r}")
    jobs: list[Job] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                jobs.append(_parse_line(line, lineno, path.name))
    if not jobs:
        raise ValueError(f"{path.name}: no requests in the file")
    timed = [j.timestamp is not None for j in jobs]
    if any(timed) and not all(timed):
        odd = timed.index(not timed[0]) + 1
        raise ValueError(f"{path.name}: 'timestamp': either every request has one or none does "
                         f"(request {odd} differs from request 1)")
    if all(timed):
        jobs.sort(key=lambda j: j.timestamp)  # stable: equal timestamps keep file order
    return jobs


def _parse_line(line: str, lineno: int, name: str) -> Job:
    where = f"{name} line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object")
    if "prompt" in obj and "prompt_ids" in obj:
        raise ValueError(f"{where}: give 'prompt' or 'prompt_ids', not both")
    if "prompt_ids" in obj:
        ids = obj["prompt_ids"]
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
            raise ValueError(f"{where}: 'prompt_ids' must be a non-empty list of non-negative integers")
        prompt: tuple[int, ...] | str = tuple(ids)
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise ValueError(f"{where}: 'prompt' must be a non-empty string")
        prompt = obj["prompt"]
    else:
        raise ValueError(f"{where}: missing field 'prompt' (or 'prompt_ids')")
    if "output_len" not in obj:
        raise ValueError(f"{where}: missing field 'output_len'")
    out_len = obj["output_len"]
    if not isinstance(out_len, int) or isinstance(out_len, bool) or out_len < 1:
        raise ValueError(f"{where}: 'output_len' must be a positive integer, got {out_len!r}")
    ts = obj.get("timestamp")
    if ts is not None and (not isinstance(ts, (int, float)) or isinstance(ts, bool) or ts < 0
                           or not math.isfinite(ts)):
        raise ValueError(f"{where}: 'timestamp' must be a non-negative number of seconds, got {ts!r}")
    sid = obj.get("session_id")
    if sid is not None and not isinstance(sid, str):
        raise ValueError(f"{where}: 'session_id' must be a string")
    return Job((RequestSpec(prompt, out_len, sid),), None if ts is None else float(ts))
