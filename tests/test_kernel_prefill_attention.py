"""Paged prefill attention (tandem_kernels/prefill_attention.py) against its torch reference and
against the engine's torch attention path, run by Triton's interpreter on the CPU.

Every cache slot that no segment may read holds nan, so a kernel that reads one (a
released block, a slot before kv_start or past the last key) fails loudly. Shapes stay
small: the interpreter is slow (the whole file takes ~40 s on 2 cores)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from tandem_kernels.prefill_attention import (  # noqa: E402
    PrefillConfig, _key_tile_runs, prefill_attention, prefill_attention_reference, prefill_plan)

# (n queries, kv_start, kv_len) per segment: square causal; a chunk after a prefix whose
# keys start mid-block (kv_start 20); one query after 29 keys with released blocks before
# kv_start 48; an empty segment; 20 queries after a 50-key prefix (several unmasked tiles).
SEGMENTS = [(7, 0, 7), (33, 20, 40), (1, 48, 30), (0, 0, 0), (20, 0, 70)]


def _case(seed, dtype, kvh, g, segments, d=32, bs=16):
    """Fresh random q and caches for `segments`; each segment has its own block-table row
    with shuffled physical blocks for the blocks it sees and -1 elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    spans = [range(start // bs, (start + length - 1) // bs + 1) if n else range(0) for n, start, length in segments]
    width = max((r.stop for r in spans), default=0) + 1
    nb = sum(len(r) for r in spans) + 2  # two spare blocks nothing points at
    phys = iter(torch.randperm(nb, generator=gen).tolist())
    k = torch.full((nb, bs, kvh, d), float("nan"))
    v = torch.full((nb, bs, kvh, d), float("nan"))
    table = torch.full((len(segments), width), -1, dtype=torch.int32)
    for i, ((n, start, length), cols) in enumerate(zip(segments, spans)):
        for col in cols:
            table[i, col] = b = next(phys)
            rows = [p % bs for p in range(col * bs, (col + 1) * bs) if start <= p < start + length]
            k[b, rows] = torch.randn(len(rows), kvh, d, generator=gen)
            v[b, rows] = torch.randn(len(rows), kvh, d, generator=gen)
    n = torch.tensor([s[0] for s in segments])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)]).int()
    q = torch.randn(int(n.sum()), kvh * g, d, generator=gen)
    kv_start = torch.tensor([s[1] for s in segments], dtype=torch.int32)
    kv_len = torch.tensor([s[2] for s in segments], dtype=torch.int32)
    return q.to(dtype), k.to(dtype), v.to(dtype), table, cu, kv_start, kv_len


def _assert_close(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (out.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()


# The variants the H100 sweep chooses between (PrefillConfig's switches), all on.
VARIANTS = dict(ids_per_block=True, lean_runs=True, order="group")


# bf16 and fp32 take the same path in the interpreter (dot operands are upcast), so the
# dtypes share out the configurations rather than multiply them.
@pytest.mark.parametrize("dtype, kvh, g, cfg", [
    (torch.float32, 2, 1, PrefillConfig(16, 16, 1, 1)),  # one cache block per key tile
    (torch.bfloat16, 1, 3, PrefillConfig(32, 32, 1, 1)),  # two blocks per tile
    (torch.float32, 1, 5, PrefillConfig(32, 64, 1, 1)),  # Scout's ratio; four blocks per tile
    (torch.bfloat16, 1, 5, PrefillConfig(32, 64, 1, 1)),
    (torch.float32, 2, 1, PrefillConfig(16, 16, 1, 1, ids_per_block=True)),  # one table entry a tile
    (torch.float32, 2, 3, PrefillConfig(32, 32, 1, 1, lean_runs=True, order="tiles")),
    (torch.bfloat16, 1, 5, PrefillConfig(32, 64, 1, 1, **VARIANTS)),  # four entries a tile
])
def test_prefill_attention_matches_reference(dtype, kvh, g, cfg):
    args = _case(10 * kvh + g + (dtype == torch.bfloat16), dtype, kvh, g, SEGMENTS)
    out = prefill_attention(*args, 0.2, config=cfg)
    _assert_close(out, prefill_attention_reference(*args, 0.2), dtype)


@pytest.mark.parametrize("variants", [{}, VARIANTS])
def test_prefill_attention_key_tile_inside_a_block(variants):
    """block_size 32 with 16-key tiles: two tiles per cache block; fp16."""
    args = _case(7, torch.float16, 2, 2, [(18, 0, 18), (5, 40, 25)], bs=32)
    out = prefill_attention(*args, 0.3, config=PrefillConfig(16, 16, 1, 1, **variants))
    _assert_close(out, prefill_attention_reference(*args, 0.3), torch.float16)


def test_variants_and_a_reused_plan_give_the_same_bits():
    """Two layers of one step share a plan; each equals a call that builds its own, and
    the variants change where things are loaded from, not the arithmetic."""
    segments = [(20, 0, 20), (9, 16, 30)]
    cfg = PrefillConfig(16, 32, 1, 1)
    layer1 = _case(21, torch.float32, 1, 2, segments)
    layer2 = _case(22, torch.float32, 1, 2, segments)
    q, _, _, _, cu, start, length = layer1
    plan = prefill_plan(cu, start, length, q.shape[0], cfg)
    for args in (layer1, layer2):
        out = prefill_attention(*args, 0.4, plan=plan)
        assert torch.equal(out, prefill_attention(*args, 0.4, config=cfg))
        assert torch.equal(out, prefill_attention(*args, 0.4, config=cfg._replace(**VARIANTS)))
    _assert_close(out, prefill_attention_reference(*layer2, 0.4), torch.float32)


def test_prefill_attention_default_config_unvalidated_and_no_queries():
    args = _case(3, torch.float32, 1, 2, [(9, 0, 40)])
    _assert_close(prefill_attention(*args, 0.5, validate=False), prefill_attention_reference(*args, 0.5),
                  torch.float32)
    q, k, v, table, cu, start, length = _case(4, torch.float32, 1, 2, [(0, 0, 0)])
    assert prefill_attention(q, k, v, table, cu, start, length, 0.5).shape == (0, 2, 32)


def test_plan_covers_every_query_tile_once_heaviest_first():
    n, start, length = [33, 0, 7, 64], [20, 0, 0, 128], [40, 0, 7, 200]
    cu = torch.tensor([0, *n]).cumsum(0).int()
    plan = prefill_plan(cu, torch.tensor(start).int(), torch.tensor(length).int(), sum(n), PrefillConfig(16, 32, 1, 1))
    seg, qt, row0, queries, kv_start, prefix = plan.tiles.tolist()
    assert len(seg) == triton.cdiv(sum(n), 16) + len(n)
    real = [i for i, s in enumerate(seg) if s < len(n)]
    assert real == list(range(len(real)))  # spare entries come last
    assert sorted(zip(seg[:len(real)], qt[:len(real)])) == [(0, 0), (0, 1), (0, 2), (2, 0), (3, 0), (3, 1), (3, 2),
                                                             (3, 3)]
    for i in real:  # each tile carries its segment's fields
        s = seg[i]
        assert (row0[i], queries[i], kv_start[i], prefix[i]) == (cu.tolist()[s], n[s], start[s], length[s] - n[s])
    runs = _key_tile_runs(plan)
    work = runs.sum(0).tolist()
    assert work == sorted(work, reverse=True) and not any(work[len(real):])
    # Segment 3's last tile: queries at positions 312..327 see keys 128..327, tiles 4..10
    # of 32 keys: 312 cuts tile 9, so 4..8 are full and 9..10 diagonal.
    last = list(zip(seg, qt)).index((3, 3))
    assert runs[:, last].tolist() == [0, 5, 2]
    # Segment 0 starts mid-tile (kv_start 20): its first tile has a head run.
    assert runs[:, list(zip(seg, qt)).index((0, 0))].tolist() == [1, 0, 1]


def _pieces(spans, chunk):
    """How a prefill step is handed to the kernel: each request's new tokens cut at local
    chunk boundaries, as build_metadata cuts them; (batch row, n, kv_start, kv_len, request)."""
    pieces = []
    for i, sp in enumerate(spans):
        if sp.num_tokens == 1:  # decode rows go to the decode kernel
            continue
        lo, hi = sp.q_start, sp.q_start + sp.num_tokens
        cuts = [lo, *(range((lo // chunk + 1) * chunk, hi, chunk) if chunk else ()), hi]
        for a, b in zip(cuts, cuts[1:]):
            kv_start = (a // chunk) * chunk if chunk else 0
            pieces.append((sp.batch_start + a - lo, b - a, kv_start, b - kv_start, i))
    return pieces


@pytest.mark.parametrize("chunk", [None, 32])
def test_prefill_attention_matches_torch_ops(chunk):
    """The same step through engine.attention.build_metadata and TorchOps._attention (SDPA
    per segment): a new 50-token prompt, 30 tokens after a 40-token cached prefix, and a
    decode row between them; chunk 32 is a chunked-local layer (released blocks: None)."""
    from engine.attention import SeqSpan, build_metadata  # here, so the compile check's subprocess stays light
    from engine.ops import TorchOps

    bs, kvh, g, d = 16, 2, 2, 32
    gen = torch.Generator().manual_seed(chunk or 1)
    kv_cache = torch.randn(2, 16, bs, kvh, d, generator=gen)
    phys = torch.randperm(16, generator=gen).tolist()
    tables = [phys[0:4], phys[4:9], phys[9:13]]
    if chunk:  # the local window released the prefix's blocks before its chunk (32)
        tables[1][:2] = [None, None]
    spans = [SeqSpan(0, 0, 50, tuple(tables[0])), SeqSpan(50, 60, 1, tuple(tables[2])),
             SeqSpan(51, 40, 30, tuple(tables[1]))]
    q = torch.randn(81, kvh * g, d, generator=gen)
    meta = build_metadata(spans, bs, chunk, torch.device("cpu"))
    want = TorchOps()._attention(q, kv_cache, meta, 0.25)

    pieces = _pieces(spans, chunk)
    assert [(p[0], p[0] + p[1], p[3]) for p in pieces] == [(s.start, s.end, len(s.kv_slots)) for s in meta.prefills]
    rows = torch.cat([torch.arange(p[0], p[0] + p[1]) for p in pieces])
    width = max(len(sp.block_table) for sp in spans)
    request_rows = [[-1 if b is None else b for b in sp.block_table] + [-1] * (width - len(sp.block_table))
                    for sp in spans]
    table = torch.tensor([request_rows[p[4]] for p in pieces], dtype=torch.int32)  # a row per piece
    cu = torch.tensor([0] + [p[1] for p in pieces]).cumsum(0).int()
    kv_start = torch.tensor([p[2] for p in pieces], dtype=torch.int32)
    kv_len = torch.tensor([p[3] for p in pieces], dtype=torch.int32)
    out = prefill_attention(q[rows], kv_cache[0], kv_cache[1], table, cu, kv_start, kv_len, 0.25)
    torch.testing.assert_close(out, want[rows], rtol=1e-5, atol=1e-5)


def test_prefill_attention_rejects_bad_inputs():
    q, k, v, table, cu, start, length = args = _case(0, torch.float32, 2, 2, [(5, 0, 9), (4, 16, 8)])
    with pytest.raises(ValueError, match="block_tables: must be int32"):
        prefill_attention(q, k, v, table.long(), cu, start, length, 1.0)
    with pytest.raises(ValueError, match="kv_len"):
        prefill_attention(q, k, v, table, cu, start, torch.tensor([4, 8], dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="block_tables: 1 columns"):
        prefill_attention(q, k, v, table[:, :1], cu, start, length, 1.0)
    released = table.clone()
    released[1, 1] = -1
    with pytest.raises(ValueError, match="released"):
        prefill_attention(q, k, v, released, cu, start, length, 1.0)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        prefill_attention(q, k, v, table, torch.tensor([0, 5, 8], dtype=torch.int32), start, length, 1.0)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        prefill_attention(q, k, v, table, cu[:2], start, length, 1.0)
    with pytest.raises(ValueError, match="kv_start"):
        prefill_attention(q, k, v, table, cu, torch.tensor([-1, 16], dtype=torch.int32), length, 1.0)
    with pytest.raises(ValueError, match="heads"):
        prefill_attention(q[:, :3], k, v, table, cu, start, length, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        prefill_attention(q.double(), k, v, table, cu, start, length, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        prefill_attention(q, k, v.half(), table, cu, start, length, 1.0)
    with pytest.raises(ValueError, match="head_dim"):
        prefill_attention(q[..., :24], k[..., :24], v[..., :24], table, cu, start, length, 1.0)
    with pytest.raises(ValueError, match="block_size"):
        prefill_attention(q, k[:, :8], v[:, :8], table, cu, start, length, 1.0)
    with pytest.raises(ValueError, match="q: last dimension"):
        prefill_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, table, cu, start, length, 1.0)
    with pytest.raises(ValueError, match="scale"):
        prefill_attention(*args, 0.0)
    with pytest.raises(ValueError, match="block_n"):
        prefill_attention(*args, 1.0, config=PrefillConfig(16, 24, 1, 1))
    plan = prefill_plan(cu, start, length, q.shape[0], PrefillConfig(16, 16, 1, 1))
    with pytest.raises(ValueError, match="plan: built for T = 9, S = 2; got T = 5"):
        prefill_attention(q[:5], k, v, table, torch.tensor([0, 5, 5], dtype=torch.int32), start, length, 1.0,
                          plan=plan)
    with pytest.raises(ValueError, match="config: .* differs from the plan's"):
        prefill_attention(*args, 1.0, config=PrefillConfig(32, 16, 1, 1), plan=plan)
    with pytest.raises(ValueError, match="kv_len: int32"):
        prefill_plan(cu, start, length.long(), q.shape[0], PrefillConfig(16, 16, 1, 1))
    with pytest.raises(ValueError, match="config.block_m"):
        prefill_plan(cu, start, length, q.shape[0], PrefillConfig(48, 16, 1, 1))
    with pytest.raises(ValueError, match="config.order"):
        prefill_attention(*args, 1.0, config=PrefillConfig(16, 16, 1, 1, order="kv"))


# -- compiled for the GPU ----------------------------------------------------------------
# The interpreter never compiles, and what makes the kernel fast is decided by the
# compiler: with the block-table load in the same iteration as the K/V loads, Triton's
# pipeliner did not prefetch K/V at all (async_wait 0 in every loop), nor with per-block
# row offsets whose divisibility the compiler could not see. Triton compiles for sm_90
# without a GPU, so a subprocess without the interpreter builds Scout's launch
# configuration, as first measured and with every variant on, and reports how they came out.
def _sm90_build(cfg: PrefillConfig) -> dict:
    import re

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tandem_kernels.prefill_attention import _prefill_kernel

    consts = dict(H=40, G=5, D=128, BS=16, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PER_BLOCK=cfg.ids_per_block,
                  LEAN_RUNS=cfg.lean_runs, ORDER=cfg.order, ROW_ALIGN=16, PRECISION="tf32",
                  INTERP=False, INTERP_HEAD=0, INTERP_FULL=0, INTERP_DIAG=0)
    fn = _prefill_kernel
    ints = ("num_segments", "num_tiles", "stride_tb")  # the others are multiples of 16 at Scout's shapes
    sig = {n: "constexpr" if n in consts else "*bf16" if n[0] in "qkvo" and n.endswith("_ptr")
           else "*i32" if n.endswith("_ptr") else "fp32" if n == "qk_scale" else "i32" for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and n not in ints and n != "qk_scale"}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, attrs=attrs,
                                      constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()}),
                            target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    return {"shared": kernel.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"),
            "local": len(re.findall(r"\b(?:ld|st)\.local", ptx)),
            "waits": [int(w) for w in re.findall(r"async_wait .*\{num = (\d+)", ttgir)]}


def _sm90_configs() -> list[PrefillConfig]:
    from tandem_kernels.prefill_attention import default_config

    cfg = default_config(128, torch.bfloat16, torch.device("cuda"))
    return [cfg, cfg._replace(**VARIANTS)]


def test_kernel_compiles_for_h100_with_pipelined_kv_loads():
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
    assert len(builds) == len(_sm90_configs())
    for build in builds:
        assert build["wgmma"] > 0, build  # Hopper tensor-core MMAs
        assert build["local"] == 0, build  # no register spills
        assert build["shared"] <= 227 * 1024, build  # fits an H100 SM
        # Each of the three key-tile runs keeps K/V copies in flight while it computes.
        assert sum(w > 0 for w in build["waits"]) >= 3, build


if __name__ == "__main__":  # the compile check's subprocess
    import json

    print(json.dumps([_sm90_build(cfg) for cfg in _sm90_configs()]))
