"""The decode role's first token ahead of the KV (LLMEngine.first_token, complete_transfer,
fail_transfer): the token is the request's at once, the request stays out of the batch
until its KV is there, and every way out (KV arrived, transfer failed, the token ended
the request, abort) gives the colocated tokens, each once, and whole block pools. Also
the packed prompts the services pass (array.array), checked at C speed.

A second engine plays prefill: a step hook keeps the block tables of its final step, and
the "transfer" copies those blocks' K/V into the blocks decode reserved."""

import random
from array import array
from dataclasses import replace

import pytest
import torch

from engine.llm import LLM
from engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
_rng = random.Random(5)
PROMPTS = [[_rng.randrange(202048) for _ in range(n)] for n in (40, 70, 97)]


class KeepTables:
    """A step hook (engine.step's `hook`): the block tables of the requests each step
    computes, as they were before the forward wrote them."""

    def __init__(self):
        self.tables = {}

    def begin(self, plan):
        for c in plan.chunks:
            self.tables[c.request.request_id] = {g: list(t) for g, t in c.request.block_tables.items()}

    def end(self):
        pass


@pytest.fixture(scope="module")
def prefill(tiny_llama4_dir):
    """Plays prefill, and computes the colocated reference."""
    return LLM(tiny_llama4_dir, num_blocks=64, max_model_len=256, check_integrity=True)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def decode(tiny_llama4_dir, request):
    return LLM(tiny_llama4_dir, num_blocks=64, max_model_len=256, async_scheduling=request.param,
               check_integrity=True).engine


def prefill_first_token(P, prompt, params):
    """(P's first token for the prompt, the block tables it computed the prompt in)."""
    hook = KeepTables()
    rid = P.add_request(prompt, replace(params, max_tokens=1))
    first = None
    while P.has_unfinished:
        for o in P.step(hook):
            if o.request_id == rid and o.finished:
                first = o.token_ids[0]
    return first, hook.tables[rid]


def transfer(P, D, src_tables, req):
    """Copy the prompt's K/V into every block decode reserved (its prefix hit aside)."""
    first = req.num_cached_tokens // D.config.cache.block_size
    for layer, g in enumerate(D.runner.layer_group):
        for j, b in enumerate(req.block_tables[g]):
            if b is not None and j >= first:
                D.runner.kv_caches[layer][:, b] = P.runner.kv_caches[layer][:, src_tables[g][j]]


def drain(D, outs):
    """Step until idle; every output goes into `outs` (request id -> list of outputs)."""
    while D.has_unfinished:
        for o in D.step():
            outs.setdefault(o.request_id, []).append(o)


def new_tokens(outs):
    return [t for o in outs for t in o.new_token_ids]


def test_first_token_out_before_the_kv_then_decode_as_colocated(prefill, decode):
    P, D = prefill.engine, decode
    want = [o.token_ids for o in prefill.generate(PROMPTS, GREEDY)]
    outs = {}
    D.add_request(PROMPTS[0], GREEDY, request_id="local")  # a batch that keeps stepping meanwhile
    reqs = {rid: D.reserve(p, GREEDY, request_id=rid) for rid, p in (("a", PROMPTS[1]), ("b", PROMPTS[2]))}
    firsts = {rid: prefill_first_token(P, req.prompt_token_ids, GREEDY) for rid, req in reqs.items()}
    for rid, (tok, _) in firsts.items():
        out = D.first_token(rid, tok)
        assert out.new_token_ids == [tok] and not out.finished
        outs[rid] = [out]
    for _ in range(3):  # the first tokens are out, the KV is not here: they stay out of the batch
        for o in D.step():
            outs.setdefault(o.request_id, []).append(o)
            assert o.request_id == "local"
    assert set(D.scheduler.transferring) == {"a", "b"}
    for rid, req in reqs.items():
        transfer(P, D, firsts[rid][1], req)
        assert D.complete_transfer(rid) is None
    drain(D, outs)
    for rid, ref in zip(("local", "a", "b"), want):
        assert new_tokens(outs[rid]) == ref and outs[rid][-1].token_ids == ref  # each token once
    assert all(s.used == 0 for s in D.kv.stats().values())


def test_transfer_failed_after_the_first_token_recomputes(prefill, decode):
    D = decode
    want = prefill.generate(PROMPTS[2], GREEDY)[0].token_ids
    req = D.reserve(PROMPTS[2], GREEDY, request_id="fails")
    outs = {"fails": [D.first_token("fails", want[0])]}
    first = req.num_cached_tokens // D.config.cache.block_size
    for layer, g in enumerate(D.runner.layer_group):  # what a failed transfer left: nothing of it may be read
        blocks = [b for b in req.block_tables[g][first:] if b is not None]
        D.runner.kv_caches[layer][:, blocks] = torch.randn_like(D.runner.kv_caches[layer][:, blocks])
    D.fail_transfer("fails")
    drain(D, outs)
    assert new_tokens(outs["fails"]) == want and outs["fails"][-1].finish_reason == "length"
    assert all(s.used == 0 for s in D.kv.stats().values())


@pytest.mark.parametrize("how", ["stop id, transfer aborted", "max_tokens=1, KV arrived"])
def test_a_first_token_that_ends_the_request_keeps_its_blocks_until_the_close(prefill, decode, how):
    P, D = prefill.engine, decode
    first, tables = prefill_first_token(P, PROMPTS[1], GREEDY)
    params = replace(GREEDY, stop_token_ids=(first,)) if how.startswith("stop") else replace(GREEDY, max_tokens=1)
    req = D.reserve(PROMPTS[1], params, request_id="ends")
    out = D.first_token("ends", first)
    assert out.finished and out.token_ids == [first] and out.finish_reason == ("stop" if "stop" in how else "length")
    # Finished for the client, but bytes may still land in its blocks: they stay held.
    assert D.kv.stats()["global"].used > 0 and "ends" in D.scheduler.transferring
    D.check_integrity()
    assert D.step() == []
    if "aborted" in how:
        D.fail_transfer("ends")
    else:
        transfer(P, D, tables, req)
        D.complete_transfer("ends")
    D.check_integrity()
    assert not D.has_unfinished and all(s.used == 0 for s in D.kv.stats().values())


def test_abort_between_the_first_token_and_the_kv(decode):
    D = decode
    D.reserve(PROMPTS[0], GREEDY, request_id="gone")
    D.first_token("gone", 11)
    assert D.abort("gone")
    D.check_integrity()
    assert not D.has_unfinished and all(s.used == 0 for s in D.kv.stats().values())
    with pytest.raises(KeyError):
        D.complete_transfer("gone")
    with pytest.raises(KeyError):
        D.first_token("gone", 11)


def test_bad_calls_name_the_problem(decode):
    D = decode
    D.reserve(PROMPTS[0], GREEDY, request_id="x")
    with pytest.raises(ValueError, match="first_token"):
        D.complete_transfer("x")  # no first token yet
    with pytest.raises(ValueError, match="outside the vocabulary"):
        D.first_token("x", D.config.model.vocab_size)
    D.first_token("x", 5)
    with pytest.raises(ValueError, match="already"):
        D.first_token("x", 6)
    with pytest.raises(KeyError):
        D.first_token("nobody", 5)
    D.abort("x")
    assert all(s.used == 0 for s in D.kv.stats().values())


def test_packed_prompts_are_checked_like_lists(prefill):
    P = prefill.engine
    vocab = P.config.model.vocab_size
    for code in "IiqL":
        assert P.validate_prompt(array(code, PROMPTS[0])) == PROMPTS[0]
    for bad, match in [(array("I", [1, vocab]), f"token id {vocab} is outside"),
                       (array("q", [3, -2]), "token id -2 is outside"), (array("I"), "must not be empty"),
                       (array("d", [1.0]), "typecode 'd'")]:
        with pytest.raises(ValueError, match="prompt_token_ids") as e:
            P.validate_prompt(bad)
        assert match in str(e.value)
    too_long = array("I", [1]) * P.max_model_len
    with pytest.raises(ValueError, match="max_model_len"):
        P.validate_prompt(too_long)
