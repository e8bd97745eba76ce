"""SamplingParams validation and Sampler behaviour: filters, seeds, distributions, logprobs.

Sampler tests run on CPU, and on CUDA too where a GPU is present. Statistical tests fix
the global seed, so they are deterministic; their bounds are loose enough (p < 1e-4 for
a correct sampler) that a change of RNG stream would not make them flaky.
"""

import math

import pytest
import torch

from engine.sampling import (
    MAX_LOGPROBS,
    Sampler,
    SamplerOutput,
    SamplingParams,
    make_generator,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --- SamplingParams -------------------------------------------------------------------


def test_defaults_are_valid_and_not_greedy():
    p = SamplingParams()
    assert p.max_tokens == 16 and p.temperature == 1.0 and not p.greedy
    assert p.stop == () and p.stop_token_ids == () and p.logprobs is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", True),
        ("max_tokens", 1.0),
        ("max_tokens", "16"),
        ("max_tokens", None),
        ("temperature", -1),
        ("temperature", -1e-9),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", True),
        ("temperature", "1"),
        ("temperature", None),
        ("top_p", 0),
        ("top_p", -0.5),
        ("top_p", 1.0001),
        ("top_p", float("nan")),
        ("top_p", False),
        ("top_p", "0.9"),
        ("top_k", 0),
        ("top_k", -1),
        ("top_k", 2.0),
        ("top_k", True),
        ("top_k", "5"),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("min_p", float("nan")),
        ("min_p", True),
        ("min_p", None),
        ("seed", -1),
        ("seed", 2**64),
        ("seed", 1.5),
        ("seed", True),
        ("seed", "42"),
        ("stop", 3),
        ("stop", None),
        ("stop", ["ok", 3]),
        ("stop", [""]),
        ("stop", b"bytes"),
        ("stop", {"a"}),
        ("stop_token_ids", 5),
        ("stop_token_ids", [1, -2]),
        ("stop_token_ids", [1.0]),
        ("stop_token_ids", [True]),
        ("stop_token_ids", ["1"]),
        ("stop_token_ids", None),
        ("ignore_eos", 1),
        ("ignore_eos", None),
        ("include_stop_str_in_output", "yes"),
        ("skip_special_tokens", 0),
        ("logprobs", -1),
        ("logprobs", MAX_LOGPROBS + 1),
        ("logprobs", 1.0),
        ("logprobs", True),
    ],
)
def test_bad_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    assert str(err.value).startswith(field), str(err.value)


def test_error_messages_carry_the_value():
    with pytest.raises(ValueError, match=r"^temperature must be >= 0, got -1$"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match=r"^top_p must be in \(0, 1\], got 0$"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match=r"^max_tokens must be >= 1, got 0$"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match=r"^stop must be a str or a list of str, got int$"):
        SamplingParams(stop=3)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_tokens=1),
        dict(temperature=0),
        dict(temperature=2),
        dict(top_p=1e-9),
        dict(top_p=1),
        dict(top_k=1),
        dict(min_p=0),
        dict(min_p=1),
        dict(seed=0),
        dict(seed=2**64 - 1),
        dict(logprobs=0),
        dict(logprobs=MAX_LOGPROBS),
    ],
)
def test_edge_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_numbers_are_normalized_to_their_field_type():
    p = SamplingParams(temperature=1, top_p=1, min_p=0)
    assert type(p.temperature) is float and type(p.top_p) is float and type(p.min_p) is float


def test_stop_and_stop_token_ids_are_normalized_to_tuples():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=("a",)).stop == ("a",)
    assert SamplingParams(stop_token_ids=[1, 2]).stop_token_ids == (1, 2)
    # Normalized params stay hashable, like any frozen dataclass of tuples.
    hash(SamplingParams(stop=["a"], stop_token_ids=[3]))


def test_params_are_frozen():
    p = SamplingParams()
    with pytest.raises(AttributeError):
        p.temperature = 0.5  # type: ignore[misc]


def test_greedy_means_temperature_zero():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0, top_k=5).greedy
    assert not SamplingParams(temperature=1e-6).greedy


def test_from_dict_builds_and_validates():
    p = SamplingParams.from_dict({"max_tokens": 4, "temperature": 0, "stop": ["x"]})
    assert p == SamplingParams(max_tokens=4, temperature=0.0, stop=("x",))
    assert SamplingParams.from_dict({}) == SamplingParams()
    with pytest.raises(ValueError, match=r"^top_p"):
        SamplingParams.from_dict({"top_p": 0})


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(ValueError, match=r"^temprature") as err:
        SamplingParams.from_dict({"temprature": 0.5, "max_tokens": 3})
    assert "temprature" in str(err.value)
    with pytest.raises(ValueError):
        SamplingParams.from_dict([("max_tokens", 3)])  # type: ignore[arg-type]


def test_make_generator_is_seeded():
    a = torch.rand(5, generator=make_generator(7, "cpu"))
    b = torch.rand(5, generator=make_generator(7, torch.device("cpu")))
    assert torch.equal(a, b)


# --- Sampler: filters and greedy ------------------------------------------------------

sampler = Sampler()


def _run(logits, params, generators=None):
    return sampler(logits, params, generators or [None] * len(params))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(device, dtype):
    torch.manual_seed(0)
    logits = torch.randn(8, 1000, device=device).to(dtype)
    out = _run(logits, [SamplingParams(temperature=0)] * 8)
    assert out.token_ids.device.type == "cpu" and out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.float().argmax(-1).cpu())
    assert out.logprobs is None and out.top_logprobs == [None] * 8


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_ties_go_to_lowest_id(device):
    logits = torch.zeros(3, 10, device=device)
    logits[0, [7, 2, 5]] = 1.0
    logits[1, [9, 4]] = 1.0
    out = _run(logits, [SamplingParams(temperature=0)] * 3)
    assert out.token_ids.tolist() == [2, 4, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=1),
        SamplingParams(top_k=1, temperature=5.0),
        SamplingParams(top_p=1e-6),
        SamplingParams(top_p=1e-6, temperature=5.0),
        SamplingParams(min_p=1.0),
        SamplingParams(min_p=1.0, temperature=5.0),
    ],
    ids=["top_k=1", "top_k=1,T=5", "top_p=tiny", "top_p=tiny,T=5", "min_p=1", "min_p=1,T=5"],
)
def test_degenerate_filters_equal_greedy(device, params):
    torch.manual_seed(1)
    logits = torch.randn(64, 500, device=device)
    greedy = _run(logits, [SamplingParams(temperature=0)] * 64).token_ids
    for _ in range(5):
        assert torch.equal(_run(logits, [params] * 64).token_ids, greedy)


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_1_breaks_ties_like_greedy(device):
    logits = torch.zeros(1, 10, device=device)
    logits[0, [8, 3, 6]] = 2.0
    for _ in range(20):
        assert _run(logits, [SamplingParams(top_k=1)]).token_ids.tolist() == [3]


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_temperature_does_not_produce_nan(device):
    logits = torch.tensor([[1e4, -1e4, 0.0, 9999.0]], device=device)
    for t in (1e-30, 1e-6):
        out = _run(logits, [SamplingParams(temperature=t, top_p=0.9, min_p=0.1)])
        assert out.token_ids.tolist() == [0]


def test_input_logits_are_not_modified():
    torch.manual_seed(2)
    logits = torch.randn(4, 50)
    before = logits.clone()
    _run(
        logits,
        [
            SamplingParams(top_k=3),
            SamplingParams(top_p=0.5, min_p=0.2),
            SamplingParams(temperature=0.3),
            SamplingParams(temperature=0, logprobs=5),
        ],
    )
    assert torch.equal(logits, before)


def test_empty_batch():
    out = _run(torch.empty(0, 32), [])
    assert out.token_ids.shape == (0,) and out.logprobs is None and out.top_logprobs == []


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError):
        sampler(torch.zeros(2, 5), [SamplingParams()], [None, None])
    with pytest.raises(ValueError):
        sampler(torch.zeros(2, 5), [SamplingParams()] * 2, [None])
    with pytest.raises(ValueError):
        sampler(torch.zeros(5), [SamplingParams()], [None])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_generator_on_the_wrong_device_is_rejected():
    with pytest.raises(ValueError, match="generator"):
        sampler(torch.zeros(1, 5, device="cuda"), [SamplingParams()], [make_generator(1, "cpu")])


# --- Sampler: seeds ------------------------------------------------------------------


def _seeded_tokens(logits_steps, index, params, others, device):
    """Tokens row `index` gets over several steps, with `others` around it."""
    gens = [make_generator(p.seed, device) if p.seed is not None else None for p in others]
    mine = make_generator(params.seed, device)
    tokens = []
    for step_logits in logits_steps:
        batch_params = others[:index] + [params] + others[index:]
        batch_gens = gens[:index] + [mine] + gens[index:]
        rows = torch.cat(
            [
                step_logits[1 : index + 1],
                step_logits[:1],
                step_logits[index + 1 : len(batch_params)],
            ]
        )
        tokens.append(sampler(rows, batch_params, batch_gens).token_ids[index].item())
    return tokens


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(seed=1234),
        SamplingParams(seed=1234, temperature=0.7, top_k=50),
        SamplingParams(seed=1234, top_p=0.9, min_p=0.02),
    ],
    ids=["plain", "top_k", "top_p+min_p"],
)
def test_seeded_row_is_batch_invariant(device, params):
    torch.manual_seed(3)
    # Row 0 of every step is the seeded request's logits; the rest feed the neighbours.
    steps = [torch.randn(6, 3000, device=device) * 2 for _ in range(10)]
    alone = _seeded_tokens(steps, 0, params, [], device)
    neighbours = [
        SamplingParams(temperature=0),
        SamplingParams(top_k=5),
        SamplingParams(seed=99, top_p=0.5),
        SamplingParams(min_p=0.1, temperature=1.3),
        SamplingParams(seed=1234),  # same seed, own generator: must not share a stream
    ]
    torch.manual_seed(4)  # a different global RNG stream must not matter either
    batched_first = _seeded_tokens(steps, 0, params, neighbours, device)
    torch.manual_seed(5)
    batched_middle = _seeded_tokens(steps, 3, params, neighbours, device)
    assert alone == batched_first == batched_middle


@pytest.mark.parametrize("device", DEVICES)
def test_different_seeds_give_different_tokens(device):
    logits = torch.zeros(1, 1000, device=device)
    draws = {}
    for seed in (1, 2):
        g = make_generator(seed, device)
        draws[seed] = [
            _run(logits, [SamplingParams(seed=seed)], [g]).token_ids.item() for _ in range(50)
        ]
    assert draws[1] != draws[2]
    # Each stream moves on between steps rather than repeating one token.
    assert len(set(draws[1])) > 40 and len(set(draws[2])) > 40


@pytest.mark.parametrize("device", DEVICES)
def test_unseeded_rows_follow_the_global_rng(device):
    logits = torch.zeros(4, 1000, device=device)
    params = [SamplingParams()] * 4
    torch.manual_seed(11)
    a = _run(logits, params).token_ids
    torch.manual_seed(11)
    b = _run(logits, params).token_ids
    assert torch.equal(a, b)


# --- Sampler: distributions -----------------------------------------------------------

N_DRAWS = 20_000


def _counts(logits_row, params, device, seeded=False):
    """Token counts over N_DRAWS rows of one call (all rows share the logits)."""
    logits = logits_row.to(device).expand(N_DRAWS, -1).contiguous()
    if seeded:
        # Fewer rows: one generator per row is a Python loop.
        logits = logits[:2000]
        gens = [make_generator(s, device) for s in range(logits.shape[0])]
        out = sampler(logits, [params] * logits.shape[0], gens)
    else:
        out = _run(logits, [params] * logits.shape[0])
    return torch.bincount(out.token_ids, minlength=logits.shape[1]).double()


def _assert_matches(counts, probs):
    """Pearson chi-square against expected probs; the bound is the 1e-4 tail for its df."""
    n = counts.sum()
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token outside the allowed set"
    expected = probs[support] * n
    chi2 = (((counts[support] - expected) ** 2) / expected).sum().item()
    df = int(support.sum()) - 1
    # Wilson-Hilferty approximation of the chi-square quantile at p = 1e-4 (z = 3.72).
    z = 3.72
    bound = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3 if df else 0.0
    assert chi2 <= bound, f"chi2={chi2:.1f} > {bound:.1f} (df={df})"


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_matches_softmax(device, temperature):
    torch.manual_seed(20)
    counts = _counts(LOGITS, SamplingParams(temperature=temperature), device)
    _assert_matches(counts, torch.softmax(LOGITS.double() / temperature, -1))


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_matches_softmax(device):
    counts = _counts(LOGITS, SamplingParams(seed=0), device, seeded=True)
    _assert_matches(counts, torch.softmax(LOGITS.double(), -1))


# probs 0.5, 0.25, 0.15, 0.1 (ids shuffled so that id order is not rank order)
FOUR = torch.tensor([0.15, 0.5, 0.1, 0.25]).log()


def _renormalized(keep_ids):
    p = torch.zeros(4, dtype=torch.float64)
    p[keep_ids] = FOUR.double().exp()[keep_ids]
    return p / p.sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "params, allowed",
    [
        (SamplingParams(top_k=2), [1, 3]),
        (SamplingParams(top_k=3), [1, 3, 0]),
        (SamplingParams(top_k=4), [0, 1, 2, 3]),
        (SamplingParams(top_k=100), [0, 1, 2, 3]),  # k above vocab is all of it
        (SamplingParams(top_p=0.4), [1]),  # 0.5 alone reaches 0.4
        (SamplingParams(top_p=0.7), [1, 3]),  # 0.5 + 0.25 reaches 0.7
        (SamplingParams(top_p=0.8), [1, 3, 0]),  # 0.75 < 0.8: needs the 0.15 too
        (SamplingParams(top_p=0.95), [0, 1, 2, 3]),
        (SamplingParams(min_p=0.4), [1, 3]),  # prob >= 0.2
        (SamplingParams(min_p=0.25), [1, 3, 0]),  # prob >= 0.125
        (SamplingParams(top_k=3, top_p=0.8), [1, 3]),  # top-3 renormalised: .56, .28, .17
        (SamplingParams(top_k=3, min_p=0.5), [1, 3]),  # min-p relative to the max
        (SamplingParams(top_p=0.8, min_p=0.25, temperature=1.0), [1, 3, 0]),
    ],
)
def test_filters_keep_the_allowed_set_with_renormalised_probs(device, params, allowed):
    torch.manual_seed(30)
    counts = _counts(FOUR, params, device)
    _assert_matches(counts, _renormalized(allowed))


@pytest.mark.parametrize("device", DEVICES)
def test_filters_apply_after_temperature(device):
    # At T=2 the probs flatten to about .37 .26 .20 .17 (mass above the third: .63), so
    # top_p=0.7 keeps three ids where at T=1 it keeps two.
    torch.manual_seed(31)
    counts = _counts(FOUR, SamplingParams(temperature=2.0, top_p=0.7), device)
    flat = torch.softmax(FOUR.double() / 2, -1)
    keep = torch.zeros(4, dtype=torch.float64)
    keep[[1, 3, 0]] = flat[[1, 3, 0]]
    _assert_matches(counts, keep / keep.sum())


@pytest.mark.parametrize("device", DEVICES)
def test_large_vocab_top_k_never_leaves_the_set(device):
    torch.manual_seed(32)
    logits = torch.randn(64, 32_000, device=device) * 3
    allowed = logits.topk(10, dim=-1).indices.cpu()
    for _ in range(4):
        tokens = _run(logits, [SamplingParams(top_k=10)] * 64).token_ids
        assert (allowed == tokens[:, None]).any(-1).all()


@pytest.mark.parametrize("device", DEVICES)
def test_dropped_tokens_are_never_sampled_with_neg_inf_logits(device):
    # Model-masked tokens arrive as -inf; they must stay at zero probability.
    logits = torch.full((512, 100), float("-inf"), device=device)
    logits[:, [17, 42]] = 0.0
    for params in (SamplingParams(), SamplingParams(top_p=0.99), SamplingParams(min_p=0.5)):
        tokens = _run(logits, [params] * 512).token_ids
        assert set(tokens.tolist()) <= {17, 42}


# --- Sampler: logprobs ----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_chosen_logprob_is_raw_log_softmax(device):
    torch.manual_seed(40)
    logits = torch.randn(4, 300, device=device)
    params = [
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(temperature=0.3, top_k=5, logprobs=0),  # raw, not T-scaled/filtered
        SamplingParams(top_p=0.2, logprobs=2),
        SamplingParams(min_p=0.5),  # did not ask; gets the value anyway
    ]
    out = _run(logits, params)
    raw = torch.log_softmax(logits.float(), -1).cpu()
    expected = raw.gather(-1, out.token_ids[:, None]).squeeze(-1)
    assert out.logprobs is not None and out.logprobs.dtype == torch.float32
    assert out.logprobs.device.type == "cpu"
    torch.testing.assert_close(out.logprobs, expected)
    assert out.top_logprobs[0] == [] and out.top_logprobs[1] == []
    assert out.top_logprobs[3] is None


@pytest.mark.parametrize("device", DEVICES)
def test_top_logprobs_are_sorted_and_correct(device):
    torch.manual_seed(41)
    logits = torch.randn(3, 500, device=device, dtype=torch.bfloat16)
    params = [
        SamplingParams(logprobs=MAX_LOGPROBS),
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(),
    ]
    out = _run(logits, params)
    raw = torch.log_softmax(logits.float(), -1).cpu()
    for row, n in ((0, MAX_LOGPROBS), (1, 3)):
        top = out.top_logprobs[row]
        assert top is not None and len(top) == n
        ids = [i for i, _ in top]
        values = [v for _, v in top]
        assert all(isinstance(i, int) and isinstance(v, float) for i, v in top)
        assert values == sorted(values, reverse=True)
        assert len(set(ids)) == n
        ref = raw[row].topk(n)
        torch.testing.assert_close(torch.tensor(values), ref.values)
        torch.testing.assert_close(torch.tensor(values), raw[row, ids])
        # Nothing outside the list beats its last entry.
        rest = raw[row].clone()
        rest[ids] = float("-inf")
        assert rest.max().item() <= values[-1]
    # Greedy's chosen token is the top-1 alternative.
    assert out.top_logprobs[1][0][0] == out.token_ids[1].item()
    assert out.top_logprobs[2] is None


def test_top_logprobs_wider_than_vocab_are_clipped():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    out = _run(logits, [SamplingParams(temperature=0, logprobs=10)])
    assert [i for i, _ in out.top_logprobs[0]] == [2, 1, 0]


def test_no_logprobs_when_none_asked():
    params = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=2)]
    out = _run(torch.randn(3, 20), params)
    assert isinstance(out, SamplerOutput)
    assert out.logprobs is None and out.top_logprobs == [None, None, None]
