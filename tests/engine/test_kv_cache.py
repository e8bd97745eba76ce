"""Block pool and KV cache manager: ownership, LRU eviction, prefix hashing, the local
window, and the integrity check itself (it must catch what it claims to)."""

from collections import Counter

import pytest

from engine.kv_cache import GLOBAL, LOCAL, BlockPool, KVCacheManager
from engine.llm import LLM
from engine.request import Request
from engine.sampling import SamplingParams


def test_pool_allocate_release_lru_and_revival():
    pool = BlockPool(4, enable_caching=True)
    a, b, c, d = pool.allocate(4)
    assert pool.num_free == 0
    pool.cache(a, b"ha")
    pool.release([b, a])  # b freed first -> evicted first
    assert pool.stats().cached == 1 and pool.stats().used == 2
    assert pool.lookup(b"ha") == a
    pool.acquire(a)  # revive the cached block: out of the free queue
    assert pool.num_free == 1
    pool.release([a])
    assert pool.allocate(1) == [b]  # LRU: b was freed before a
    assert pool.allocate(1) == [a]  # a's hash is evicted on reuse
    assert pool.lookup(b"ha") is None
    pool.check_integrity(Counter({a: 1, b: 1, c: 1, d: 1}))


def test_pool_rejects_double_free_and_over_allocation():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.release([a])
    with pytest.raises(RuntimeError):
        pool.release([a])
    with pytest.raises(RuntimeError):
        pool.allocate(3)


def test_integrity_check_catches_corruption():
    pool = BlockPool(3, enable_caching=True)
    blocks = pool.allocate(2)
    pool.check_integrity(Counter(blocks))
    with pytest.raises(AssertionError):
        pool.check_integrity(Counter(blocks[:1]))  # a leaked block: held by no table
    pool.free_queue[blocks[0]] = None  # a used block also in the free queue
    with pytest.raises(AssertionError):
        pool.check_integrity(Counter(blocks))


def _req(ids):
    return Request("r", list(ids), SamplingParams(max_tokens=4))


def test_prefix_hit_is_block_aligned_and_leaves_a_token():
    kv = KVCacheManager(4, 16, None, None, enable_prefix_caching=True)
    r1 = _req(range(12))
    assert kv.acquire_prefix(r1) == 0
    assert kv.allocate_slots(r1, 12)
    r1.num_computed_tokens = 12
    kv.cache_full_blocks(r1, from_token=0)
    r2 = _req(range(12))  # identical prompt: 3 full blocks cached, but one token must be computed
    assert kv.acquire_prefix(r2) == 8
    assert r2.block_tables[GLOBAL] == r1.block_tables[GLOBAL][:2]
    r3 = _req(list(range(6)) + [99] * 6)  # diverges inside block 1
    assert kv.acquire_prefix(r3) == 4
    kv.check_integrity([r1, r2, r3])
    for r in (r1, r2, r3):
        kv.free(r)
    kv.check_integrity([])
    assert kv.stats()[GLOBAL].used == 0


def test_pinned_blocks_outlive_their_request_and_count_in_the_integrity_check():
    """Prefill pins the source blocks of layers whose destination has not come: the
    request ends and is freed, the blocks stay held (and not reusable) until unpinned."""
    kv = KVCacheManager(4, 6, None, None, enable_prefix_caching=False)
    r = _req(range(12))
    kv.acquire_prefix(r)
    assert kv.allocate_slots(r, 12)
    held = {GLOBAL: r.block_tables[GLOBAL][1:3]}
    kv.pin(held)
    kv.check_integrity([r])
    kv.free(r)
    kv.check_integrity([])  # the pins account for the two blocks still held
    assert kv.stats()[GLOBAL].used == 2
    others = kv.pools[GLOBAL].allocate(4)
    assert not set(others) & set(held[GLOBAL])  # never handed out while pinned
    kv.pools[GLOBAL].release(others)
    with pytest.raises(RuntimeError, match="not all pinned"):
        kv.unpin({GLOBAL: [held[GLOBAL][0]] * 2})
    kv.unpin(held)
    kv.check_integrity([])
    assert kv.stats()[GLOBAL].used == 0
    kv.pools[GLOBAL].acquire(held[GLOBAL][0])  # a reference nobody accounts for: a leak
    with pytest.raises(AssertionError):
        kv.check_integrity([])


def test_local_window_releases_blocks_behind_the_chunk():
    kv = KVCacheManager(4, 32, 32, chunk=8, enable_prefix_caching=True)
    r = _req(range(30))
    kv.acquire_prefix(r)
    assert kv.allocate_slots(r, 30)
    r.num_computed_tokens = 30
    kv.cache_full_blocks(r, from_token=0)
    kv.release_out_of_window(r)
    # positions 24..29 are in chunk 3 = blocks 6, 7; blocks 0..5 are released (but stay cached)
    assert r.block_tables[LOCAL][:6] == [None] * 6 and None not in r.block_tables[LOCAL][6:]
    assert len(r.block_tables[GLOBAL]) == 8
    assert kv.stats()[LOCAL].used == 2 and kv.stats()[LOCAL].cached == 6
    kv.check_integrity([r])
    # A later request with the same first 28 tokens: hit 24 tokens needs local blocks [24, 24) only
    r2 = _req(list(range(28)) + [5, 5])
    hit = kv.acquire_prefix(r2)
    assert hit == 28 and r2.block_tables[LOCAL] == [None] * 6 + [r.block_tables[LOCAL][6]]
    kv.free(r)
    kv.free(r2)
    kv.check_integrity([])


def test_long_prompt_local_layers_keep_only_the_chunk(tiny_llama4_dir):
    """The saving: a 400-token prompt holds 25+ global blocks but only its chunk's worth
    of local blocks (chunk 32 = 2 blocks, plus one step of 64 tokens in flight)."""
    llm = LLM(tiny_llama4_dir, num_blocks=64, max_model_len=1024, max_num_batched_tokens=64, check_integrity=True)
    eng = llm.engine
    ids = list(range(1000, 1400))
    eng.add_request(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    peak = {GLOBAL: 0, LOCAL: 0}
    while eng.has_unfinished:
        eng.step()
        for g, s in eng.kv.stats().items():
            peak[g] = max(peak[g], s.used)
    print(f"peak blocks in use over a 408-token sequence: {peak}")
    assert peak[GLOBAL] == 26  # ceil(407 / 16): every token's KV, for the global layers
    assert peak[LOCAL] <= 2 + 64 // 16 + 1
    assert eng.kv.stats()[GLOBAL].used == 0 and eng.kv.stats()[LOCAL].used == 0


def test_hash_block_is_blake2b_of_the_parent_and_little_endian_words():
    """The prefix hash's definition (4-byte little-endian ids after the parent's hash),
    written out per id: the packed implementation must give the same bytes, so hashes
    stay comparable across versions and machines."""
    import hashlib
    import random

    from engine.kv_cache import hash_block

    rng = random.Random(3)
    parent = b""
    for _ in range(20):
        tokens = [rng.randrange(202_048) for _ in range(16)]
        want = hashlib.blake2b(parent, digest_size=16)
        want.update(b"".join(t.to_bytes(4, "little") for t in tokens))
        assert hash_block(parent, tokens) == want.digest()
        parent = want.digest()
    with pytest.raises(OverflowError):
        hash_block(parent, [-1])  # PENDING is never hashed
