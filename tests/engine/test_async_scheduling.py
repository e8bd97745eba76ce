"""Async scheduling (engine/llm.py) changes when the host learns a token, never which
token: with it forced on (on CPU nothing overlaps, but every piece of bookkeeping runs:
PENDING tokens, inputs copied from the last step's ids, stop checks a step late, the
extra step of a stopped request dropped) the outputs equal the synchronous engine's,
field for field, and the block pools stay whole."""

import pytest

from engine.llm import LLM
from engine.request import PENDING
from engine.sampling import SamplingParams

PROMPTS = [list(range(100, 100 + n)) for n in (5, 30, 47, 70, 3)]


def _llm(path, async_scheduling, **kw):
    kw = {"num_blocks": 96, "max_model_len": 256, "max_num_seqs": 8, **kw}
    return LLM(path, async_scheduling=async_scheduling, check_integrity=True, **kw)


def _fields(outs):
    return [(o.token_ids, o.text, o.finish_reason, o.stop_reason, o.logprobs) for o in outs]


def _params(logprobs=None):
    """Greedy and seeded sampling, lengths that end at different steps."""
    return [
        SamplingParams(max_tokens=24, temperature=0.0, logprobs=logprobs),
        SamplingParams(max_tokens=9, temperature=0.8, seed=7, logprobs=logprobs),
        SamplingParams(max_tokens=30, temperature=0.0, logprobs=logprobs),
        SamplingParams(max_tokens=17, temperature=1.0, top_p=0.9, seed=3, logprobs=logprobs),
        SamplingParams(max_tokens=40, temperature=0.0, logprobs=logprobs),
    ]


@pytest.mark.parametrize("logprobs", [None, 2])
def test_async_outputs_equal_sync(tiny_llama4_dir, logprobs):
    want = _llm(tiny_llama4_dir, False).generate(PROMPTS, _params(logprobs))
    llm = _llm(tiny_llama4_dir, True)
    assert llm.engine.async_scheduling
    got = llm.generate(PROMPTS, _params(logprobs))
    assert _fields(got) == _fields(want)
    assert not llm.engine.has_unfinished
    llm.engine.check_integrity()


def test_async_through_the_graph_buffers(tiny_llama4_dir):
    """The CUDA-graph path's static buffers (run eagerly on CPU) take the PENDING inputs
    too, as rows shift when requests finish."""
    want = _llm(tiny_llama4_dir, False).generate(PROMPTS, _params())
    llm = _llm(tiny_llama4_dir, True)
    llm.engine.runner.enable_decode_graphs(capture=False)
    served, prepare = [], llm.engine.runner.graphs.prepare
    llm.engine.runner.graphs.prepare = lambda ids, *a: served.append(PENDING in ids) or prepare(ids, *a)
    got = llm.generate(PROMPTS, _params())
    assert _fields(got) == _fields(want)
    assert sum(served) > 30  # most graph steps read their inputs from the previous step's ids


def test_stop_a_step_late_drops_the_extra_token(tiny_llama4_dir):
    """A request that stops on a token id has computed one more step by the time the
    host sees it: that token is not emitted, and its slot is freed with the rest."""
    base = _llm(tiny_llama4_dir, False).generate(PROMPTS, SamplingParams(max_tokens=20, temperature=0.0))
    stop_id = base[2].token_ids[5]
    params = SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[stop_id])
    want = _llm(tiny_llama4_dir, False).generate(PROMPTS, params)
    llm = _llm(tiny_llama4_dir, True)
    got = llm.generate(PROMPTS, params)
    assert _fields(got) == _fields(want)
    assert got[2].token_ids[-1] == stop_id and got[2].finish_reason == "stop"
    assert llm.engine.kv.pools["global"].num_free == want_free(llm)


def want_free(llm):
    """Every block free or cached (prefix caching keeps freed blocks findable)."""
    return llm.engine.kv.pools["global"].num_blocks


def test_async_with_preemption(tiny_llama4_dir):
    """A cache too small for the batch: requests are preempted (some while their last
    token is PENDING) and recomputed; outputs still equal the synchronous engine's."""
    params = SamplingParams(max_tokens=40, temperature=0.0)
    want = _llm(tiny_llama4_dir, False, num_blocks=14, max_model_len=200).generate(PROMPTS, params)
    llm = _llm(tiny_llama4_dir, True, num_blocks=14, max_model_len=200)
    sched, preempted = llm.engine.scheduler, []
    schedule = sched.schedule
    sched.schedule = lambda: (lambda plan: preempted.extend(plan.preempted) or plan)(schedule())
    got = llm.generate(PROMPTS, params)
    assert _fields(got) == _fields(want)
    assert preempted and sched.requests == {}


def test_abort_while_a_step_is_in_flight(tiny_llama4_dir):
    llm = _llm(tiny_llama4_dir, True)
    eng = llm.engine
    ids = [eng.add_request(p, SamplingParams(max_tokens=30, temperature=0.0)) for p in PROMPTS]
    for _ in range(6):
        eng.step()
    assert eng._inflight is not None
    assert eng.abort(ids[1]) and eng.abort(ids[3])
    eng.check_integrity()
    finished = {}
    while eng.has_unfinished:
        for o in eng.step():
            if o.finished:
                finished[o.request_id] = o
    assert set(finished) == {ids[0], ids[2], ids[4]}
    eng.check_integrity()
    with pytest.raises(KeyError):  # aborted requests left no trace in the runner's rows
        eng.scheduler.requests[ids[1]]


def test_first_token_is_not_a_step_late(tiny_llama4_dir):
    """The step that samples a prompt's first token is read back at once."""
    eng = _llm(tiny_llama4_dir, True).engine
    rid = eng.add_request(PROMPTS[1], SamplingParams(max_tokens=5, temperature=0.0))
    outs = eng.step()
    assert [o.request_id for o in outs] == [rid] and len(outs[0].token_ids) == 1
    assert eng._inflight is None
    assert eng.step() == []  # the first decode step is launched; its token comes next step
    assert eng._inflight is not None
    (out,) = eng.step()
    assert len(out.token_ids) == 2
