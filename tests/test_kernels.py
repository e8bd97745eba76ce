"""Triton kernels against their pure-torch references, on fresh random inputs, run by
Triton's interpreter on the CPU (TRITON_INTERPRET=1 is set before triton is imported).
Shapes stay small: the interpreter is slow."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from tandem_kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402


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


from tandem_kernels.rope import rope, rope_reference  # noqa: E402


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
# Every cache slot no query may read holds nan (slots before kv_start or past the last key
# in a sequence's blocks, spare blocks), so a kernel that reads one fails loudly. The
# interpreter costs ~0.1 s per program (KV heads x rows x splits): cases stay few and small.
from tandem_kernels.paged_attention import (  # noqa: E402
    DecodeConfig, choose_num_splits, paged_decode_attention, paged_decode_attention_reference)

# (kv_start, kv_len) per query: one key; ragged lengths ending mid-tile; a mid-block start
# with a masked head tile, full tiles and a masked tail tile (32-key tiles); released (-1)
# blocks before a block-aligned start.
ROWS = [(0, 1), (0, 37), (20, 80), (48, 30)]


def _chunked(lens, chunk):
    """Rows of a chunked-local layer: the query sits at position n - 1 and sees its chunk."""
    starts = [((n - 1) // chunk) * chunk for n in lens]
    return [(s, n - s) for s, n in zip(starts, lens)]


def _paged_case(seed, dtype, kvh, g, rows, d=32, bs=16):
    """Fresh random q and caches for `rows`; each query has its own block-table row with
    shuffled physical blocks for the blocks it sees and -1 elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    spans = [range(start // bs, (start + length - 1) // bs + 1) for start, length in rows]
    width = max(r.stop for r in spans) + 1
    nb = sum(len(r) for r in spans) + 2  # two spare blocks nothing points at
    phys = iter(torch.randperm(nb, generator=gen).tolist())
    k = torch.full((nb, bs, kvh, d), float("nan"))
    v = torch.full((nb, bs, kvh, d), float("nan"))
    table = torch.full((len(rows), width), -1, dtype=torch.int32)
    for i, ((start, length), cols) in enumerate(zip(rows, spans)):
        for col in cols:
            table[i, col] = blk = next(phys)
            seen = [p % bs for p in range(col * bs, (col + 1) * bs) if start <= p < start + length]
            k[blk, seen] = torch.randn(len(seen), kvh, d, generator=gen)
            v[blk, seen] = torch.randn(len(seen), kvh, d, generator=gen)
    q = torch.randn(len(rows), kvh * g, d, generator=gen)
    start_t = torch.tensor([r[0] for r in rows], dtype=torch.int32)
    len_t = torch.tensor([r[1] for r in rows], dtype=torch.int32)
    return q.to(dtype), k.to(dtype), v.to(dtype), table, start_t, len_t


# (dtype, kv heads, GQA group, splits, keys per tile, rows): GQA 1 / 3 / 5; one split (the
# kernel normalises) and several (the merge kernel), more splits than tiles (empty splits
# weigh nothing); tiles of one cache block, two and four; chunked-local rows.
CASES = [
    (torch.float32, 2, 1, 1, 32, ROWS),
    (torch.bfloat16, 1, 5, 3, 32, ROWS),
    (torch.float32, 1, 3, 2, 16, ROWS),
    (torch.bfloat16, 2, 3, 1, 64, ROWS),
    (torch.float32, 1, 5, 4, 64, ROWS),
    (torch.bfloat16, 1, 5, 1, 16, _chunked((1, 37, 70), 32)),
    (torch.float32, 2, 3, 3, 32, _chunked((1, 37, 70, 90), 24)),
]


@pytest.mark.parametrize("dtype, kvh, g, splits, block_n, rows", CASES)
def test_paged_decode_attention_matches_reference(dtype, kvh, g, splits, block_n, rows):
    seed = 100 * kvh + 10 * g + splits + block_n + len(rows) + (dtype == torch.bfloat16)
    q, k, v, table, start, length = _paged_case(seed, dtype, kvh, g, rows)
    out = paged_decode_attention(q, k, v, table, start, length, 0.2, num_splits=splits,
                                 config=DecodeConfig(block_n, 1, 1))
    ref = paged_decode_attention_reference(q, k, v, table, start, length, 0.2)
    assert out.dtype == dtype and out.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # fp32: "ieee" dots, exact up to summation order
    assert (out.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()


def test_paged_decode_attention_default_config_and_engine_splits():
    """The engine's call: default tiles, choose_num_splits, validate=False."""
    q, k, v, table, start, length = _paged_case(7, torch.bfloat16, 2, 5, ROWS)
    splits = choose_num_splits(len(ROWS), 2, table.shape[1], num_sms=4)
    assert splits == 1  # 2 * 4 slots // 8 programs
    out = paged_decode_attention(q, k, v, table, start, length, 0.3, num_splits=splits, validate=False)
    ref = paged_decode_attention_reference(q, k, v, table, start, length, 0.3)
    assert (out.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max()


def test_choose_num_splits_fills_two_programs_per_sm_in_one_wave():
    assert choose_num_splits(64, 8, 513, 132) == 1
    assert choose_num_splits(8, 8, 513, 132) == 4  # 256 programs <= 264 slots
    assert choose_num_splits(1, 8, 2049, 132) == 32  # 33 rounded down to a power of two
    assert choose_num_splits(1, 8, 20, 132) == 2  # no split under 8 blocks (3), a power of two
    assert choose_num_splits(1, 1, 10**6, 132) == 64  # the merge kernel's limit


def test_paged_decode_attention_rejects_bad_inputs():
    q, k, v, table, start, length = _paged_case(0, torch.float32, 2, 2, ROWS)
    with pytest.raises(ValueError, match="int32"):
        paged_decode_attention(q, k, v, table.long(), start, length, 1.0)
    with pytest.raises(ValueError, match="kv_len"):
        paged_decode_attention(q, k, v, table, start, torch.zeros_like(length), 1.0)
    with pytest.raises(ValueError, match="block_tables: too few"):
        paged_decode_attention(q, k, v, table[:, :1], start, length, 1.0)
    with pytest.raises(ValueError, match="released"):  # row 3 sees from 48: its block 2 is -1
        paged_decode_attention(q, k, v, table, start - torch.tensor([0, 0, 0, 16], dtype=torch.int32),
                               length, 1.0)
    with pytest.raises(ValueError, match="heads"):
        paged_decode_attention(q[:, :3], k, v, table, start, length, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(q.double(), k, v, table, start, length, 1.0)
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(q, k, v, table, start, length, 1.0, num_splits=65)
    with pytest.raises(ValueError, match="block_n"):
        paged_decode_attention(q, k, v, table, start, length, 1.0, config=DecodeConfig(48, 4, 2))
    with pytest.raises(ValueError, match="scale"):
        paged_decode_attention(q, k, v, table, start, length, float("nan"))


# The interpreter never compiles: the kernel can pass every test above and still build on an
# H100 without what its speed rests on. Triton compiles for sm_90 without a GPU (LLVM, ptxas
# and cuobjdump ship with it), so a subprocess without the interpreter builds the default
# configurations at Scout's shapes (40 q / 8 KV heads, D 128, block size 16) and reports them.
def _sm90_paged_builds() -> dict:
    import re
    import subprocess
    import tempfile

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tandem_kernels.paged_attention import _paged_decode_kernel, default_config

    def build(dtype: torch.dtype, splits: int, kv_fp8: bool = False) -> dict:
        cfg = default_config(dtype, torch.device("cuda"))
        elem = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        consts = dict(H=40, G=5, BLOCK_G=16, D=128, BS=16, BLOCK_N=cfg.block_n, NUM_SPLITS=splits, KV_FP8=kv_fp8,
                      PRECISION="ieee" if dtype == torch.float32 else "tf32", INTERP=False, INTERP_TILES=0)
        fn = _paged_decode_kernel
        cache = "fp8e4nv" if kv_fp8 else elem
        types = {"q_ptr": elem, "k_ptr": cache, "v_ptr": cache, "out_ptr": elem, "acc_ptr": "fp32", "m_ptr": "fp32",
                 "l_ptr": "fp32", "kv_scale_ptr": "fp32" if kv_fp8 else elem, "table_ptr": "i32", "start_ptr": "i32",
                 "len_ptr": "i32"}
        sig = {n: "constexpr" if n in consts else f"*{types[n]}" if n in types else "fp32" if n == "qk_scale"
               else "i32" for n in fn.arg_names}
        # Pointers and cache strides are 16-divisible at these shapes, as a launch sees them;
        # the table's row stride (max blocks per sequence) need not be.
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if sig[n] != "constexpr" and n not in ("qk_scale", "stride_tb")}
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, attrs=attrs,
                                          constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()}),
                                target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                                   capture_output=True, text=True).stdout
        ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
        return {"config": list(cfg), "shared": kernel.metadata.shared,
                "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
                "mma": ptx.count("mma.sync.aligned"), "local": len(re.findall(r"\b(?:ld|st)\.local", ptx)),
                "cp_async_16B": len(re.findall(r"cp\.async\.cg\.shared\.global.*0x10", ptx)),
                "waits": [int(w) for w in re.findall(r"async_wait .*\{num = (\d+)", ttgir)]}

    return {"bf16": build(torch.bfloat16, 1), "bf16 split": build(torch.bfloat16, 4),
            "fp32": build(torch.float32, 1), "bf16 q, fp8 kv": build(torch.bfloat16, 1, kv_fp8=True)}


def test_paged_decode_compiles_for_h100_with_pipelined_kv_loads():
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    builds = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, build in builds.items():
        assert build["local"] == 0, (name, build)  # no register spills
        # choose_num_splits counts on two programs sharing an SM.
        threads = 32 * build["config"][1]
        assert build["shared"] <= 227 * 1024 // 2 and build["registers"] * threads * 2 <= 65536, (name, build)
        assert build["cp_async_16B"] > 0, (name, build)  # K/V copied 16 bytes a thread, asynchronously
        # The full run (and the one-tile head and tail runs) keep K/V copies in flight.
        assert sum(w > 0 for w in build["waits"]) >= 3, (name, build)
    assert builds["bf16"]["mma"] > 0  # tensor-core dots for 16-bit caches
    assert builds["bf16 q, fp8 kv"]["mma"] > 0  # and for fp8 tiles converted to bf16


if __name__ == "__main__":  # the compile check's subprocess
    import json

    print(json.dumps(_sm90_paged_builds()))
