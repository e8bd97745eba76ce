"""Kernel benchmark (one GPU, one device call): each Triton kernel against its torch
reference, correctness on fresh random inputs first, then time and bandwidth with the
copy ceiling measured in the same call.

    python bench/kernels.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import ceilings, cuda_time, print_table  # noqa: E402
from engine.attention import DecodeBatch  # noqa: E402
from engine.ops import TorchOps  # noqa: E402
from tandem_kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from tandem_kernels.paged_attention import paged_decode_attention, paged_decode_attention_reference  # noqa: E402
from tandem_kernels.rope import rope, rope_reference  # noqa: E402


def torch_paged_decode(q, kv_cache, table, start, length, scale):
    """The engine's pure-torch decode path (`TorchOps.decode_attention`: gather the visible
    keys, then grouped fp32 matmuls), the baseline the kernel must beat."""
    dec = DecodeBatch(torch.arange(q.shape[0], device=q.device), table, start, length, int(length.max()))
    return TorchOps().decode_attention(q, kv_cache, dec, scale)


def graph_time(fn) -> float:
    """Seconds per replay of fn() captured in a CUDA graph (warmed up on a side stream:
    compile and allocate outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_time(graph.replay, reps=20)


def decode_attention_rows(bw: float, sweep: bool = False) -> list[tuple]:
    """Scout heads (40 q / 8 kv, d 128), block size 16, bf16; K/V bytes read once is the floor.
    Each shape runs the engine's call (choose_num_splits, default tiles, validate=False),
    replayed from a CUDA graph as the engine's decode steps run it (its time gives GB/s) and
    eagerly (Python launches and allocation included). sweep=True adds graph-replayed rows
    for other tile configs and split counts, each checked against the default's output:
        python -c "from bench.kernels import *; print(*decode_attention_rows(ceilings()['copy_GBps'], True), sep='\\n')"
    """
    from tandem_kernels.paged_attention import DecodeConfig, choose_num_splits, default_config

    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    default = default_config(torch.bfloat16, torch.device("cuda"))
    rows = []
    for batch, ctx in ((64, 8192), (8, 8192), (1, 32768)):
        blocks = ctx // 16
        kv = torch.randn(2, batch * blocks, 16, 8, 128, device="cuda", dtype=torch.bfloat16)  # a layer's cache
        k, v = kv
        q = torch.randn(batch, 40, 128, device="cuda", dtype=torch.bfloat16)
        table = torch.randperm(batch * blocks, device="cuda", dtype=torch.int32).view(batch, blocks)
        start = torch.zeros(batch, device="cuda", dtype=torch.int32)
        length = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        splits = choose_num_splits(batch, 8, blocks, num_sms)
        args = (q, k, v, table, start, length, 0.088)
        nbytes = 2 * batch * ctx * 8 * 128 * 2

        def call(s=splits, cfg=None):
            return paged_decode_attention(*args, num_splits=s, validate=False, config=cfg)

        got = call()
        engine_torch = (q, kv, table, start, length, 0.088)
        ref = paged_decode_attention_reference(*args) if batch * ctx <= 8 * 8192 else torch_paged_decode(*engine_torch)
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        tg, te = graph_time(call), cuda_time(call, reps=20)
        tr = cuda_time(lambda: torch_paged_decode(*engine_torch), reps=5)
        rows.append(("paged decode attn", f"B{batch} x {ctx} ctx, {splits} split(s), tiles {tuple(default)}",
                     f"{err:.1e}", f"{tg * 1e6:.1f} us graph, {te * 1e6:.1f} eager", f"{tr * 1e6:.1f} us",
                     f"{nbytes / tg / 1e9:.0f}", f"{100 * nbytes / tg / 1e9 / bw:.0f}%"))
        if not sweep:
            continue
        variants = [(cfg, splits) for cfg in (DecodeConfig(64, 8, 3), DecodeConfig(64, 4, 4), DecodeConfig(32, 4, 4),
                                              DecodeConfig(128, 8, 3))]
        variants += [(default, s) for s in (2 * splits, splits // 2) if 1 <= s <= 64]
        for cfg, s in variants:
            out = call(s, cfg)
            diff = ((out.float() - got.float()).norm() / got.float().norm()).item()
            t = graph_time(lambda: call(s, cfg))
            rows.append(("  sweep", f"B{batch} x {ctx} ctx, {s} split(s), tiles {tuple(cfg)}", f"{diff:.1e} vs dflt",
                         f"{t * 1e6:.1f} us graph", "", f"{nbytes / t / 1e9:.0f}", f"{100 * nbytes / t / 1e9 / bw:.0f}%"))
    return rows


def optional_rows(ceil: dict) -> list[tuple]:
    """Rows of the kernels that have their own bench module (each also runs alone)."""
    import importlib

    rows = []
    for name, args in (("kernels_moe", (ceil["copy_GBps"], ceil["matmul_TFLOPs"])),
                       ("kernels_small", (ceil["copy_GBps"],)),
                       ("kernels_prefill_attention", (ceil["matmul_TFLOPs"],))):
        try:
            mod = importlib.import_module(f"bench.{name}")
        except ImportError as e:
            print(f"(bench/{name}.py not available: {e})")
            continue
        try:
            rows += mod.rows(*args)
        except Exception as e:  # one kernel's failure must not hide the others' numbers
            print(f"bench/{name}.py failed: {type(e).__name__}: {e}")
        torch.cuda.empty_cache()
    return rows



def decode_attention_fp8_rows(bw: float, sweep: bool = False, batch: int = 64, ctx: int = 8192) -> list[tuple]:
    """An fp8 (e4m3) KV cache against the same values in bf16, at Scout heads (40 q / 8 kv,
    d 128), block size 16, bf16 queries, the engine's call replayed from a CUDA graph. The
    fp8 cache is the bf16 one quantised with per-tensor (K, V) scales (amax / 448), the
    format of tandem_kernels/kv_write.py: half the bytes, so the ceiling is the copy bandwidth on
    the fp8 bytes. Errors: each kernel against TorchOps.decode_attention on its own cache;
    the fp8 row also against the bf16 output (e4m3's quantisation error). sweep=True adds
    fp8 rows for other tiles and split counts:
        python -c "from bench.kernels import *; print(*decode_attention_fp8_rows(ceilings()['copy_GBps'], True), sep='\\n')"
    """
    from tandem_kernels.kv_write import quantize_fp8_reference
    from tandem_kernels.paged_attention import DecodeConfig, choose_num_splits, default_config

    def rel(a, b) -> float:
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    blocks = ctx // 16
    kv = torch.randn(2, batch * blocks, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    kv_scale = kv.flatten(1).abs().amax(1).float() / 448  # [2] (K, V)
    kv8 = torch.empty(kv.shape, device="cuda", dtype=torch.float8_e4m3fn)
    for i in range(2):
        kv8[i] = quantize_fp8_reference(kv[i], kv_scale[i])
    q = torch.randn(batch, 40, 128, device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(batch * blocks, device="cuda", dtype=torch.int32).view(batch, blocks)
    start = torch.zeros(batch, device="cuda", dtype=torch.int32)
    length = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    dec = DecodeBatch(torch.arange(batch, device="cuda"), table, start, length, ctx)
    splits = choose_num_splits(batch, 8, blocks, torch.cuda.get_device_properties(0).multi_processor_count)
    default = default_config(torch.bfloat16, torch.device("cuda"))

    def call(cache, scale, s=splits, cfg=None):
        return paged_decode_attention(q, cache[0], cache[1], table, start, length, 0.088, scale, num_splits=s,
                                      validate=False, config=cfg)

    rows, outs = [], {}
    for name, cache, scale, elem in (("bf16", kv, None, 2), ("fp8", kv8, kv_scale, 1)):
        outs[name] = got = call(cache, scale)
        err = f"{rel(got, TorchOps().decode_attention(q, cache, dec, 0.088, scale)):.1e}"
        if name == "fp8":
            err += f", {rel(got, outs['bf16']):.1e} vs bf16"
        nbytes = 2 * batch * ctx * 8 * 128 * elem
        tg, te = graph_time(lambda: call(cache, scale)), cuda_time(lambda: call(cache, scale), reps=20)
        tr = cuda_time(lambda: TorchOps().decode_attention(q, cache, dec, 0.088, scale), reps=5)
        rows.append((f"paged decode attn {name} kv", f"B{batch} x {ctx} ctx, {splits} split(s), tiles {tuple(default)}",
                     err, f"{tg * 1e6:.1f} us graph, {te * 1e6:.1f} eager", f"{tr * 1e6:.1f} us",
                     f"{nbytes / tg / 1e9:.0f}", f"{100 * nbytes / tg / 1e9 / bw:.0f}%"))
    if sweep:
        nbytes = 2 * batch * ctx * 8 * 128
        variants = [(cfg, splits) for cfg in (DecodeConfig(64, 4, 4), DecodeConfig(64, 4, 3), DecodeConfig(64, 8, 3),
                                              DecodeConfig(128, 8, 3), DecodeConfig(32, 4, 3))]
        variants += [(default, s) for s in (2 * splits, splits // 2) if 1 <= s <= 64]
        for cfg, s in variants:
            diff = rel(call(kv8, kv_scale, s, cfg), outs["fp8"])
            t = graph_time(lambda: call(kv8, kv_scale, s, cfg))
            rows.append(("  sweep fp8 kv", f"B{batch} x {ctx} ctx, {s} split(s), tiles {tuple(cfg)}",
                         f"{diff:.1e} vs dflt", f"{t * 1e6:.1f} us graph", "", f"{nbytes / t / 1e9:.0f}",
                         f"{100 * nbytes / t / 1e9 / bw:.0f}%"))
    return rows


def main() -> int:
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    ceil = ceilings()
    bw = ceil["copy_GBps"]
    print(f"copy ceiling {bw:.0f} GB/s")
    rows = [("kernel", "shape", "max rel err", "triton", "torch ref", "triton GB/s", "% of copy")]
    for t in (1, 64, 2048, 8192):
        x = torch.randn(t, 5120, device="cuda", dtype=torch.bfloat16) * 3
        w = (1 + 0.1 * torch.randn(5120, device="cuda")).to(torch.bfloat16)
        got, ref = rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5)
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        tt = cuda_time(lambda: rms_norm(x, w, 1e-5), reps=50)
        tr = cuda_time(lambda: rms_norm_reference(x, w, 1e-5), reps=50)
        nbytes = 2 * x.numel() * 2 + w.numel() * 2
        rows.append(("rms_norm", f"[{t}, 5120] bf16", f"{err:.1e}", f"{tt * 1e6:.1f} us", f"{tr * 1e6:.1f} us",
                     f"{nbytes / tt / 1e9:.0f}", f"{100 * nbytes / tt / 1e9 / bw:.0f}%"))
    inv_freq = 1.0 / (500000 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    for t in (1, 64, 8192):
        q = torch.randn(t, 40, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(t, 8, 128, device="cuda", dtype=torch.bfloat16)
        pos = torch.randint(0, 8192, (t,), device="cuda")
        got, ref = rope(q, k, pos, inv_freq, True, 1e-5), rope_reference(q, k, pos, inv_freq, True, 1e-5)
        err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, ref))
        tt = cuda_time(lambda: rope(q, k, pos, inv_freq, True, 1e-5), reps=50)
        tr = cuda_time(lambda: rope_reference(q, k, pos, inv_freq, True, 1e-5), reps=50)
        nbytes = 2 * (q.numel() + k.numel()) * 2
        rows.append(("rope+qk_norm", f"q[{t}, 40, 128] k[{t}, 8, 128]", f"{err:.1e}", f"{tt * 1e6:.1f} us",
                     f"{tr * 1e6:.1f} us", f"{nbytes / tt / 1e9:.0f}", f"{100 * nbytes / tt / 1e9 / bw:.0f}%"))
    rows += decode_attention_rows(bw)
    rows += decode_attention_fp8_rows(bw)
    rows += optional_rows(ceil)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
