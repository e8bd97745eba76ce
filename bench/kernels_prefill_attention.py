"""Prefill attention benchmark (one GPU, one device call): `prefill_attention` reading K/V
through shuffled block tables, against torch SDPA with the flash backend on contiguous
K/V holding the same data, at Scout's heads (40 q / 8 KV, D 128), bf16, block size 16.

    python bench/kernels_prefill_attention.py            # the table
    python bench/kernels_prefill_attention.py --sweep    # instead: every variant x config (sweep())

FLOPs count only visible pairs: 4 * H * D per (query, key) a query sees (QK^T and PV),
about half of n * L for a square causal segment. Both sides do the same work, so "% of
SDPA" is SDPA's time over the kernel's. SDPA runs GQA natively (enable_gqa) where the
flash backend takes it; the lower-right mask has no GQA path, so that row repeats K/V
to 40 heads, as engine/ops.py does (the label says so). The kernel is timed as the
engine calls it (validate=False: no host sync; the step's tile plan built once, outside
the timing, as engine/ops.py shares one plan between a step's layers); its output is
checked against SDPA's.

Chunked-local 32k: Llama 4's RoPE layers see only their own 8192-token chunk: four
segments of 8192 queries, each over its own chunk (kv_start 0, 8192, ...), all in one
call; its SDPA baseline is the four chunks as a batch of causal 8k. Expect about a
quarter of the global 32k time.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import ceilings, cuda_time, print_table  # noqa: E402
from tandem_kernels.prefill_attention import (  # noqa: E402
    PrefillConfig, PrefillPlan, default_config, prefill_attention, prefill_plan)

H, KVH, D, BS = 40, 8, 128, 16  # Llama 4 Scout heads; the engine's default block size
SCALE = D ** -0.5


class Case:
    """One prefill step: requests of given lengths, and segments (request, n, kv_start,
    kv_len) over them. K/V live both in a paged cache (shuffled blocks) and contiguously
    per request; q is [T, H, D] for the kernel."""

    def __init__(self, lengths: list[int], segments: list[tuple[int, int, int, int]], seed: int = 0,
                 block_size: int = BS):
        torch.manual_seed(seed)
        self.segments = segments
        self.k = [torch.randn(n, KVH, D, device="cuda", dtype=torch.bfloat16) for n in lengths]
        self.v = [torch.randn(n, KVH, D, device="cuda", dtype=torch.bfloat16) for n in lengths]
        bs = block_size
        blocks = [-(-n // bs) for n in lengths]
        perm = torch.randperm(sum(blocks), device="cuda", dtype=torch.int32)
        self.k_cache = torch.empty(sum(blocks), bs, KVH, D, device="cuda", dtype=torch.bfloat16)
        self.v_cache = torch.empty_like(self.k_cache)
        tables, first = [], 0
        for n, nb, k, v in zip(lengths, blocks, self.k, self.v):
            phys = perm[first: first + nb].long()
            self.k_cache.view(-1, KVH, D)[(phys[:, None] * bs + torch.arange(bs, device="cuda")).flatten()[:n]] = k
            self.v_cache.view(-1, KVH, D)[(phys[:, None] * bs + torch.arange(bs, device="cuda")).flatten()[:n]] = v
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

    def triton(self, config: PrefillConfig | None = None, validate: bool = False,
               plan: PrefillPlan | None = None) -> torch.Tensor:
        return prefill_attention(self.q, self.k_cache, self.v_cache, self.table, self.cu, self.kv_start,
                                 self.kv_len, SCALE, config=config, validate=validate, plan=plan)

    def plan(self, config: PrefillConfig) -> PrefillPlan:
        return prefill_plan(self.cu, self.kv_start, self.kv_len, self.q.shape[0], config)


class Sdpa(NamedTuple):
    """The baseline: SDPA flash on the case's K/V, contiguous. call() is the attention
    alone ([B, H, n, D]); out() returns it as [T, H, D], like the kernel (for the causal
    batch, a copy: the main table times out(), the sweep the stricter call())."""
    call: Callable[[], torch.Tensor]
    out: Callable[[], torch.Tensor]
    label: str


def _sdpa_causal(case: Case) -> Sdpa:
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

    return Sdpa(fn, lambda: fn().transpose(1, 2).reshape(-1, H, D), label)


def _sdpa_lower_right(case: Case) -> Sdpa:
    """One segment of n queries after a prefix (kv_len > n): lower-right causal flash."""
    (r, n, s, ln), = case.segments
    q = case.q.transpose(0, 1)[None].contiguous()  # [1, H, n, D]
    k = case.k[r][s: s + ln].repeat_interleave(H // KVH, 1).transpose(0, 1)[None].contiguous()
    v = case.v[r][s: s + ln].repeat_interleave(H // KVH, 1).transpose(0, 1)[None].contiguous()
    mask = causal_lower_right(n, ln)

    def fn():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE)

    return Sdpa(fn, lambda: fn()[0].transpose(0, 1), "K/V repeated")


def _row(name: str, shape: str, case: Case, sdpa: Sdpa, matmul_TFLOPs: float) -> tuple[tuple[str, ...], float]:
    got, want = case.triton(validate=True), sdpa.out()
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    reps = 5 if case.flops > 5e12 else 10
    # As the engine calls it: the step's tile plan built once (engine/ops.py keeps it on the
    # metadata for every layer), so the per-call host work of building one is not timed.
    plan = case.plan(default_config(D, case.q.dtype, case.q.device))
    tt = cuda_time(lambda: case.triton(plan=plan), reps=reps)
    tb = cuda_time(sdpa.out, reps=reps)
    tflops = case.flops / tt / 1e12
    row = (name, f"{shape}; SDPA {sdpa.label}", f"{err:.1e}", f"{tt * 1e3:.2f} ms", f"{tb * 1e3:.2f} ms",
           f"{tflops:.0f} TFLOP/s ({100 * tflops / matmul_TFLOPs:.0f}% of matmul)", f"{100 * tb / tt:.0f}% of SDPA")
    return row, tt


def rows(matmul_TFLOPs: float) -> list[tuple[str, ...]]:
    """Rows of (kernel, shape, rel err vs SDPA, triton time, SDPA time, TFLOP/s, % of
    SDPA's rate), as bench/kernels.py prints them."""
    out = []
    case = Case([8192], [(0, 8192, 0, 8192)])
    out.append(_row("prefill attn", "8k causal", case, _sdpa_causal(case), matmul_TFLOPs)[0])
    case = Case([4096, 4096], [(0, 4096, 0, 4096), (1, 4096, 0, 4096)])
    out.append(_row("prefill attn", "2 x 4k causal", case, _sdpa_causal(case), matmul_TFLOPs)[0])
    case = Case([8192], [(0, 2048, 0, 8192)])
    out.append(_row("prefill attn", "2k after a 6k prefix", case, _sdpa_lower_right(case), matmul_TFLOPs)[0])
    case = Case([32768], [(0, 32768, 0, 32768)])
    row, t_global = _row("prefill attn", "32k global causal", case, _sdpa_causal(case), matmul_TFLOPs)
    out.append(row)
    del case
    case = Case([32768], [(0, 8192, c * 8192, 8192) for c in range(4)])
    row, t_local = _row("prefill attn", "32k chunked-local (4 x 8192)", case, _sdpa_causal(case), matmul_TFLOPs)
    out.append((row[0], f"{row[1]}; {t_global / t_local:.1f}x faster than global", *row[2:]))
    del case
    torch.cuda.empty_cache()
    return out


# -- the sweep: input for default_config ---------------------------------------------------

# PrefillConfig's switches by name; "first measured" is the kernel of the first H100 runs.
VARIANTS = {
    "first measured": {},
    "ids per block": dict(ids_per_block=True),
    "lean runs": dict(lean_runs=True),
    "group order": dict(order="group"),
    "tiles order": dict(order="tiles"),
    "ids + lean": dict(ids_per_block=True, lean_runs=True),
    "ids + lean + group": dict(ids_per_block=True, lean_runs=True, order="group"),
}
# The default tiles, then the two runners-up of the earlier tile sweep that compile for
# sm_90 pipelined and without spills (64 x 64 with 4 warps fits two programs on an SM).
TILES = [PrefillConfig(128, 64, 8, 3), PrefillConfig(128, 64, 8, 4), PrefillConfig(64, 64, 4, 3)]
BUDGET_S = 200  # no new case or compile starts after this; the call must end within 4 minutes


def sweep_candidates(block_size: int) -> list[tuple[str, PrefillConfig]]:
    """(variant, config): every variant on the default tiles; on the other tiles, the
    first-measured kernel and the variants expected to matter. With 64-token cache blocks
    (BLOCK_N == block_size: one table entry a tile), the variants on the default tiles."""
    out = [(name, TILES[0]._replace(**switches)) for name, switches in VARIANTS.items()]
    if block_size == BS:
        out += [(name, tiles._replace(**VARIANTS[name])) for tiles in TILES[1:]
                for name in ("first measured", "ids + lean", "ids + lean + group")]
    else:
        out = [c for c in out if c[0] in ("first measured", "ids per block", "ids + lean", "ids + lean + group")]
    return out


def _seconds(fn, gpu_only: bool) -> float:
    """One call of fn between two CUDA events, from an idle GPU. gpu_only: a ~5 ms device
    sleep is queued first, so the host has issued the call before the first event fires
    and only device time is measured; otherwise the host's time to issue the call counts
    too, as it does for a layer whose GPU waits on it."""
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if gpu_only:
        torch.cuda._sleep(10_000_000)  # cycles
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3


def _sweep_case(name: str, case: Case, sdpa: Sdpa, candidates: list[tuple[str, PrefillConfig]], t0: float,
                rounds: int = 7) -> list[tuple[str, ...]]:
    """Rows for one case: each candidate compiled and checked, then every candidate and
    SDPA timed once a round, interleaved, for `rounds` rounds; medians."""
    import time

    want = sdpa.out().float()
    timers = {("SDPA flash", ""): (sdpa.call, sdpa.call)}  # (variant, tiles) -> (call, own plan; call, step's plan)
    notes = {}  # (variant, tiles) -> (max rel err, same bits), or (why it has no times, "")
    outs = {}  # tiles -> the first-measured kernel's output
    for variant, cfg in candidates:
        key = (variant, f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}")
        if time.perf_counter() - t0 > BUDGET_S:
            notes[key] = ("skipped: time budget", "")
            continue
        try:
            plan = case.plan(cfg)
            out = case.triton(plan=plan, validate=True).float()
            torch.cuda.synchronize()
        except Exception as exc:  # a config that does not compile or fit: a row, not a crash
            notes[key] = (f"{type(exc).__name__}: {str(exc).strip()[:100]}".splitlines()[0], "")
            continue
        if variant == "first measured":  # what the others on these tiles must equal bit for bit
            outs[key[1]] = out
        first = outs.get(key[1])
        err = ((out - want).abs().max() / want.abs().max()).item()
        notes[key] = (f"{err:.1e}", "-" if first is None else "yes" if torch.equal(out, first) else "NO")
        timers[key] = (lambda cfg=cfg: case.triton(cfg), lambda plan=plan: case.triton(plan=plan))
    times = {key: ([], [], []) for key in timers}  # call (own plan), call (step's plan), GPU only
    for _ in range(rounds):
        for key, (own, shared) in list(timers.items()):
            try:
                times[key][0].append(_seconds(own, False))
                times[key][1].append(_seconds(shared, False))
                times[key][2].append(_seconds(shared, True))
            except Exception as exc:
                notes[key] = (f"failed while timed: {type(exc).__name__}: {str(exc).strip()[:80]}".splitlines()[0], "")
                del timers[key]
    med = {key: [statistics.median(t) for t in times[key]] for key in timers}
    sdpa_call, _, sdpa_gpu = med.pop(("SDPA flash", ""), [float("nan")] * 3)  # nan: SDPA itself failed
    rows = [(name, "SDPA flash", "", f"{sdpa_call * 1e3:.3f}", f"{sdpa_call * 1e3:.3f}", f"{sdpa_gpu * 1e3:.3f}",
             f"{case.flops / sdpa_gpu / 1e12:.0f}", "100%", "100%", "", "")]
    for key, note in notes.items():
        if key not in med:
            rows.append((name, *key, "", "", "", "", "", "", *note))
            continue
        own, shared, gpu = med[key]
        rows.append((name, *key, f"{own * 1e3:.3f}", f"{shared * 1e3:.3f}", f"{gpu * 1e3:.3f}",
                     f"{case.flops / gpu / 1e12:.0f}", f"{100 * sdpa_call / shared:.0f}%",
                     f"{100 * sdpa_gpu / gpu:.0f}%", *note))
    if med:
        for what, i in (("on the GPU", 2), ("per call given the step's plan", 1)):
            key = min(med, key=lambda k: med[k][i])
            print(f"{name}: fastest {what}: {key[0]}, {key[1]} ({med[key][i] * 1e3:.3f} ms)", flush=True)
    return rows


def sweep() -> None:
    """Every variant x tile config on 8k causal, a 2k chunk after a 6k prefix, 32k
    chunked-local and 8k causal over 64-token cache blocks, each against SDPA flash timed
    in the same rounds. Three times per candidate: a call that builds its own plan (the
    kernel as first wired), a call given the step's plan (what the engine pays per layer
    once it builds one plan a step), and device time alone. Input for default_config and
    PrefillConfig's defaults; one process, under 4 minutes on an H100."""
    import time

    t0 = time.perf_counter()
    print(f"default config: {default_config(D, torch.bfloat16, torch.device('cuda'))}", flush=True)
    cases = [
        ("8k causal", lambda: Case([8192], [(0, 8192, 0, 8192)]), _sdpa_causal),
        ("2k after 6k", lambda: Case([8192], [(0, 2048, 0, 8192)]), _sdpa_lower_right),
        ("32k chunked-local", lambda: Case([32768], [(0, 8192, c * 8192, 8192) for c in range(4)]), _sdpa_causal),
        ("8k causal, 64-token blocks", lambda: Case([8192], [(0, 8192, 0, 8192)], block_size=64), _sdpa_causal),
    ]
    header = ("case", "variant", "tiles", "ms/call, own plan", "ms/call, step's plan", "ms GPU", "TFLOP/s GPU",
              "% SDPA call", "% SDPA GPU", "max rel err vs SDPA", "same bits as first measured")
    for name, make, baseline in cases:
        if time.perf_counter() - t0 > BUDGET_S:
            print(f"{name}: skipped (time budget)", flush=True)
            continue
        case = make()
        sdpa = baseline(case)
        rows = _sweep_case(f"{name} (SDPA {sdpa.label})", case, sdpa, sweep_candidates(case.k_cache.shape[1]), t0)
        print_table([header, *rows])
        print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
        del case, sdpa
        torch.cuda.empty_cache()


def main() -> int:
    import triton

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}",
          flush=True)
    if "--sweep" in sys.argv[1:]:
        sweep()
        return 0
    ceil = ceilings()
    print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    table = [("kernel", "shape", "rel err", "triton", "SDPA flash", "achieved", "vs SDPA")]
    table += rows(ceil["matmul_TFLOPs"])
    print_table(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
