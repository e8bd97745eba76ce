"""Exactness: our engine's logits and greedy tokens against transformers on the same
checkpoint (fp32). Prompts cross several attention chunks (C=32 in the tiny presets)
and several NoPE floor_scale steps (8), prefilled in one go, in odd-sized chunks, and
one token at a time (the decode path)."""

import pytest
import torch
import transformers

from engine.llm import LLM
from engine.sampling import SamplingParams


def engine_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Every position's logits for one prompt, computed through the real scheduler."""
    out = llm.engine.prompt_logits(ids)
    llm.engine.check_integrity()
    assert not llm.engine.has_unfinished
    return out


@pytest.fixture(scope="module", params=["tiny_llama4_dir", "tiny_maverick_dir"])
def llama4_pair(request):
    path = request.getfixturevalue(request.param)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


@pytest.mark.parametrize("budget", [4096, 37, 1])
def test_llama4_logits_match_transformers(llama4_pair, budget):
    path, hf = llama4_pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (150,), generator=g)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    llm = LLM(path, num_blocks=64, max_num_batched_tokens=budget, max_model_len=1024)
    got = engine_logits(llm, ids.tolist())
    assert got.shape == ref.shape
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"{path.name} budget={budget}: max|dlogit|/max|logit| = {rel:.2e}")
    assert rel <= 1e-4


def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_llama4_greedy_64_tokens_match_transformers(llama4_pair):
    path, hf = llama4_pair
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=g).tolist() for n in (7, 45, 90)]
    llm = LLM(path, num_blocks=64, max_model_len=1024)
    outs = llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == _hf_greedy(hf, p, 64)


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers_and_reads_as_english(smollm2_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    llm = LLM(smollm2_dir, num_blocks=128, max_model_len=512)
    tok = llm.tokenizer
    texts = ["The capital of France is", "Once upon a time, in a small village,", "Water boils at"]
    prompts = [tok.encode(t) for t in texts]
    outs = llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    for t, p, o in zip(texts, prompts, outs):
        print(f"\nSmolLM2: {t!r} -> {o.text!r}")
        assert o.token_ids == _hf_greedy(hf, p, 64)
    assert "Paris" in outs[0].text
    assert sum(c.isalpha() or c.isspace() for c in outs[1].text) > 0.8 * len(outs[1].text)
