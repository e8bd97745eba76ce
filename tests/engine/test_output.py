"""Stop conditions and streamed text: stop strings (cut, or kept), stop token ids,
max_tokens and max_model_len; streamed deltas add up to the final text and never leak
a stop string; seeds and logprobs reach the output."""

import pytest

from engine.llm import LLM
from engine.sampling import SamplingParams

PROMPT = [200000, 1985, 220, 1125, 9906, 25]


@pytest.fixture(scope="module")
def llm(tiny_llama4_dir):
    return LLM(tiny_llama4_dir, num_blocks=64, max_model_len=256, check_integrity=True)


@pytest.fixture(scope="module")
def free_run(llm):
    out = llm.generate(PROMPT, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 40
    return out


def stream(llm, params):
    eng = llm.engine
    rid = eng.add_request(PROMPT, params)
    deltas, final = [], None
    while final is None:
        for o in eng.step():
            if o.request_id == rid:
                deltas.append(o.new_text)
                if o.finished:
                    final = o
    return deltas, final


def pick_stop(text: str) -> str:
    # A stop string from the middle of the free-running text, not occurring earlier.
    for start in range(len(text) // 3, len(text) - 3):
        s = text[start : start + 3]
        if text.find(s) == start and s.strip():
            return s
    pytest.skip("no usable stop string in the generated text")


@pytest.mark.parametrize("keep", [False, True])
def test_stop_string_cuts_text_and_stream_never_leaks_it(llm, free_run, keep):
    s = pick_stop(free_run.text)
    i = free_run.text.find(s)
    deltas, final = stream(llm, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[s],
                                               include_stop_str_in_output=keep))
    expected = free_run.text[: i + len(s)] if keep else free_run.text[:i]
    assert final.finish_reason == "stop" and final.stop_reason == s
    assert final.text == expected
    assert "".join(deltas) == expected
    if not keep:
        assert all(s not in "".join(deltas[: k + 1]) for k in range(len(deltas)))
    assert final.token_ids == free_run.token_ids[: len(final.token_ids)]


def test_stream_deltas_add_up_to_the_text(llm, free_run):
    deltas, final = stream(llm, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert "".join(deltas) == final.text == free_run.text


def test_stop_token_id_ends_generation_with_that_token(llm, free_run):
    t = free_run.token_ids[5]
    first = free_run.token_ids.index(t)
    out = llm.generate(PROMPT, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=[t]))[0]
    assert out.token_ids == free_run.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == t


def test_eos_stops_unless_ignored(llm, free_run):
    # Make the free run's 4th token an EOS for a fresh engine view: eos ids come from the model.
    eng = llm.engine
    t = free_run.token_ids[3]
    saved = eng.eos_token_ids
    eng.eos_token_ids = (t,)
    try:
        out = llm.generate(PROMPT, SamplingParams(max_tokens=40, temperature=0))[0]
        assert out.finish_reason == "stop" and out.token_ids[-1] == t and out.stop_reason is None
        out = llm.generate(PROMPT, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
        assert len(out.token_ids) == 40
    finally:
        eng.eos_token_ids = saved


def test_max_model_len_ends_with_length(llm):
    prompt = list(range(1000, 1250))  # 250 of max_model_len 256
    out = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6


def test_seeded_sampling_repeats_and_logprobs_are_returned(llm):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True, logprobs=3)
    a, b = llm.generate([PROMPT, PROMPT[:3]], p)
    c = llm.generate(PROMPT, p)[0]
    assert a.token_ids == c.token_ids
    assert len(a.logprobs) == 12 and all(len(top) == 3 for _, top in a.logprobs)
    assert all(lp <= 0 for lp, _ in a.logprobs)


def test_bf16_on_cpu_runs(tiny_llama4_dir):
    out = LLM(tiny_llama4_dir, dtype="bfloat16", num_blocks=16, max_model_len=128).generate(
        PROMPT, SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(out.token_ids) == 4
