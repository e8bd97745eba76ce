"""Paged decode attention on an fp8 (float8_e4m3fn) KV cache with per-tensor (K, V)
scales, run by Triton's interpreter on the CPU, against the reference computed on the
dequantised cache (cache.float() * scale), so fp8 rounding cancels and the tolerances are
those of the 16/32-bit caches in test_kernels.py. The sm_90 build of the fp8 variant is
checked there, beside the others (test_paged_decode_compiles_for_h100_with_pipelined_kv_loads)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from tandem_kernels.kv_write import quantize_fp8_reference  # noqa: E402
from tandem_kernels.paged_attention import (  # noqa: E402
    DecodeConfig, choose_num_splits, paged_decode_attention, paged_decode_attention_reference)
from tests.test_kernels import ROWS, _chunked, _paged_case  # noqa: E402

FP8 = torch.float8_e4m3fn


@triton.jit
def _upcast_kernel(x_ptr, f32_ptr, bf16_ptr, f16_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    tl.store(f32_ptr + i, x.to(tl.float32))
    tl.store(bf16_ptr + i, x.to(tl.bfloat16))
    tl.store(f16_ptr + i, x.to(tl.float16))


def test_interpreter_upcasts_every_finite_fp8_value_exactly():
    """The kernel converts fp8 tiles to q's compute type (fp32 in the interpreter, bf16 or
    fp16 on the GPU). Every finite e4m3fn value is a value of each, so the conversion must
    be exact: all 254 finite bit patterns (zeros, subnormals, +-448), against torch. The
    interpreter reads the two NaN patterns (0x7f, 0xff) as +-480 (checked on Triton 3.6
    and 3.9); the writer never stores them (it saturates at +-448)."""
    bits = torch.arange(256, dtype=torch.uint8)
    x = bits.view(FP8)
    want = x.float()
    finite = ~want.isnan()
    assert int(finite.sum()) == 254
    outs = torch.empty(256), torch.empty(256, dtype=torch.bfloat16), torch.empty(256, dtype=torch.float16)
    _upcast_kernel[(1,)](x, *outs, N=256)
    for got in outs:
        assert torch.equal(got.float()[finite], want[finite]), got.dtype
        assert torch.equal(got[finite].float().signbit(), want[finite].signbit())  # -0.0 stays -0.0


def _fp8_case(seed, dtype, kvh, g, rows):
    """_paged_case's q and caches, the caches quantised to e4m3 with a random positive
    scale each for K and V (x / scale saturates at +-448 where |x| > 448 * scale: some
    do at the small scales). Unread slots hold NaN (0x7f or 0xff), as in the 16/32-bit tests."""
    q, k, v, table, start, length = _paged_case(seed, dtype, kvh, g, rows)
    gen = torch.Generator().manual_seed(seed + 1)
    kv_scale = 10 ** (torch.rand(2, generator=gen) - 2.5)  # [0.003, 0.03]: 448 * scale in [1.4, 14]
    k8, v8 = quantize_fp8_reference(k, kv_scale[0]), quantize_fp8_reference(v, kv_scale[1])
    assert k8.dtype == FP8 and (k8.view(torch.uint8) & 0x7F == 0x7F).any()  # the poisoned slots survive
    return q, k8, v8, table, start, length, kv_scale


# (q dtype, kv heads, GQA group, splits, keys per tile (None: the engine's default config and
# choose_num_splits), rows): GQA 1 / 4 / 5; one split (the kernel normalises, so the V scale
# meets the output) and several (the merge kernel, so it meets the partials, and more splits
# than tiles); tiles of one cache block, two and four; ragged lengths, released (-1) blocks
# before kv_start, chunked-local rows starting at a chunk boundary.
CASES = [
    (torch.float32, 2, 1, 1, 32, ROWS),
    (torch.bfloat16, 1, 4, 3, 32, ROWS),
    (torch.float32, 1, 5, 2, 16, _chunked((1, 37, 70), 32)),
    (torch.bfloat16, 2, 5, 1, 64, _chunked((1, 37, 70, 90), 24)),
    (torch.float16, 1, 4, 4, 32, ROWS),
    (torch.bfloat16, 2, 4, None, None, ROWS),
]


@pytest.mark.parametrize("dtype, kvh, g, splits, block_n, rows", CASES)
def test_fp8_paged_decode_matches_reference_on_the_dequantised_cache(dtype, kvh, g, splits, block_n, rows):
    seed = 1000 + 100 * kvh + 10 * g + (splits or 0) + (block_n or 0) + len(rows) + (dtype == torch.bfloat16)
    q, k8, v8, table, start, length, kv_scale = _fp8_case(seed, dtype, kvh, g, rows)
    if block_n is None:  # the engine's call
        splits = choose_num_splits(len(rows), kvh, table.shape[1], num_sms=4)
        out = paged_decode_attention(q, k8, v8, table, start, length, 0.2, kv_scale, num_splits=splits,
                                     validate=False)
    else:
        out = paged_decode_attention(q, k8, v8, table, start, length, 0.2, kv_scale, num_splits=splits,
                                     config=DecodeConfig(block_n, 1, 1))
    ref = paged_decode_attention_reference(q, k8, v8, table, start, length, 0.2, kv_scale=kv_scale)
    assert out.dtype == dtype and out.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # as for 16/32-bit caches (test_kernels.py)
    assert (out.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
    # The scales were applied: the unscaled cache gives another answer.
    plain = paged_decode_attention_reference(q, k8, v8, table, start, length, 0.2)
    assert (plain.float() - ref.float()).abs().max() > 10 * tol * ref.float().abs().max()


def test_fp8_reference_is_the_reference_on_a_dequantised_cache():
    """The fp8 reference is exactly the fp32 reference run on cache.float() * scale."""
    q, k8, v8, table, start, length, kv_scale = _fp8_case(3, torch.float32, 2, 4, ROWS)
    got = paged_decode_attention_reference(q, k8, v8, table, start, length, 0.3, kv_scale=kv_scale)
    want = paged_decode_attention_reference(q, k8.float() * kv_scale[0], v8.float() * kv_scale[1], table, start,
                                            length, 0.3)
    assert torch.equal(got, want)


def test_fp8_paged_decode_rejects_bad_inputs():
    q, k8, v8, table, start, length, kv_scale = _fp8_case(5, torch.float32, 2, 2, ROWS)
    args = (table, start, length, 1.0)
    bad_scales = {"missing": None, "shape": torch.ones(3), "dtype": torch.ones(2, dtype=torch.float64),
                  "bf16": torch.ones(2, dtype=torch.bfloat16), "device": torch.ones(2, device="meta"),
                  "strided": torch.ones(4)[::2]}
    for why, scale in bad_scales.items():
        with pytest.raises(ValueError, match="kv_scale"):
            paged_decode_attention(q, k8, v8, *args, scale)
            pytest.fail(why)
    with pytest.raises(ValueError, match="kv_scale: only for"):  # a scale with a 32-bit cache
        paged_decode_attention(q, k8.float(), v8.float(), *args, kv_scale)
    with pytest.raises(ValueError, match="k_cache, v_cache: must share a dtype"):
        paged_decode_attention(q, k8, v8.float(), *args, kv_scale)
    with pytest.raises(ValueError, match="k_cache, v_cache: dtype"):  # e5m2 is not the cache's format
        paged_decode_attention(q, k8.to(torch.float8_e5m2), v8.to(torch.float8_e5m2), *args, kv_scale)
    with pytest.raises(ValueError, match="k_cache, v_cache: dtype"):  # a 16-bit cache with an fp32 q
        paged_decode_attention(q, k8.bfloat16(), v8.bfloat16(), *args)
