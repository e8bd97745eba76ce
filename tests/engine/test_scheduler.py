"""Batch invariance: a request's greedy tokens do not depend on what ran beside it, on
the token budget (chunked prefill), on preemption or on prefix-cache hits. The block
pools' integrity check runs after every step (check_integrity=True)."""

import random

import pytest

from engine.llm import LLM
from engine.sampling import SamplingParams

N_OUT = 24


def make_prompts(vocab: int, shared_prefix: bool = False) -> list[list[int]]:
    rng = random.Random(7)
    prefix = [rng.randrange(vocab) for _ in range(40)]
    prompts = []
    for i in range(16):
        n = rng.choice([3, 9, 17, 31, 33, 48, 64, 90])
        body = [rng.randrange(vocab) for _ in range(n)]
        prompts.append(prefix + body if shared_prefix and i % 2 == 0 else body)
    return prompts


PARAMS = SamplingParams(max_tokens=N_OUT, temperature=0, ignore_eos=True)


def one_at_a_time(path, prompts):
    llm = LLM(path, num_blocks=256, max_model_len=512, enable_prefix_caching=False)
    return [llm.generate(p, PARAMS)[0].token_ids for p in prompts]


@pytest.fixture(scope="module")
def setup(tiny_llama4_dir):
    plain = make_prompts(202048)
    shared = make_prompts(202048, shared_prefix=True)
    return tiny_llama4_dir, plain, one_at_a_time(tiny_llama4_dir, plain), shared, one_at_a_time(tiny_llama4_dir, shared)


def run_all(llm, prompts):
    outs = llm.generate(prompts, PARAMS)
    llm.engine.check_integrity()
    assert all(s.used == 0 for s in llm.engine.kv.stats().values()), "blocks leaked"
    return [o.token_ids for o in outs]


def test_all_at_once(setup):
    path, prompts, ref, _, _ = setup
    llm = LLM(path, num_blocks=256, max_model_len=512, check_integrity=True)
    assert run_all(llm, prompts) == ref


def test_small_token_budget_chunks_prefill(setup):
    path, prompts, ref, _, _ = setup
    llm = LLM(path, num_blocks=256, max_model_len=512, max_num_batched_tokens=7, check_integrity=True)
    assert run_all(llm, prompts) == ref


def test_arrivals_mid_run(setup):
    path, prompts, ref, _, _ = setup
    llm = LLM(path, num_blocks=256, max_model_len=512, max_num_batched_tokens=64, check_integrity=True)
    eng = llm.engine
    ids, done = {}, {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or eng.has_unfinished:
        if pending and step % 3 == 0:  # a new arrival every third step, mid-decode of others
            i, p = pending.pop(0)
            ids[eng.add_request(p, PARAMS)] = i
        for o in eng.step():
            if o.finished:
                done[ids[o.request_id]] = o.token_ids
        step += 1
    assert [done[i] for i in range(len(prompts))] == ref


def test_preemption_by_recompute(setup):
    path, prompts, ref, _, _ = setup
    # 16 requests of up to 114 tokens in 24 blocks of 16: preemption is certain.
    llm = LLM(path, num_blocks=24, num_local_blocks=12, max_model_len=256, max_num_batched_tokens=64,
              check_integrity=True)
    eng = llm.engine
    ids = [eng.add_request(p, PARAMS) for p in prompts]
    reqs = [eng.scheduler.requests[i] for i in ids]
    done = {}
    while eng.has_unfinished:
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.token_ids
    assert sum(r.num_preemptions for r in reqs) > 0
    assert [done[i] for i in ids] == ref
    assert all(s.used == 0 for s in eng.kv.stats().values())


def test_shared_prefixes_hit_the_cache(setup):
    path, _, _, shared, ref = setup
    llm = LLM(path, num_blocks=256, max_model_len=512, max_num_seqs=4, check_integrity=True)
    outs = llm.generate(shared, PARAMS)
    assert [o.token_ids for o in outs] == ref
    assert sum(o.num_cached_tokens for o in outs) >= 32 * 4  # later sharers reuse the 40-token prefix
