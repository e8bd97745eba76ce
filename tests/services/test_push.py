"""Disaggregation at the engine level: a prefill engine pushes exactly the blocks a
decode engine lacks, layer by layer, and decode's greedy output equals colocated
output. The transport here copies tensors between the two engines in one process (a
fake sender: this tests the block bookkeeping, not a transport)."""

import random
from dataclasses import replace

import pytest

from engine.llm import LLM
from engine.sampling import SamplingParams
from prefill_service.push import DecodeBlocks, Destination, KVPusher

PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


class CopySender:
    def __init__(self, src_caches, dst_caches):
        self.src, self.dst = src_caches, dst_caches
        self.kv_caches = src_caches  # what a KVSender exposes (the pusher sizes messages from it)
        self.sent = []  # (layer, n_blocks)
        self.fences = 0

    def send_layer(self, address, transfer_id, layer, src, dst):
        assert None not in src and None not in dst and len(src) == len(dst)
        self.dst[layer][:, dst] = self.src[layer][:, src]
        self.sent.append((layer, len(src)))

    def fence(self):  # copies synchronously: nothing is left reading the source blocks
        self.fences += 1


def pusher_for(engine, sender):
    """The pusher a prefill service builds around this engine (prefill_service/__main__.py)."""
    return KVPusher(sender, engine.runner.layer_group, engine.config.cache.block_size,
                    engine.config.model.attention_chunk_size, kv=engine.kv)


def decode_blocks(req) -> DecodeBlocks:
    """Where decode takes the prompt's KV: its reserved request's prefix hit and table."""
    return DecodeBlocks(req.num_cached_tokens, {g: list(t) for g, t in req.block_tables.items()})


def disaggregated(p_llm, d_llm, prompt, params=PARAMS):
    P, D = p_llm.engine, d_llm.engine
    req = D.reserve(prompt, params)
    assert req is not None
    sender = CopySender(P.runner.kv_caches, D.runner.kv_caches)
    pusher = pusher_for(P, sender)
    rid = P.add_request(prompt, replace(params, max_tokens=1))
    pusher.add(rid, Destination("local", "t", decode_blocks(req)), len(prompt))
    first = None
    while P.has_unfinished:  # the engine's own step, with the pusher as its layer hook
        for o in P.step(pusher):
            if o.finished:
                first = o.token_ids[0]
        P.check_integrity()
    # The last step sent: the next step fences the sender before its forward (which may
    # write the blocks those sends read), and before its first layer is pushed.
    fences = sender.fences
    assert pusher.fence_due
    pusher.begin(P.scheduler.schedule())
    assert sender.fences == fences + 1 and not pusher.fence_due
    pusher.end()
    o = D.complete_transfer(req.request_id, first)
    final = o if o.finished else None
    while final is None:
        for o in D.step():
            if o.request_id == req.request_id and o.finished:
                final = o
        D.check_integrity()
    return final, sender.sent, req.num_cached_tokens


@pytest.mark.parametrize("budget", [2048, 24])
def test_disaggregated_equals_colocated(tiny_llama4_dir, budget):
    rng = random.Random(3)
    prompts = [[rng.randrange(202048) for _ in range(n)] for n in (5, 31, 32, 70, 130)]
    colo = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=512).generate(prompts, PARAMS)
    p_llm = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=512, max_num_batched_tokens=budget)
    d_llm = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=512)
    for prompt, ref in zip(prompts, colo):
        out, sent, cached = disaggregated(p_llm, d_llm, prompt)
        assert out.token_ids == ref.token_ids
        n = len(prompt)
        per_layer = {}
        for layer, k in sent:
            per_layer[layer] = per_layer.get(layer, 0) + k
        # Global (NoPE) layer 3 gets every block decode lacks; local layers only the last chunk's.
        assert per_layer.get(3, 0) == -(-n // 16) - cached // 16
        window_first = max(cached // 16, (n // 32) * 32 // 16)
        assert per_layer.get(0, 0) == -(-n // 16) - window_first
    for llm in (p_llm, d_llm):
        llm.engine.check_integrity()
        assert all(s.used == 0 for s in llm.engine.kv.stats().values())


def test_decode_prefix_hit_sends_only_the_rest(tiny_llama4_dir):
    rng = random.Random(4)
    shared = [rng.randrange(202048) for _ in range(64)]
    a, b = shared + [1, 2, 3], shared + [7, 8, 9, 10, 11]
    colo = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=512).generate([b], PARAMS)[0]
    p_llm = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=512)
    d_llm = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=512)
    disaggregated(p_llm, d_llm, a)
    out, sent, cached = disaggregated(p_llm, d_llm, b)
    assert cached == 64 and out.token_ids == colo.token_ids
    assert {k for _, k in sent} == {1}  # one block (positions 64..68) per layer


def test_seeded_sampling_disaggregated_equals_colocated(tiny_llama4_dir):
    """Prefill samples the first token with the request's seed; decode skips that draw."""
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    prompt = list(range(7000, 7050))
    colo = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=512).generate(prompt, params)[0]
    p_llm = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=512)
    d_llm = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=512)
    out, _, _ = disaggregated(p_llm, d_llm, prompt, params)
    assert out.token_ids == colo.token_ids


class Following:
    """The pusher as the engine's hook, with the destination's blocks handed over (as
    SetDestination does, set_blocks) right after on_layer(`at_layer`) of step `at_step`:
    the layers before it wait, deferred, and go out once the blocks are known."""

    def __init__(self, pusher, dest, blocks, at_step, at_layer):
        self.pusher, self.dest, self.blocks = pusher, dest, blocks
        self.at_step, self.at_layer, self.step = at_step, at_layer, -1
        self.deferred = 0

    def begin(self, plan):
        self.step += 1
        inner = self.pusher.begin(plan)
        d = self.dest
        if d.known.is_set() and d in self.pusher.dest.values():  # no later step plans blocks decode holds
            assert all(lo >= d.first_sent[g] for g, lo in d.sent_upto.items())
        if inner is None:
            return None

        def on_layer(i):
            inner(i)
            if (self.step, i) == (self.at_step, self.at_layer):
                self.deferred = len(self.dest.deferred)  # layers that waited for the blocks
                self.pusher.set_blocks(self.dest, self.blocks)

        return on_layer

    def end(self):
        self.pusher.end()


def follow(P, D, prompt, params=PARAMS):
    """Decode (engine D) reserves the prompt; prefill (engine P) takes it with a
    destination that follows. (decode's request, sender, pusher, prefill's request id,
    the destination)."""
    req = D.reserve(prompt, params)
    sender = CopySender(P.runner.kv_caches, D.runner.kv_caches)
    pusher = pusher_for(P, sender)
    rid = P.add_request(prompt, replace(params, max_tokens=1))
    dest = Destination("local", "t")
    pusher.add(rid, dest, len(prompt))
    return req, sender, pusher, rid, dest


def disaggregated_following(p_llm, d_llm, prompt, at_step, at_layer, params=PARAMS):
    P, D = p_llm.engine, d_llm.engine
    req, sender, pusher, rid, dest = follow(P, D, prompt, params)
    blocks = decode_blocks(req)
    hook = Following(pusher, dest, blocks, at_step, at_layer)
    first = None
    while P.has_unfinished:
        for o in P.step(hook):
            if o.finished:
                first = o.token_ids[0]
        P.check_integrity()  # pinned blocks included
    if not dest.known.is_set():  # after the prompt's last step (at_step None, or past its steps): as a Prefill handler
        assert at_step is None or hook.step < at_step
        assert dest.deferred and dest.pinned and rid not in pusher.dest
        assert sum(len(ids) for ids in dest.pinned.values()) > 0
        pusher.set_blocks(dest, blocks)
        pusher.send_deferred(dest)
        sender.fence()
        pusher.unpin(dest)
    assert dest.error is None and not dest.deferred and not dest.pinned
    if at_step == 0 and P.config.scheduler.max_num_batched_tokens >= len(prompt):
        assert hook.deferred == at_layer + 1  # one step: every layer up to the handover waited
    o = D.complete_transfer(req.request_id, first)
    final = o if o.finished else None
    while final is None:
        for o in D.step():
            if o.request_id == req.request_id and o.finished:
                final = o
    for e in (P, D):
        e.check_integrity()
    return final, sender.sent, req.num_cached_tokens


@pytest.mark.parametrize("budget,at_step,at_layer", [(2048, 0, 0), (2048, 0, 3), (24, 0, 1), (24, 2, 2),
                                                     (2048, None, None), (24, None, None)])
def test_blocks_that_follow_the_prompt_move_the_same(tiny_llama4_dir, budget, at_step, at_layer):
    """decode's destination_follows: the destination comes while the prompt is computed
    (after a given layer of a given step; budget 24 chunks the prompt, so earlier steps'
    layers wait pinned), or after its last step (at_step None: the engine is done and
    the source blocks stay pinned until sent); decode receives exactly the blocks, and
    generates exactly the tokens, of the ordinary path, its own prefix hit included."""
    rng = random.Random(5)
    shared = [rng.randrange(202048) for _ in range(64)]
    prompts = [[rng.randrange(202048) for _ in range(n)] for n in (70, 130)] + [shared + [1, 2, 3],
                                                                             shared + [9] * 21]
    colo = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=512).generate(prompts, PARAMS)
    plain = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=512, max_num_batched_tokens=budget)
    plain_d = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=512)
    p_llm = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=512, max_num_batched_tokens=budget)
    d_llm = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=512)
    for prompt, ref in zip(prompts, colo):
        _, want_sent, want_cached = disaggregated(plain, plain_d, prompt)
        out, sent, cached = disaggregated_following(p_llm, d_llm, prompt, at_step, at_layer)
        assert out.token_ids == ref.token_ids
        assert cached == want_cached
        per_layer = lambda s: sorted((layer, sum(k for l, k in s if l == layer)) for layer in {l for l, _ in s})  # noqa: E731
        assert per_layer(sent) == per_layer(want_sent)
    assert cached == 64  # the last prompt: decode held the shared prefix, and it was not sent


def test_blocks_that_never_come_never_stall_the_engine(tiny_llama4_dir):
    """No SetDestination: the engine finishes the prompt without waiting, with the
    layers' source blocks pinned (the integrity check counts them); a cancel then
    releases them, nothing was sent, and every block is back in its pool."""
    P = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=512).engine
    sender = CopySender(P.runner.kv_caches, P.runner.kv_caches)
    pusher = pusher_for(P, sender)
    rid = P.add_request(list(range(100, 150)), replace(PARAMS, max_tokens=1))
    dest = Destination("local", "t")
    pusher.add(rid, dest, 50)
    while P.has_unfinished:
        P.step(pusher)
        P.check_integrity()
    assert dest.pinned and sender.sent == []
    assert any(s.used for s in P.kv.stats().values())  # held past the request's end
    dest.cancel("the Prefill RPC ended")
    with pytest.raises(ValueError, match="already known"):  # too late now
        pusher.set_blocks(dest, DecodeBlocks(0, {}))
    pusher.unpin(dest)
    pusher.unpin(dest)  # idempotent
    P.check_integrity()
    assert all(s.used == 0 for s in P.kv.stats().values()) and sender.sent == []


def test_bad_following_blocks_are_refused_and_fail_the_destination(tiny_llama4_dir):
    P = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=512).engine
    pusher = pusher_for(P, CopySender(P.runner.kv_caches, P.runner.kv_caches))
    dest = Destination("local", "t")
    pusher.add("r", dest, 50)
    with pytest.raises(ValueError, match="multiple of block_size"):
        pusher.set_blocks(dest, DecodeBlocks(5, {"global": [1, 2, 3, 4], "local": [5, 6, 7, 8]}))
    assert dest.known.is_set() and "bad destination" in dest.error
    dest = Destination("local", "t")
    pusher.add("r", dest, 50)
    with pytest.raises(ValueError, match="do not cover"):
        pusher.set_blocks(dest, DecodeBlocks(0, {"global": [1, 2], "local": [5, 6, 7, 8]}))


def test_late_sends_from_a_step_that_pushes_nothing_still_fence_the_next_step(tiny_llama4_dir):
    """The blocks come while the prompt is still being computed, but in a step that
    completes no block (budget 8 < block 16): that step's end sends the deferred layers
    and unpins their blocks, so the next step must fence the sender before its forward
    may write them (found by review: it did not)."""
    P = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=512, max_num_batched_tokens=8).engine
    D = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=512).engine
    req, sender, pusher, _, dest = follow(P, D, list(range(300, 340)))
    P.step(pusher)  # tokens 0-7: no block full
    P.step(pusher)  # tokens 8-15: block 0 full, deferred and pinned
    assert dest.pinned and dest.deferred and sender.sent == []
    pusher.set_blocks(dest, decode_blocks(req))
    fences = sender.fences
    P.step(pusher)  # tokens 16-23: fenced first (step 2 pushed), completes no block, sends the deferred layers
    assert sender.fences == fences + 1 and sender.sent and not dest.pinned and not dest.deferred
    assert pusher.fence_due  # the blocks just unpinned may be written by the next forward
    P.step(pusher)
    assert sender.fences == fences + 2
    P.check_integrity()
