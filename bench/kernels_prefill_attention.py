"""Prefill attention benchmark (one GPU, one device call): `prefill_attention` reading K/V
through shuffled block tables, against torch SDPA with the flash backend on contiguous
K/V holding the same data, at Scout's heads (40 q / 8 KV, D 128), bf16, block size 16.

    python bench/kernels_prefill_attention.py            # the table
    python bench/kernels_prefill_attention.py --sweep    # also time a few tile configs at 8k

FLOPs count only visible pairs: 4 * H * D per (query, key) a query sees (QK^T and PV),
about half of n * L for a square causal segment. Both sides do the same work, so "% of
SDPA" is SDPA's time over the kernel's. SDPA runs GQA natively (enable_gqa) where the
flash backend takes it; the lower-right mask has no GQA path, so that row repeats K/V
to 40 heads, as engine/ops.py does (the label says so). The kernel is timed as the
engine calls it (validate=False: no host sync); its output is checked against SDPA's.

Chunked-local 32k: Llama 4's RoPE layers see only their own 8192-token chunk: four
segments of 8192 queries, each over its own chunk (kv_start 0, 8192, ...), all in one
call; its SDPA baseline is the four chunks as a batch of causal 8k. Expect about a
quarter of the global 32k time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import ceilings, cuda_time, print_table  # noqa: E402
from kernels.prefill_attention import PrefillConfig, default_config, prefill_attention  # noqa: E402

H, KVH, D, BS = 40, 8, 128, 16  # Llama 4 Scout heads; the engine's default block size
SCALE = D ** -0.5


class Case:
    """One prefill step: requests of given lengths, and segments (request, n, kv_start,
    kv_len) over them. K/V live both in a paged cache (shuffled blocks) and contiguously
    per request; q is [T, H, D] for the kernel."""

    def __init__(self, lengths: list[int], segments: list[tuple[int, int, int, int]], seed: int = 0):
        torch.manual_seed(seed)
        self.segments = segments
        self.k = [torch.randn(n, KVH, D, device="cuda", dtype=torch.bfloat16) for n in lengths]
        self.v = [torch.randn(n, KVH, D, device="cuda", dtype=torch.bfloat16) for n in lengths]
        blocks = [-(-n // BS) for n in lengths]
        perm = torch.randperm(sum(blocks), device="cuda", dtype=torch.int32)
        self.k_cache = torch.empty(sum(blocks), BS, KVH, D, device="cuda", dtype=torch.bfloat16)
        self.v_cache = torch.empty_like(self.k_cache)
        tables, first = [], 0
        for n, nb, k, v in zip(lengths, blocks, self.k, self.v):
            phys = perm[first: first + nb].long()
            self.k_cache.view(-1, KVH, D)[(phys[:, None] * BS + torch.arange(BS, device="cuda")).flatten()[:n]] = k
            self.v_cache.view(-1, KVH, D)[(phys[:, None] * BS + torch.arange(BS, device="cuda")).flatten()[:n]] = v
            tables.append(phys.int())
            first += nb
        width = max(blocks)
        self.table = torch.stack([F.pad(tables[r], (0, width - len(tables[r])), value=-1) for r, *_ in segments])
        ns = [n for _, n, _, _ in segments]
        self.q = torch.randn(sum(ns), H, D, device="cuda", dtype=torch.bfloat16)
        self.cu = torch.tensor([0] + ns, device="cuda").cumsum(0).int()
        self.kv_start = torch.tensor([s for _, _, s, _ in segments], device="cuda", dtype=torch.int32)
        self.kv_len = torch.tensor([ln for *_, ln in segments], device="cuda", dtype=torch.int32)
        self.flops = sum(4 * H * D * (n * (ln - n) + n * (n + 1) // 2) for _, n, _, ln in segments)

    def triton(self, config: PrefillConfig | None = None, validate: bool = False) -> torch.Tensor:
        return prefill_attention(self.q, self.k_cache, self.v_cache, self.table, self.cu, self.kv_start,
                                 self.kv_len, SCALE, config=config, validate=validate)


def _sdpa_causal(case: Case) -> tuple[callable, str]:
    """Segments of equal n == kv_len as one causal batch; GQA native if flash takes it."""
    b = len(case.segments)
    n = case.segments[0][1]
    q = case.q.view(b, n, H, D).transpose(1, 2).contiguous()  # [B, H, n, D]
    k = torch.stack([case.k[r][s: s + ln] for r, _, s, ln in case.segments]).transpose(1, 2).contiguous()
    v = torch.stack([case.v[r][s: s + ln] for r, _, s, ln in case.segments]).transpose(1, 2).contiguous()

    def gqa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)

    try:
        gqa()
        label = "GQA"
        fn = gqa
    except RuntimeError:  # this torch's flash backend does not take enable_gqa
        kr, vr = k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1)
        label = "K/V repeated"

        def fn():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=SCALE)

    return (lambda: fn().transpose(1, 2).reshape(-1, H, D)), label


def _sdpa_lower_right(case: Case) -> tuple[callable, str]:
    """One segment of n queries after a prefix (kv_len > n): lower-right causal flash."""
    (r, n, s, ln), = case.segments
    q = case.q.transpose(0, 1)[None].contiguous()  # [1, H, n, D]
    k = case.k[r][s: s + ln].repeat_interleave(H // KVH, 1).transpose(0, 1)[None].contiguous()
    v = case.v[r][s: s + ln].repeat_interleave(H // KVH, 1).transpose(0, 1)[None].contiguous()
    mask = causal_lower_right(n, ln)

    def fn():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE)

    return (lambda: fn()[0].transpose(0, 1)), "K/V repeated"


def _row(name: str, shape: str, case: Case, sdpa, label: str, matmul_TFLOPs: float) -> tuple[tuple[str, ...], float]:
    got, want = case.triton(validate=True), sdpa()
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    reps = 5 if case.flops > 5e12 else 10
    tt = cuda_time(lambda: case.triton(), reps=reps)
    tb = cuda_time(sdpa, reps=reps)
    tflops = case.flops / tt / 1e12
    row = (name, f"{shape}; SDPA {label}", f"{err:.1e}", f"{tt * 1e3:.2f} ms", f"{tb * 1e3:.2f} ms",
           f"{tflops:.0f} TFLOP/s ({100 * tflops / matmul_TFLOPs:.0f}% of matmul)", f"{100 * tb / tt:.0f}% of SDPA")
    return row, tt


def rows(matmul_TFLOPs: float) -> list[tuple[str, ...]]:
    """Rows of (kernel, shape, rel err vs SDPA, triton time, SDPA time, TFLOP/s, % of
    SDPA's rate), as bench/kernels.py prints them."""
    out = []
    case = Case([8192], [(0, 8192, 0, 8192)])
    out.append(_row("prefill attn", "8k causal", case, *_sdpa_causal(case), matmul_TFLOPs)[0])
    case = Case([4096, 4096], [(0, 4096, 0, 4096), (1, 4096, 0, 4096)])
    out.append(_row("prefill attn", "2 x 4k causal", case, *_sdpa_causal(case), matmul_TFLOPs)[0])
    case = Case([8192], [(0, 2048, 0, 8192)])
    out.append(_row("prefill attn", "2k after a 6k prefix", case, *_sdpa_lower_right(case), matmul_TFLOPs)[0])
    case = Case([32768], [(0, 32768, 0, 32768)])
    row, t_global = _row("prefill attn", "32k global causal", case, *_sdpa_causal(case), matmul_TFLOPs)
    out.append(row)
    del case
    case = Case([32768], [(0, 8192, c * 8192, 8192) for c in range(4)])
    row, t_local = _row("prefill attn", "32k chunked-local (4 x 8192)", case, *_sdpa_causal(case), matmul_TFLOPs)
    out.append((row[0], f"{row[1]}; {t_global / t_local:.1f}x faster than global", *row[2:]))
    del case
    torch.cuda.empty_cache()
    return out


def sweep_candidates() -> list[PrefillConfig]:
    """Tile configs around the default that compile for sm_90 without spills (Triton 3.6)."""
    return [PrefillConfig(128, 64, 8, 3), PrefillConfig(128, 64, 8, 2), PrefillConfig(128, 64, 8, 4),
            PrefillConfig(128, 128, 8, 2), PrefillConfig(128, 32, 8, 4), PrefillConfig(64, 64, 4, 3)]


def sweep() -> None:
    """Times each candidate on 8k causal and on the 2k-after-6k chunk: input for
    `default_config`."""
    print(f"default config: {default_config(D, torch.bfloat16, torch.device('cuda'))}")
    for name, case in (("8k causal", Case([8192], [(0, 8192, 0, 8192)])),
                       ("2k after 6k", Case([8192], [(0, 2048, 0, 8192)]))):
        ref = case.triton().float()
        timed = []
        for cfg in sweep_candidates():
            try:
                err = ((case.triton(cfg).float() - ref).norm() / ref.norm()).item()
                sec = cuda_time(lambda: case.triton(cfg), reps=10)
            except Exception as exc:  # e.g. out of shared memory
                print(f"  {name} {cfg}: {type(exc).__name__}: {str(exc)[:80]}")
                continue
            timed.append((sec, err, cfg))
        print(f"sweep {name}, fastest first:")
        for sec, err, cfg in sorted(timed, key=lambda r: r[0]):
            print(f"  {sec * 1e3:8.3f} ms  {case.flops / sec / 1e12:5.0f} TFLOP/s  err vs default {err:.1e}  "
                  f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}", flush=True)


def main() -> int:
    import triton

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}",
          flush=True)
    ceil = ceilings()
    print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    table = [("kernel", "shape", "rel err", "triton", "SDPA flash", "achieved", "vs SDPA")]
    table += rows(ceil["matmul_TFLOPs"])
    print_table(table)
    if "--sweep" in sys.argv[1:]:
        sweep()
    return 0


if __name__ == "__main__":
    sys.exit(main())
