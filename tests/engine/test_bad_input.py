"""Bad input raises ValueError naming the field; the engine keeps serving the others
and leaks no block."""

import pytest

from engine.llm import LLM
from engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama4_dir):
    return LLM(tiny_llama4_dir, num_blocks=32, max_model_len=128, check_integrity=True)


BAD_PROMPTS = [
    ("", "prompt"),
    ([], "prompt_token_ids"),
    ([1, 2, 202048], "prompt_token_ids"),
    ([1, -1], "prompt_token_ids"),
    ([1, "x"], "prompt_token_ids"),
    (list(range(128)), "prompt"),  # no room left under max_model_len
]

BAD_PARAMS = [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(stop=123), "stop"),
    (dict(stop=["ok", 5]), "stop"),
]


def test_bad_inputs_are_rejected_while_others_are_served(llm):
    eng = llm.engine
    good = [eng.add_request([5, 6, 7, 8, 9] * k, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
            for k in (1, 3, 5)]
    eng.step()
    eng.step()
    for prompt, field in BAD_PROMPTS:
        with pytest.raises(ValueError, match=field):
            eng.add_request(prompt, SamplingParams(max_tokens=4))
    for kwargs, field in BAD_PARAMS:
        with pytest.raises(ValueError, match=field):
            eng.add_request([1, 2, 3], SamplingParams(**kwargs))
    with pytest.raises(ValueError, match="stop_token_ids"):
        eng.add_request([1, 2, 3], SamplingParams(stop_token_ids=[10**7]))
    done = {}
    while eng.has_unfinished:
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    assert set(done) == set(good) and all(len(o.token_ids) == 12 for o in done.values())
    eng.check_integrity()
    assert all(s.used == 0 for s in eng.kv.stats().values())


def test_generate_validates_every_prompt_before_queueing_any(llm):
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([[1, 2, 3], [1, 10**9]], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished


def test_abort_frees_blocks(llm):
    eng = llm.engine
    rid = eng.add_request(list(range(10, 70)), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.kv.stats()["global"].used > 0
    assert eng.abort(rid)
    assert not eng.abort(rid)
    eng.check_integrity()
    assert all(s.used == 0 for s in eng.kv.stats().values())


def test_generate_is_all_or_nothing_across_params(llm):
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate([[1, 2, 3], [4, 5, 6]], [SamplingParams(max_tokens=2), SamplingParams(stop_token_ids=[10**7])])
    assert not llm.engine.has_unfinished
    out = llm.generate([[7, 8, 9]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].token_ids) == 3


@pytest.mark.parametrize("prompt", [None, 1.5, [[1, 2], 5]])
def test_prompts_that_are_not_text_or_ids(llm, prompt):
    with pytest.raises(ValueError, match="prompt"):
        llm.generate(prompt, SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished


def test_request_ids(llm):
    eng = llm.engine
    eng.add_request([1, 2, 3], SamplingParams(max_tokens=1), request_id="7")
    ids = {eng.add_request([1, 2, 3], SamplingParams(max_tokens=1)) for _ in range(10)}
    assert "7" not in ids and len(ids) == 10
    for bad in ("", 5):
        with pytest.raises(ValueError, match="request_id"):
            eng.add_request([1, 2, 3], SamplingParams(max_tokens=1), request_id=bad)
    with pytest.raises(ValueError, match="request_id"):
        eng.add_request([1, 2, 3], SamplingParams(max_tokens=1), request_id="7")
    while eng.has_unfinished:
        eng.step()


def test_small_max_model_len_with_default_pools(tiny_llama4_dir):
    llm = LLM(tiny_llama4_dir, block_size=4, max_model_len=8, max_num_seqs=1, num_blocks=64)
    assert len(llm.generate([1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True))[0].token_ids) == 5
