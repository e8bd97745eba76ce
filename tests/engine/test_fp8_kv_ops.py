"""The ops layer on an fp8 (float8_e4m3fn) KV cache with per-tensor (K, V) scales.

One step of a small batch built by build_metadata, as the engine builds it: two decode
rows, a prefill chunk after a cached prefix and a fresh prefill, on the global layers and
on the chunked-local ones (whose released blocks are -1 in the tables). The history and
the step's new keys go in through write_kv; then
  - the fp8 cache's bytes are tandem_kernels/kv_write.py's reference quantisation;
  - TorchOps.attention on the fp8 cache equals TorchOps.attention on the dequantised
    cache (cache.float() * scale, in the model's dtype): exactly in fp32, up to bf16
    rounding of the dequantised keys in bf16;
  - TritonOps (kernels in Triton's interpreter) writes the same bytes and attends like
    TorchOps.
Slots nothing writes hold NaN, so reading one shows."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.attention import SeqSpan, build_metadata  # noqa: E402
from engine.ops import TorchOps  # noqa: E402

FP8 = torch.float8_e4m3fn
BS, KVH, G, D, NUM_BLOCKS = 16, 2, 4, 32, 12
CHUNK = 32  # the local layers' attention chunk


def _spans(chunk: int | None) -> list[SeqSpan]:
    """Decode at 40 (on the local layers its chunk starts at 32: blocks 0 and 1 released),
    a 12-token chunk after a 20-token prefix, decode at 3, a fresh 5-token prefill."""
    released = None if chunk else 5
    return [SeqSpan(0, 40, 1, (released, None if chunk else 2, 9)),
            SeqSpan(1, 20, 12, (7, 1)),
            SeqSpan(13, 3, 1, (4,)),
            SeqSpan(14, 0, 5, (8,))]


def _history_slots(spans: list[SeqSpan], chunk: int | None) -> torch.Tensor:
    """Cache slots of the keys before each request's new tokens that its layers still see."""
    slots = []
    for s in spans:
        first = (s.q_start // chunk) * chunk if chunk else 0
        slots += [s.block_table[p // BS] * BS + p % BS for p in range(first, s.q_start)]
    return torch.tensor(slots, dtype=torch.long)


def _step(write_kv, spans, chunk, dtype, kv_scale, seed):
    """Write the history and the step's keys into a fresh fp8 cache with write_kv(cache, k,
    v, slots, kv_scale); return the cache, the metadata and the step's queries."""
    gen = torch.Generator().manual_seed(seed)
    cache = torch.full((2, NUM_BLOCKS, BS, KVH, D), 0x7F, dtype=torch.uint8).view(FP8)  # NaN
    hist = _history_slots(spans, chunk)
    meta = build_metadata(spans, BS, chunk, torch.device("cpu"), kv_scale=kv_scale)
    for slots in (hist, meta.slot_mapping):
        k, v = (torch.randn(len(slots), KVH, D, generator=gen).to(dtype) * 2 for _ in range(2))
        write_kv(cache, k, v, slots, meta.kv_scale)
    q = torch.randn(len(meta.slot_mapping), KVH * G, D, generator=gen).to(dtype)
    return cache, meta, q


def _dequantised(cache: torch.Tensor, kv_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (cache.float() * kv_scale[:, None, None, None, None]).to(dtype)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not got.isnan().any()
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()


KV_SCALE = torch.tensor([0.0123, 0.0051])  # 448 * scale: 5.5 and 2.3, so some values saturate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, CHUNK])
def test_torch_ops_fp8_cache_matches_the_dequantised_cache(dtype, chunk):
    from tandem_kernels.kv_write import write_kv_reference

    ops, spans = TorchOps(), _spans(chunk)
    cache, meta, q = _step(ops.write_kv, spans, chunk, dtype, KV_SCALE, seed=11)
    assert meta.decode is not None and len(meta.prefills) == 2 and meta.kv_scale is KV_SCALE
    assert meta.prefills[0].end - meta.prefills[0].start < len(meta.prefills[0].kv_slots)  # after a prefix

    # write_kv stored tandem_kernels/kv_write.py's reference quantisation, bit for bit.
    want, _, _ = _step(write_kv_reference, spans, chunk, dtype, KV_SCALE, seed=11)
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))

    plain = build_metadata(spans, BS, chunk, torch.device("cpu"))
    got = ops.attention(q, cache, meta, 0.17)
    ref = ops.attention(q, _dequantised(cache, KV_SCALE, dtype), plain, 0.17)
    if dtype == torch.float32:  # the same fp32 values through the same torch calls
        assert torch.equal(got, ref)
    else:  # decode rows: fp32 keys against bf16-rounded ones; prefill rows: both bf16
        _close(got, ref, 1e-2)
        rows = torch.cat([torch.arange(s.start, s.end) for s in meta.prefills])
        assert torch.equal(got[rows], ref[rows])
    # The scales were applied: the raw fp8 values give another answer.
    raw = ops.attention(q, cache.float().to(dtype), plain, 0.17)
    assert (raw.float() - ref.float()).abs().max() > 0.1 * ref.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, CHUNK])
def test_triton_ops_fp8_cache_match_torch_ops(dtype, chunk):
    pytest.importorskip("triton")
    from engine.ops import TritonOps

    triton_ops = TritonOps()
    triton_ops.on_cpu = True  # the kernels in Triton's interpreter
    seen = []
    kernel = triton_ops._paged_decode
    triton_ops._paged_decode = lambda *a, **k: seen.append(a[7]) or kernel(*a, **k)  # a[7]: kv_scale
    spans = _spans(chunk)
    cache, meta, q = _step(triton_ops.write_kv, spans, chunk, dtype, KV_SCALE, seed=5)
    want_cache, _, _ = _step(TorchOps().write_kv, spans, chunk, dtype, KV_SCALE, seed=5)
    assert torch.equal(cache.view(torch.uint8), want_cache.view(torch.uint8))

    tol = 1e-5 if dtype == torch.float32 else 1e-2
    dec = meta.decode
    got = triton_ops.decode_attention(q[dec.token_index], cache, dec, 0.17, meta.kv_scale)
    want = TorchOps().decode_attention(q[dec.token_index], cache, dec, 0.17, meta.kv_scale)
    _close(got, want, tol)
    _close(triton_ops.attention(q, cache, meta, 0.17), TorchOps().attention(q, cache, meta, 0.17), tol)
    assert len(seen) == 2 and all(s is KV_SCALE for s in seen)


def test_kv_scale_must_match_the_cache():
    pytest.importorskip("triton")
    from engine.ops import TritonOps

    spans = _spans(None)
    fp8_cache = torch.zeros(2, NUM_BLOCKS, BS, KVH, D).to(FP8)
    plain_cache = torch.zeros(2, NUM_BLOCKS, BS, KVH, D)
    meta = build_metadata(spans, BS, None, torch.device("cpu"))
    scaled = build_metadata(spans, BS, None, torch.device("cpu"), kv_scale=KV_SCALE)
    t = len(meta.slot_mapping)
    k = v = torch.zeros(t, KVH, D)
    q = torch.zeros(t, KVH * G, D)
    triton_ops = TritonOps()
    triton_ops.on_cpu = True
    for ops in (TorchOps(), triton_ops):
        for cache, m, scale in ((fp8_cache, meta, None), (plain_cache, scaled, KV_SCALE),
                                (fp8_cache, scaled, KV_SCALE.double()), (fp8_cache, scaled, KV_SCALE[:1])):
            with pytest.raises(ValueError, match="kv_scale"):
                ops.write_kv(cache, k, v, m.slot_mapping, scale)
            with pytest.raises(ValueError, match="kv_scale"):
                ops.decode_attention(q[m.decode.token_index], cache, m.decode, 0.1, scale)
            if scale is None or scale is KV_SCALE:
                with pytest.raises(ValueError, match="kv_scale"):
                    ops.attention(q, cache, m, 0.1)
