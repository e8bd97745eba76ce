"""Per-request sampling parameters and the batched sampler.

`SamplingParams` is what a client asks for; it is checked once, here, so the engine and
the sampler can trust every field. Checks that need the vocabulary (a stop token id
below vocab size) belong to the engine, which knows the model.

`Sampler` turns one step's logits (one row per request) into one token per row:

    greedy rows   argmax of the raw logits (ties -> lowest id)
    sampled rows  logits / temperature -> top-k -> top-p -> min-p -> draw

Reproducibility: a request with a seed owns a `torch.Generator` (the engine makes it with
`make_generator` and keeps it for the request's lifetime). Its row draws exactly `vocab`
noise values from that generator every step, in vocabulary order, whatever else is in
the batch and whichever filters other rows use, so its tokens do not depend on its
neighbours. Rows without a generator share the global RNG.

Logprobs are those of the raw model distribution (log_softmax of the logits before
temperature and filtering), as vLLM reports them by default.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch

MAX_LOGPROBS = 20  # top-n alternatives a request may ask for; bounds the per-step topk


def _is_int(v: object) -> bool:
    # bool is an int subclass, but `max_tokens=True` is a client bug, not a count.
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _type_name(v: object) -> str:
    return type(v).__name__


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0  # in (0, 1]; 1 => off
    top_k: int | None = None  # None => off; else >= 1
    min_p: float = 0.0  # in [0, 1]; 0 => off
    seed: int | None = None  # None => global RNG; else a per-request generator
    stop: tuple[str, ...] = ()  # a str or a list of str is accepted and normalized
    stop_token_ids: tuple[int, ...] = ()  # a list is accepted and normalized
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None => none; 0 => chosen token only; n => chosen + top-n
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens):
            raise ValueError(f"max_tokens must be an int, got {_type_name(self.max_tokens)}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        object.__setattr__(self, "max_tokens", int(self.max_tokens))

        if not _is_real(self.temperature):
            raise ValueError(f"temperature must be a number, got {_type_name(self.temperature)}")
        if not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be finite, got {self.temperature}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        object.__setattr__(self, "temperature", float(self.temperature))

        if not _is_real(self.top_p):
            raise ValueError(f"top_p must be a number, got {_type_name(self.top_p)}")
        if not 0 < self.top_p <= 1:  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "top_p", float(self.top_p))

        # No "-1 means off" as some APIs have: None is off, so every int is a real k.
        if self.top_k is not None:
            if not _is_int(self.top_k):
                raise ValueError(
                    f"top_k must be None or an int, got {_type_name(self.top_k)}"
                )
            if self.top_k < 1:
                raise ValueError(f"top_k must be >= 1 (None turns it off), got {self.top_k}")
            object.__setattr__(self, "top_k", int(self.top_k))

        if not _is_real(self.min_p):
            raise ValueError(f"min_p must be a number, got {_type_name(self.min_p)}")
        if not 0 <= self.min_p <= 1:  # also rejects NaN
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        object.__setattr__(self, "min_p", float(self.min_p))

        if self.seed is not None:
            if not _is_int(self.seed):
                raise ValueError(f"seed must be None or an int, got {_type_name(self.seed)}")
            # torch.Generator.manual_seed takes a uint64; negative seeds would wrap.
            if not 0 <= self.seed < 2**64:
                raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
            object.__setattr__(self, "seed", int(self.seed))

        object.__setattr__(self, "stop", _normalize_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalize_stop_token_ids(self.stop_token_ids))

        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {_type_name(value)}")

        if self.logprobs is not None:
            if not _is_int(self.logprobs):
                raise ValueError(
                    f"logprobs must be None or an int, got {_type_name(self.logprobs)}"
                )
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
            object.__setattr__(self, "logprobs", int(self.logprobs))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> SamplingParams:
        """Build from a decoded JSON object; a misspelled key is an error, not a default."""
        if not isinstance(d, Mapping):
            raise ValueError(f"sampling params must be a mapping, got {_type_name(d)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise ValueError(
                f"{unknown[0]} is not a sampling parameter "
                f"(unknown: {', '.join(unknown)}; known: {', '.join(sorted(known))})"
            )
        return cls(**d)


def _normalize_stop(stop: object) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a str or a list of str, got {_type_name(stop)}")
    # An empty stop string would match before every token.
    if any(s == "" for s in stop):
        raise ValueError("stop must not contain empty strings")
    return tuple(stop)


def _normalize_stop_token_ids(ids: object) -> tuple[int, ...]:
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"stop_token_ids must be a list of int, got {_type_name(ids)}")
    for i in ids:
        if not _is_int(i) or i < 0:
            raise ValueError(f"stop_token_ids must hold non-negative ints, got {i!r}")
    return tuple(int(i) for i in ids)


def skip_draw(generator: torch.Generator, vocab: int) -> None:
    """Advance a request's generator past one sampled step, exactly as the sampler would
    have consumed it. Decode calls it for the first token, which prefill sampled with its
    own copy of the generator, so seeded output equals colocated output."""
    torch.empty(vocab, dtype=torch.float32, device=generator.device).exponential_(generator=generator)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The per-request generator for a seeded request; it must live on the logits' device."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [n] int64, CPU (on the logits' device with keep_on_device)
    logprobs: torch.Tensor | None  # [n] float32, CPU: raw logprob of the chosen token;
    #                                None when no row asked (rows that did not ask get it too)
    top_logprobs: list[list[tuple[int, float]] | None]  # per row: top-n (id, logprob),
    #                                highest first; [] for logprobs=0; None if not asked


class Sampler:
    """Stateless: everything per-request arrives with the call (params, generators)."""

    def __call__(
        self,
        logits: torch.Tensor,  # [n, vocab], any float dtype
        params: Sequence[SamplingParams],  # [n]
        generators: Sequence[torch.Generator | None],  # [n]; used for sampled rows only
        keep_on_device: bool = False,  # token_ids stay on logits' device (no sync) unless logprobs
    ) -> SamplerOutput:
        _check_inputs(logits, params, generators)
        n = logits.shape[0]
        logits = logits.float()  # exact for bf16/fp16; no copy for float32, never written

        tokens = torch.empty(n, dtype=torch.int64, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if greedy:
            # torch.argmax returns the first maximal index: ties go to the lowest id.
            _put_rows(tokens, greedy, _rows(logits, greedy).argmax(dim=-1))
        if sampled:
            drawn = _sample(
                _rows(logits, sampled),
                [params[i] for i in sampled],
                [generators[i] for i in sampled],
            )
            _put_rows(tokens, sampled, drawn)

        if all(p.logprobs is None for p in params):
            return SamplerOutput(tokens if keep_on_device else tokens.cpu(), None, [None] * n)
        return _with_logprobs(logits, tokens, params)


def _check_inputs(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [n, vocab], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have a non-empty vocab dimension")
    n = logits.shape[0]
    if len(params) != n or len(generators) != n:
        raise ValueError(
            f"need one SamplingParams and one generator slot per logits row: "
            f"{n} rows, {len(params)} params, {len(generators)} generators"
        )
    for g in generators:
        if g is not None and not _same_device(g.device, logits.device):
            raise ValueError(
                f"generator is on {g.device} but logits are on {logits.device}; "
                f"make it with make_generator(seed, logits.device)"
            )


def _same_device(a: torch.device, b: torch.device) -> bool:
    # torch.device("cuda") has no index; treat it as matching any CUDA index.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on `device`, without making the host wait.

    A copy from pageable memory blocks the host until the GPU has caught up with every
    queued kernel; a pinned source lets the copy queue behind them instead.
    """
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _rows(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """t[idx], without a gather when idx is every row in order (the common case)."""
    if len(idx) == t.shape[0]:
        return t
    return t.index_select(0, _to_device(idx, torch.int64, t.device))


def _put_rows(dst: torch.Tensor, idx: list[int], src: torch.Tensor) -> None:
    """dst[idx] = src, in place."""
    if len(idx) == dst.shape[0]:
        dst.copy_(src)
    else:
        dst.index_copy_(0, _to_device(idx, torch.int64, dst.device), src)


def _sample(
    logits: torch.Tensor,  # [m, vocab] float32, not written
    params: list[SamplingParams],  # [m], none greedy
    generators: list[torch.Generator | None],  # [m]
) -> torch.Tensor:  # [m] int64
    device = logits.device
    temperature = _to_device([p.temperature for p in params], torch.float32, device)
    # Subtracting the row max first keeps the top token at exactly 0 and every other
    # value <= 0, so a tiny temperature cannot overflow to inf (and inf - inf = NaN).
    x = (logits - logits.amax(dim=-1, keepdim=True)) / temperature[:, None]

    # Only rows with top-k or top-p pay for the vocab sort.
    filtered = [i for i, p in enumerate(params) if p.top_k is not None or p.top_p < 1]
    if filtered:
        vocab = x.shape[1]
        top_k = _to_device(
            [min(params[i].top_k or vocab, vocab) for i in filtered], torch.int64, device
        )
        top_p = _to_device([params[i].top_p for i in filtered], torch.float32, device)
        _put_rows(x, filtered, _top_k_top_p(_rows(x, filtered), top_k, top_p))

    if any(p.min_p > 0 for p in params):
        # min-p keeps tokens with prob >= min_p * max prob. The ratio prob/max_prob is
        # exp(x) (the top token sits at x = 0), and top-k/top-p renormalising does not
        # change it, so the test is x >= log(min_p). A row with min_p = 0 compares
        # against log(0) = -inf and keeps everything.
        log_min_p = _to_device([p.min_p for p in params], torch.float32, device).log()
        x = x.masked_fill(x < log_min_p[:, None], float("-inf"))

    probs = x.softmax(dim=-1)
    return (probs / _exponential_noise(probs, generators)).argmax(dim=-1)


def _top_k_top_p(
    x: torch.Tensor,  # [s, vocab] scaled logits, row max at 0
    top_k: torch.Tensor,  # [s] int64 in [1, vocab]; vocab => off
    top_p: torch.Tensor,  # [s] float32 in (0, 1]; 1 => off
) -> torch.Tensor:  # [s, vocab], dropped tokens at -inf
    # Stable descending sort: among equal logits the lower id ranks first, so top_k=1
    # keeps exactly the token greedy would pick.
    sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(x.shape[1], device=x.device)
    keep = rank[None, :] < top_k[:, None]

    # Nucleus over the top-k-renormalised distribution: keep a token while the mass
    # ranked strictly above it is < top_p. The first token has 0 above it, so it always
    # stays. top_p = 1 skips the test: float cumsum can reach 1 before the tail ends.
    probs = sorted_x.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    keep &= (mass_above < top_p[:, None]) | (top_p[:, None] >= 1)

    keep_by_id = torch.empty_like(keep).scatter_(-1, order, keep)
    return x.masked_fill(~keep_by_id, float("-inf"))


def _exponential_noise(
    probs: torch.Tensor,  # [m, vocab]
    generators: list[torch.Generator | None],  # [m]
) -> torch.Tensor:  # [m, vocab] Exponential(1) noise
    """Noise for the exponential race: argmax(p_i / E_i) picks i with probability p_i.

    A seeded row draws its `vocab` values from its own generator, in vocabulary order,
    so what it gets does not depend on the other rows (batch invariance).
    """
    noise = torch.empty_like(probs)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        noise.exponential_()
    elif unseeded:
        draws = noise.new_empty((len(unseeded), noise.shape[1])).exponential_()
        _put_rows(noise, unseeded, draws)
    for i in seeded:
        noise[i].exponential_(generator=generators[i])
    # A draw of exactly 0 would turn a dropped token's 0 / 0 into NaN, which argmax
    # picks; the smallest normal float keeps it at 0 and changes nothing else.
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _with_logprobs(
    logits: torch.Tensor,  # [n, vocab] float32
    tokens: torch.Tensor,  # [n] int64, same device
    params: Sequence[SamplingParams],
) -> SamplerOutput:
    n, vocab = logits.shape
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)

    wants_top = [i for i, p in enumerate(params) if p.logprobs]
    width = min(max((params[i].logprobs or 0 for i in wants_top), default=0), vocab)
    parts = [tokens, chosen]
    if wants_top:
        top_values, top_ids = _rows(logprobs, wants_top).topk(width, dim=-1)
        parts += [top_ids.flatten(), top_values.flatten()]

    # One device-to-host copy for everything: float64 holds every float32 value and
    # every id below 2**53 exactly.
    host = torch.cat([p.double() for p in parts]).cpu()
    token_ids = host[:n].long()
    chosen_cpu = host[n : 2 * n].float()

    top: list[list[tuple[int, float]] | None] = [None] * n
    for i, p in enumerate(params):
        if p.logprobs == 0:
            top[i] = []
    if wants_top:
        k = len(wants_top) * width
        ids = host[2 * n : 2 * n + k].long().view(len(wants_top), width).tolist()
        values = host[2 * n + k :].float().view(len(wants_top), width).tolist()
        for row, i in enumerate(wants_top):
            m = params[i].logprobs
            top[i] = list(zip(ids[row][:m], values[row][:m]))
    return SamplerOutput(token_ids, chosen_cpu, top)
