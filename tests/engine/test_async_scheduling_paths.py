"""Async scheduling (engine/llm.py), paths test_async_scheduling.py leaves out: an idle
engine after a request stopped a step late, a first token from a one-token last chunk,
chunked prefill beside PENDING decodes, an id reused while its old step is in flight,
and the decode role's reserve / complete_transfer between async steps. (The first two
failed before the fix in the commit that added this file.)"""

from engine.request import PENDING
from engine.sampling import SamplingParams

from tests.engine.test_async_scheduling import PROMPTS, _fields, _llm


def _drain(eng):
    got = {}
    while eng.has_unfinished:
        for o in eng.step():
            assert PENDING not in o.token_ids and PENDING not in o.new_token_ids
            if o.finished:
                assert o.request_id not in got, "finished twice"
                got[o.request_id] = o
    return got


def test_engine_is_idle_after_a_request_stops_a_step_late(tiny_llama4_dir):
    """When the last request stops on a token, generate() returns with its extra step
    still in flight: the engine is idle all the same, and prompt_logits runs."""
    base = _llm(tiny_llama4_dir, False).generate(PROMPTS[1], SamplingParams(max_tokens=20, temperature=0.0))[0]
    params = SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[base.token_ids[4]])
    llm = _llm(tiny_llama4_dir, True)
    (out,) = llm.generate(PROMPTS[1], params)
    assert out.finish_reason == "stop"
    assert llm.engine.scheduler.requests == {}
    assert not llm.engine.has_unfinished
    llm.engine.prompt_logits(PROMPTS[0])


def test_first_token_of_a_one_token_last_chunk_is_not_late(tiny_llama4_dir):
    """A prompt whose last chunk is one token (a prefix hit of all but one token, or a
    chunk boundary) still gets its first token from the step that sampled it."""
    prompt = list(range(200, 233))  # 33 tokens, block size 16: a hit leaves 1 to compute
    llm = _llm(tiny_llama4_dir, True)
    llm.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0))
    eng = llm.engine
    rid = eng.add_request(prompt, SamplingParams(max_tokens=5, temperature=0.0))
    outs = eng.step()
    assert eng.scheduler.requests[rid].num_cached_tokens == 32
    assert [o.request_id for o in outs] == [rid]


def test_chunked_prefill_beside_pending_decodes(tiny_llama4_dir):
    """A small budget: prompts chunk while others decode with PENDING inputs; some
    steps hold no sampling row at all (the runner's last ids must survive them);
    stops a step late; the graph buffers' rows shift."""
    SMALL = [PROMPTS[0], PROMPTS[1], PROMPTS[4]]
    base = _llm(tiny_llama4_dir, False).generate(SMALL, SamplingParams(max_tokens=8, temperature=0.0))
    params = [SamplingParams(max_tokens=8 + i, temperature=0.0, stop_token_ids=[base[i].token_ids[2 + i]])
              for i in range(len(SMALL))]
    # Greedy only: a stopped request's extra row changes the batch, so its neighbours'
    # logits move in the last bits, which sampled rows can notice.
    kw = dict(max_num_batched_tokens=9, enable_prefix_caching=False)
    want, got = [], []
    for a, out in ((False, want), (True, got)):  # graphs on both: their padded rows round differently
        llm = _llm(tiny_llama4_dir, a, **kw)
        llm.engine.runner.enable_decode_graphs(capture=False)
        out += llm.generate(SMALL, params)
    assert _fields(got) == _fields(want)


def test_abort_and_reuse_the_id_while_in_flight(tiny_llama4_dir):
    """Abort a request whose PENDING token is in flight and queue a new one under the
    same id: the old step's read-back must not touch the new request."""
    eng = _llm(tiny_llama4_dir, True).engine
    p = SamplingParams(max_tokens=10, temperature=0.0)
    for i, pr in enumerate(PROMPTS[:3]):
        eng.add_request(pr, p, request_id=f"r{i}")
    for _ in range(3):
        eng.step()
    assert eng._inflight is not None and eng.scheduler.requests["r1"].output_token_ids[-1] == PENDING
    assert eng.abort("r1")
    eng.add_request(PROMPTS[3], p, request_id="r1")
    got = _drain(eng)
    want = _llm(tiny_llama4_dir, False).generate(PROMPTS[3], p)[0]
    assert got["r1"].token_ids == want.token_ids
    eng.check_integrity()


def test_decode_role_reserve_and_complete_while_in_flight(tiny_llama4_dir):
    """reserve / complete_transfer / fail_transfer between async steps (as the decode
    service calls them under the loop's lock) give the sync engine's outputs."""

    def run(async_scheduling):
        eng = _llm(tiny_llama4_dir, async_scheduling).engine
        p = SamplingParams(max_tokens=8, temperature=0.0)
        eng.add_request(PROMPTS[0], p, request_id="local")
        eng.step()
        eng.step()
        a = eng.reserve(PROMPTS[2], p, request_id="xfer")
        b = eng.reserve(PROMPTS[1], p, request_id="fail")
        assert a is not None and b is not None
        eng.step()
        eng.complete_transfer("xfer", 7)
        eng.fail_transfer("fail")
        got = _drain(eng)
        eng.check_integrity()
        return {k: (o.token_ids, o.finish_reason) for k, o in got.items()}

    assert run(True) == run(False)
