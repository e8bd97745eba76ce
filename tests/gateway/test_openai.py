"""The official `openai` client against the REST shim of a real stack: completions and
chat, streamed and not, give the offline engine's greedy text (stop strings and
max_tokens included); usage, logprobs and seeded sampling agree with it too."""

import math

import pytest

from engine.sampling import SamplingParams

PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "In a distant galaxy, long ago, there lived a robot who " * 4,  # > 32 tokens: prefilled remotely
    "1 2 3 4 5 6 7 8",
]


def offline_text(offline, prompt, **kw):
    p = SamplingParams(temperature=0, **kw)
    return offline.generate(prompt, p)[0]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("stream", [False, True])
def test_completions_match_offline(client, offline, model_name, prompt, stream):
    ref = offline_text(offline, prompt, max_tokens=12, ignore_eos=True)
    kw = dict(model=model_name, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    else:
        r = client.completions.create(**kw)
        text, usage = r.choices[0].text, r.usage
        assert r.choices[0].finish_reason == "length"
    assert text == ref.text
    assert usage.prompt_tokens == len(ref.prompt_token_ids) and usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + 12


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_and_max_tokens(client, offline, model_name, stream):
    prompt = PROMPTS[0]
    full = offline_text(offline, prompt, max_tokens=16, ignore_eos=True).text
    stop = full[len(full) // 2: len(full) // 2 + 3]  # a stop string the greedy text really contains
    assert stop.strip(), "pick a visible stop string"
    ref = offline_text(offline, prompt, max_tokens=16, ignore_eos=True, stop=[stop])
    kw = dict(model=model_name, prompt=prompt, max_tokens=16, temperature=0, stop=[stop],
              extra_body={"ignore_eos": True})
    if stream:
        text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    else:
        r = client.completions.create(**kw)
        text = r.choices[0].text
        assert r.choices[0].finish_reason == "stop"
    assert text == ref.text and stop not in text and full.startswith(text)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_matches_offline(client, offline, model_name, stream):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]
    ref = offline.chat(messages, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    kw = dict(model=model_name, messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        r = client.chat.completions.create(**kw)
        text, usage = r.choices[0].message.content, r.usage
        assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert text == ref.text
    assert usage.prompt_tokens == len(ref.prompt_token_ids) and usage.completion_tokens == 10


def test_logprobs_match_offline(client, offline, model_name):
    prompt = PROMPTS[0]
    ref = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2))[0]
    r = client.completions.create(model=model_name, prompt=prompt, max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 5 and len(lp.top_logprobs) == 5
    for got, (chosen, top) in zip(lp.token_logprobs, ref.logprobs):
        assert math.isclose(got, chosen, abs_tol=1e-4)
    assert all(len(t) in (2, 3) and tok in t for tok, t in zip(lp.tokens, lp.top_logprobs))  # sampled one listed
    assert "".join(lp.tokens) == r.choices[0].text
    c = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in content)
    assert "".join(e.token for e in content) == c.choices[0].message.content


def test_seeded_sampling_is_repeatable_and_matches_offline(client, offline, model_name):
    prompt = PROMPTS[2]
    ref = offline.generate(prompt, SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=10,
                                                  ignore_eos=True))[0]
    texts = [client.completions.create(model=model_name, prompt=prompt, max_tokens=10, temperature=0.9, top_p=0.9,
                                       seed=1234, extra_body={"ignore_eos": True}).choices[0].text for _ in range(2)]
    assert texts[0] == texts[1] == ref.text


def test_batch_of_prompts(client, offline, model_name):
    r = client.completions.create(model=model_name, prompt=PROMPTS, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c, p in zip(r.choices, PROMPTS):
        assert c.text == offline_text(offline, p, max_tokens=6, ignore_eos=True).text
    assert r.usage.completion_tokens == 18


def test_token_id_prompt(client, offline, model_name):
    ids = offline.tokenizer.encode(PROMPTS[2])
    r = client.completions.create(model=model_name, prompt=ids, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == offline_text(offline, ids, max_tokens=6, ignore_eos=True).text


def test_models_and_openapi(client, stack, model_name):
    import httpx

    assert [m.id for m in client.models.list().data] == [model_name]
    spec = httpx.get(stack.base_url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(spec["paths"])
    assert httpx.get(stack.base_url + "/health").json()["decode"] == 2
