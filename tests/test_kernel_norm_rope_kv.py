"""The small memory-bound kernels (fused add + RMSNorm, multi-head RoPE, KV-cache write)
against their pure-torch references, in Triton's interpreter on the CPU (conftest sets
TRITON_INTERPRET=1). Fresh seeded inputs every case; shapes stay small but ragged (hidden
sizes and head counts that are not powers of two, partial tiles)."""

import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from tandem_kernels.kv_write import quantize_fp8_reference, write_kv, write_kv_reference  # noqa: E402
from tandem_kernels.rms_norm import (  # noqa: E402
    fused_add_rms_norm, fused_add_rms_norm_reference, rms_norm, rms_norm_reference)
from tandem_kernels.rope import rope, rope_reference  # noqa: E402

# Triton's interpreter (3.6 and 3.9) casts fp32 to bf16 by truncation, not round-to-nearest
# as the GPU and torch do, so in bf16 each rounding point may land one ulp off. fp16 casts
# are exact there: the fp16 cases pin the rounding order, the bf16 ones allow the slack.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2 * 2**-10, atol=1e-3),  # <= 2 fp16 ulps (rsqrt, cos/sin last bits)
    torch.bfloat16: dict(rtol=2 * 2**-7, atol=2e-2),  # two roundings, each may truncate
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gen(*key) -> torch.Generator:
    """A seed from the case's parameters that is the same in every process (str hashes are not)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _ulps(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |got - ref| in units of ref's last place in their dtype."""
    mant = torch.finfo(ref.dtype).eps
    ulp = torch.exp2(torch.floor(torch.log2(ref.float().abs().clamp(min=torch.finfo(ref.dtype).tiny)))) * mant
    return ((got.float() - ref.float()).abs() / ulp).max().item()


# -- fused add + RMSNorm -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (37, 100), (3, 5, 576), (3, 5120)])
def test_fused_add_rms_norm_matches_reference(dtype, shape):
    g = _gen("fused", shape, dtype)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    res = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    x0, res0 = x.clone(), res.clone()
    out, h = fused_add_rms_norm(x, res, w, 1e-5)
    ref_out, ref_h = fused_add_rms_norm_reference(x, res, w, 1e-5)
    assert out.shape == h.shape == x.shape and out.dtype == h.dtype == dtype
    assert torch.equal(x, x0) and torch.equal(res, res0)  # out of place: inputs untouched
    if dtype == torch.bfloat16:
        assert _ulps(h, ref_h) <= 1  # the interpreter truncates where torch rounds
    else:
        assert torch.equal(h, ref_h)  # one rounding of the fp32 sum, as torch's `+`
    # The norm of the kernel's own sum (in bf16 it may be an ulp off the reference's).
    torch.testing.assert_close(out.float(), rms_norm_reference(h, w, 1e-5).float(), **TOL[dtype])
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=2 * TOL[dtype]["rtol"], atol=2 * TOL[dtype]["atol"])


@pytest.mark.parametrize("fused", [False, True])
def test_rms_norm_strided_rows_and_partial_tiles(fused):
    """Rows of a wider buffer (row stride > H), and a row count that leaves the last
    multi-row tile part empty (H = 100: 32 rows a program)."""
    g = _gen("strided", fused)
    rows, hid = 45, 100
    x = torch.randn(rows, hid + 28, generator=g)[:, :hid]
    res = torch.randn(rows, hid + 4, generator=g)[:, 4:]
    w = 1 + 0.1 * torch.randn(hid, generator=g)
    if fused:
        got, ref = fused_add_rms_norm(x, res, w, 1e-6), fused_add_rms_norm_reference(x, res, w, 1e-6)
        torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)
        got, ref = got[0], ref[0]
    else:
        got, ref = rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_fused_add_rms_norm_no_rows():
    x = torch.randn(0, 64)
    out, h = fused_add_rms_norm(x, torch.randn(0, 64), torch.ones(64), 1e-5)
    assert out.shape == h.shape == (0, 64)


def test_fused_add_rms_norm_rejects_bad_inputs():
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, torch.randn(2, 4), w, 1e-5)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, torch.randn(2, 8, dtype=torch.bfloat16), w, 1e-5)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, torch.randn(8, 2).t(), w, 1e-5)
    with pytest.raises(ValueError, match="weight"):
        fused_add_rms_norm(x, x, torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="weight"):
        fused_add_rms_norm(x, x, torch.ones(8, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="x"):
        fused_add_rms_norm(torch.ones(2, 8, dtype=torch.int32), torch.ones(2, 8, dtype=torch.int32),
                           torch.ones(8, dtype=torch.int32), 1e-5)


# -- RoPE, several heads and tokens a program -------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved,norm", [(True, True), (False, False)])
@pytest.mark.parametrize("t,h,kvh,d", [(6, 40, 8, 128), (5, 9, 3, 64), (1, 2, 1, 16)])
def test_rope_tiles_match_reference(dtype, interleaved, norm, t, h, kvh, d):
    """Scout's heads (5 q tiles and 1 k tile of 8 heads, 4 tokens a tile: T = 6 leaves a
    partial tile), SmolLM2's 9 / 3 (tiles of 4 heads, some masked), and one token."""
    g = _gen("rope", t, h, kvh, d, dtype, interleaved)
    q = torch.randn(t, h, d, generator=g).to(dtype)
    k = torch.randn(t, kvh, d, generator=g).to(dtype)
    pos = torch.randint(0, 8192, (t,), generator=g, dtype=torch.int32)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, d, 2).float() / d))
    eps = 1e-5 if norm else None
    got = rope(q, k, pos, inv_freq, interleaved, eps)
    ref = rope_reference(q, k, pos, inv_freq, interleaved, eps)
    tol = TOL[dtype]
    if dtype == torch.bfloat16:  # rotate-half rounds two products before adding them: a
        # truncated product is up to an ulp of |x| off, however small the sum
        tol = dict(rtol=tol["rtol"], atol=4 * 2**-8 * max(q.abs().max().item(), k.abs().max().item()))
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype and a.is_contiguous()
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_rope_rejects_bad_inputs():
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    pos, inv_freq = torch.arange(3), torch.ones(8)
    with pytest.raises(ValueError, match="positions"):
        rope(q, k, pos.float(), inv_freq, True)
    with pytest.raises(ValueError, match="q, k"):
        rope(q, k.to(torch.bfloat16), pos, inv_freq, True)
    with pytest.raises(ValueError, match="k"):
        rope(q, torch.randn(3, 2, 8), pos, inv_freq, True)
    with pytest.raises(ValueError, match="head_dim"):
        rope(torch.randn(3, 4, 12), torch.randn(3, 2, 12), pos, torch.ones(6), True)
    with pytest.raises(ValueError, match="q, k"):
        rope(torch.randn(3, 64), k, pos, inv_freq, True)


# -- KV-cache write ----------------------------------------------------------------------
def _kv_case(seed, dtype, t, kvh, d, nb=6, bs=4, cache_dtype=None):
    """A cache full of random values (so untouched slots are checked too), fresh k / v,
    distinct random slots with some rows skipped (-1) and one past the end."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, nb, bs, kvh, d, generator=g).to(cache_dtype or dtype)
    k = (torch.randn(t, kvh, d, generator=g) * 4).to(dtype)
    v = (torch.randn(t, kvh, d, generator=g) * 4).to(dtype)
    slots = torch.randperm(nb * bs, generator=g)[:t]
    slots[torch.rand(t, generator=g) < 0.3] = -1
    if t > 2:
        slots[1] = nb * bs + 5  # out of range: skipped, never written
    return cache, k, v, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,kvh,d", [(1, 2, 16), (13, 8, 32), (7, 3, 20)])
def test_write_kv_matches_reference(dtype, t, kvh, d):
    cache, k, v, slots = _kv_case(t * 100 + kvh * 10 + d, dtype, t, kvh, d)
    want = cache.clone()
    write_kv_reference(want, k, v, slots)
    write_kv(cache, k, v, slots)
    assert torch.equal(cache, want)


def test_write_kv_strided_views_and_int32_slots():
    """k and v as views of one fused projection [T, (H + 2 KVH) * D]: token stride > row."""
    t, h, kvh, d = 9, 4, 2, 16
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=g)
    k = qkv[:, h * d:(h + kvh) * d].view(t, kvh, d)
    v = qkv[:, (h + kvh) * d:].view(t, kvh, d)
    cache = torch.zeros(2, 4, 8, kvh, d)
    slots = torch.tensor([3, -1, 0, 31, 17, -1, 8, 9, 30], dtype=torch.int32)
    want = cache.clone()
    write_kv_reference(want, k, v, slots.long())
    write_kv(cache, k, v, slots)
    assert torch.equal(cache, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_fp8_matches_torch_cast(dtype):
    cache, k, v, slots = _kv_case(11, dtype, 13, 8, 32, cache_dtype=torch.float8_e4m3fn)
    scale = torch.tensor([0.05, 0.02])  # |v| / 0.02 passes 448: saturates
    want = cache.clone()
    write_kv_reference(want, k, v, slots, scale)
    write_kv(cache, k, v, slots, scale)
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))


def test_fp8_rounding_on_ties_subnormals_and_saturation():
    """Every midpoint between neighbouring e4m3 values (ties go to even), a hair either side
    of it, subnormals, zero and values past 448: the kernel's rounding is torch's."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()  # sorted non-negative values
    mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([grid, mids, mids * (1 + 2**-20), mids * (1 - 2**-20), torch.tensor([500.0, 1e6, 0.0])])
    vals = torch.cat([vals, -vals])
    n = vals.numel()
    pad = (-n) % 16
    x = torch.cat([vals, torch.zeros(pad)]).view(-1, 1, 16)
    cache = torch.zeros(2, x.shape[0], 1, 1, 16, dtype=torch.float8_e4m3fn)
    slots = torch.arange(x.shape[0])
    scale = torch.ones(2)
    write_kv(cache, x, x, slots, scale)
    want = quantize_fp8_reference(x, scale[0])
    assert torch.equal(cache[0, :, 0].view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(cache[1, :, 0].view(torch.uint8), want.view(torch.uint8))


def test_write_kv_no_tokens_is_a_no_op():
    cache = torch.randn(2, 2, 4, 2, 16)
    before = cache.clone()
    write_kv(cache, torch.randn(0, 2, 16), torch.randn(0, 2, 16), torch.zeros(0, dtype=torch.long))
    assert torch.equal(cache, before)


def test_write_kv_rejects_bad_inputs():
    cache = torch.zeros(2, 3, 4, 2, 16)
    k, v, slots = torch.randn(5, 2, 16), torch.randn(5, 2, 16), torch.arange(5)
    with pytest.raises(ValueError, match="slots"):
        write_kv(cache, k, v, slots.float())
    with pytest.raises(ValueError, match="k:"):
        write_kv(cache, torch.randn(5, 3, 16), v, slots)
    with pytest.raises(ValueError, match="v:"):
        write_kv(cache, k, torch.randn(5, 16, 2).transpose(1, 2), slots)
    with pytest.raises(ValueError, match="kv_cache"):
        write_kv(cache.to(torch.bfloat16), k, v, slots)
    with pytest.raises(ValueError, match="kv_cache"):
        write_kv(cache[0], k, v, slots)
    with pytest.raises(ValueError, match="kv_cache"):
        write_kv(torch.zeros(2, 3, 4, 16, 2).transpose(3, 4), k, v, slots)
    with pytest.raises(ValueError, match="scale"):
        write_kv(cache.to(torch.float8_e4m3fn), k, v, slots)
    with pytest.raises(ValueError, match="scale"):
        write_kv(cache, k, v, slots, torch.ones(2))


# -- compiled for the GPU ----------------------------------------------------------------
# The interpreter never compiles: a kernel can pass every test above and still not build on
# an H100, or build with 2-byte loads where 16-byte ones were meant (it happened while
# writing these). Triton compiles for sm_90 without a GPU (LLVM and ptxas ship with it), so
# a subprocess without the interpreter builds Scout's launch configurations and reports the
# global loads and stores the PTX uses.
def _sm90_memory_ops() -> dict[str, list[str]]:
    import re

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tandem_kernels.kv_write import _write_kv_kernel
    from tandem_kernels.rms_norm import _rms_norm_kernel
    from tandem_kernels.rope import _rope_kernel

    def memory_ops(fn, types: dict, consts: dict, num_warps: int) -> list[str]:
        """types: each runtime argument's Triton type; a trailing ':16' marks a value Triton
        sees as 16-divisible, as a launch does for aligned pointers and strides like 5120."""
        sig = {n: "constexpr" if n in consts else types[n].split(":")[0] for n in fn.arg_names}
        aligned = [i for i, n in enumerate(fn.arg_names) if types.get(n, "").endswith(":16")]
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
        consts = {(fn.arg_names.index(n),): v for n, v in consts.items()}
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        return sorted(set(re.findall(r"(?:ld|st)\.global\.[\w.]+", kernel.asm["ptx"])))

    bf16, i32, i64, f32, fp8 = "*bf16:16", "i32:16", "*i64:16", "fp32", "*fp8e4nv:16"
    norm = dict(x_ptr=bf16, res_ptr=bf16, w_ptr=bf16, out_ptr=bf16, h_ptr=bf16, rows="i32", cols=i32,
                stride_x=i32, stride_res=i32, eps=f32)
    rope_args = dict(q_ptr=bf16, k_ptr=bf16, qo_ptr=bf16, ko_ptr=bf16, pos_ptr=i64, inv_freq_ptr="*fp32:16",
                     T="i32", H="i32", KVH="i32", stride_qt=i32, stride_qh=i32, stride_kt=i32, stride_kh=i32, eps=f32)
    kv = dict(k_ptr=bf16, v_ptr=bf16, cache_ptr=bf16, slots_ptr=i64, scale_ptr="*fp32:16", T="i32",
              num_slots=i32, stride_kt=i32, stride_vt=i32, stride_kv="i64:16")
    scout_rope, scout_kv = dict(BT=4, BH=8, HALF=64), dict(ROW=1024, ROW_P=1024, BT=4)
    return {
        "fused_add_rms_norm": memory_ops(_rms_norm_kernel, norm, dict(ROWS=1, BLOCK=8192, ADD=True), 16),
        "rms_norm 576": memory_ops(_rms_norm_kernel, norm, dict(ROWS=4, BLOCK=1024, ADD=False), 8),
        "rope interleaved": memory_ops(_rope_kernel, rope_args, dict(scout_rope, INTERLEAVED=True, NORM=True), 8),
        "rope half": memory_ops(_rope_kernel, rope_args, dict(scout_rope, INTERLEAVED=False, NORM=False), 8),
        "kv write": memory_ops(_write_kv_kernel, kv, dict(scout_kv, QUANT=False), 8),
        "kv write fp8": memory_ops(_write_kv_kernel, {**kv, "cache_ptr": fp8}, dict(scout_kv, QUANT=True), 8),
    }


def test_kernels_compile_for_h100_with_16_byte_accesses():
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ops = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, found in ops.items():
        # 4- and 8-byte scalar loads are per-token slots, positions, frequencies and the fp8
        # scale; no 1- or 2-byte element moves alone, and every store is 16 bytes a thread.
        assert not [op for op in found if op.endswith((".b8", ".b16")) and ".v" not in op], f"{name}: {found}"
        stores = [op for op in found if op.startswith("st.")]
        assert stores and all(".v4." in op for op in stores), f"{name}: {found}"


if __name__ == "__main__":  # the compile check's subprocess
    import json

    print(json.dumps(_sm90_memory_ops()))
