"""Triton kernels against their pure-torch references, on fresh random inputs, run by
Triton's interpreter on the CPU (TRITON_INTERPRET=1 is set before triton is imported).
Shapes stay small: the interpreter is slow."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (7, 100), (3, 5, 576), (2, 1000)])
def test_rms_norm_matches_reference(dtype, shape):
    g = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    got = rms_norm(x, w, 1e-5)
    ref = rms_norm_reference(x, w, 1e-5)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    else:  # two bf16 roundings (normalised value, then times the weight): <= 2 ulps apart
        torch.testing.assert_close(got.float(), ref.float(), rtol=2 * 2**-7, atol=1e-3)


def test_rms_norm_rejects_bad_inputs():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(torch.randn(8, 2).t(), torch.ones(8), 1e-5)


from kernels.rope import rope, rope_reference  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved,norm", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("t,h,kvh,d", [(5, 4, 2, 16), (3, 6, 1, 64)])
def test_rope_matches_reference(dtype, interleaved, norm, t, h, kvh, d):
    g = torch.Generator().manual_seed(t * 100 + h * 10 + d)
    q = torch.randn(t, h, d, generator=g).to(dtype)
    k = torch.randn(t, kvh, d, generator=g).to(dtype)
    pos = torch.randint(0, 5000, (t,), generator=g)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, d, 2).float() / d))
    eps = 1e-5 if norm else None
    got = rope(q, k, pos, inv_freq, interleaved, eps)
    ref = rope_reference(q, k, pos, inv_freq, interleaved, eps)
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:  # cos/sin may differ in the last fp32 bit, which can flip a bf16 rounding
            torch.testing.assert_close(a.float(), b.float(), rtol=2 * 2**-7, atol=2e-2)


def test_rope_strided_q_from_a_projection_view():
    """q and k are views of one [T, (H + 2 KVH) D] projection in fused layouts."""
    t, h, kvh, d = 4, 4, 2, 16
    qkv = torch.randn(t, (h + 2 * kvh) * d)
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d : (h + kvh) * d].view(t, kvh, d)
    pos, inv_freq = torch.arange(t), 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    for a, b in zip(rope(q, k, pos, inv_freq, True, 1e-5), rope_reference(q, k, pos, inv_freq, True, 1e-5)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -- paged decode attention --------------------------------------------------------------
from kernels.paged_attention import paged_decode_attention, paged_decode_attention_reference  # noqa: E402


def _paged_case(seed, dtype, kvh, g, d=32, bs=16, lens=(1, 37, 70), chunk=None):
    """Fresh random caches and block tables with shuffled physical blocks; for a chunked
    layer (chunk), keys start at the query's chunk and earlier table entries are -1."""
    gen = torch.Generator().manual_seed(seed)
    width = max((n - 1) // bs + 1 for n in lens) + 1
    nb = len(lens) * width + 3
    k = torch.randn(nb, bs, kvh, d, generator=gen).to(dtype)
    v = torch.randn(nb, bs, kvh, d, generator=gen).to(dtype)
    q = torch.randn(len(lens), kvh * g, d, generator=gen).to(dtype)
    perm = torch.randperm(nb, generator=gen)
    table = torch.full((len(lens), width), -1, dtype=torch.int32)
    starts = []
    for i, n in enumerate(lens):
        start = ((n - 1) // chunk) * chunk if chunk else 0  # the query sits at position n - 1
        first = start // bs
        table[i, first:(n - 1) // bs + 1] = perm[i * width + first: i * width + (n - 1) // bs + 1].int()
        starts.append(start)
    start_t = torch.tensor(starts, dtype=torch.int32)
    len_t = torch.tensor(lens, dtype=torch.int32) - start_t
    return q, k, v, table, start_t, len_t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kvh, g", [(2, 1), (1, 5), (2, 3)])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("chunk", [None, 32])
def test_paged_decode_attention_matches_reference(dtype, kvh, g, splits, chunk):
    seed = 100 * kvh + 10 * g + splits + (chunk or 0) + (dtype == torch.bfloat16)
    q, k, v, table, start, length = _paged_case(seed, dtype, kvh, g, chunk=chunk)
    out = paged_decode_attention(q, k, v, table, start, length, 0.2, num_splits=splits)
    ref = paged_decode_attention_reference(q, k, v, table, start, length, 0.2)
    assert out.dtype == dtype and out.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (out.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()


def test_paged_decode_attention_rejects_bad_inputs():
    q, k, v, table, start, length = _paged_case(0, torch.float32, 2, 2)
    with pytest.raises(ValueError, match="int32"):
        paged_decode_attention(q, k, v, table.long(), start, length, 1.0)
    with pytest.raises(ValueError, match="kv_len"):
        paged_decode_attention(q, k, v, table, start, torch.zeros_like(length), 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(q, k, v, table[:, :1], start, length, 1.0)
    with pytest.raises(ValueError, match="heads"):
        paged_decode_attention(q[:, :3], k, v, table, start, length, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(q.double(), k, v, table, start, length, 1.0)
