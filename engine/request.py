"""A request owns its KV state: its block tables and its counters.

One counter drives everything: each step computes tokens [num_computed_tokens,
num_tokens). A fresh prompt, a chunked prefill, a prefix hit (num_computed starts
above 0), a decode step (one token) and a recompute after preemption (num_computed
reset to 0 with the output kept) are all "catch num_computed_tokens up to num_tokens".
When it has caught up, the step's last logits are sampled and the new token appended.

With async scheduling (engine/llm.py) the token is appended as `PENDING` when its step
is launched, and replaced by the sampled id one step later: the next step is scheduled
and launched meanwhile, and reads that token from the device.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from engine.sampling import SamplingParams


PENDING = -1  # an output token whose step is launched but not yet read back


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    TRANSFERRING = "transferring"  # decode role: blocks reserved, KV arriving from prefill
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int] = field(repr=False)
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = field(default=None, repr=False)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit at first admission
    num_preemptions: int = 0
    block_tables: dict[str, list[int | None]] = field(default_factory=dict, repr=False)
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    # Per generated token: (chosen logprob, top-n [(id, logprob)]) when logprobs were asked.
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # Its PENDING token is the last one it may have (max_tokens, max_model_len): the
    # scheduler gives it no further step.
    last_token_pending: bool = False

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, n: int) -> list[int]:
        """all_token_ids[start : start + n] without concatenating the whole list."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p : start - p + n]
        if start + n <= p:
            return self.prompt_token_ids[start : start + n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: start + n - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished
