"""The ops layer: every piece of math the models do, behind one object.

Models call `self.ops.rms_norm(...)`, `self.ops.attention(...)` and so on, never torch
directly for these. `TorchOps` is the plain-PyTorch implementation, exact against
transformers and used on CPU; the Triton kernels (tandem_kernels/) subclass it and replace
methods one by one, so the model code never changes. Shapes are written as
`[tokens, heads, head_dim]` etc.; T is the number of tokens in the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from engine.attention import AttentionMetadata, DecodeBatch

# cuDNN's SDPA builds a graph per new shape (~16 ms of CPU each); the key length changes
# every decode step, so it would rebuild every step. Flash / memory-efficient / math
# have no such cost (measured on H100, BENCHMARKS.md).
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# An fp8 KV cache (tandem_kernels/kv_write.py's format): float8_e4m3fn with per-tensor (K, V)
# scales in a [2] fp32 tensor on the cache's device; x ~ cache.float() * scale.
FP8_KV = torch.float8_e4m3fn


def _check_kv_scale(kv_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> None:
    """An fp8 cache needs its scales; any other cache takes none. Host-side only (no sync)."""
    if kv_cache.dtype == FP8_KV:
        if kv_scale is None or kv_scale.shape != (2,) or kv_scale.dtype != torch.float32 \
                or kv_scale.device != kv_cache.device:
            got = None if kv_scale is None else f"{tuple(kv_scale.shape)} {kv_scale.dtype} on {kv_scale.device}"
            raise ValueError(f"kv_scale: a {FP8_KV} cache needs a [2] float32 (K, V) tensor on "
                             f"{kv_cache.device}, got {got}")
    elif kv_scale is not None:
        raise ValueError(f"kv_scale: only for a {FP8_KV} cache, this one is {kv_cache.dtype}")


def _gather_kv(kv_cache: torch.Tensor, slots: torch.Tensor,
               kv_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V at `slots` (any shape), each [*slots.shape, KVH, D]: in the cache's dtype,
    or, from an fp8 cache, dequantised to fp32. Only the gathered rows are converted,
    never the whole cache; fp8 rows are gathered as bytes (indexing need not support fp8
    on every device)."""
    kvh, d = kv_cache.shape[-2], kv_cache.shape[-1]
    if kv_scale is None:
        return kv_cache[0].view(-1, kvh, d)[slots], kv_cache[1].view(-1, kvh, d)[slots]
    raw = kv_cache.view(torch.uint8)
    k, v = (raw[i].view(-1, kvh, d)[slots].view(FP8_KV).float() * kv_scale[i] for i in (0, 1))
    return k, v


class TorchOps:
    name = "torch"

    # -- norms -------------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm in fp32, cast back, then scaled (HF Llama/Llama4 order of rounding)."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    def fused_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(residual + x), residual + x): a decoder layer's `h = h + sublayer(...)`
        followed by the next norm, which a kernel does in one pass over the hidden state."""
        h = residual + x
        return self.rms_norm(h, weight, eps), h

    def l2_norm(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        """Llama 4's weightless QK norm."""
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)

    # -- rotary embeddings -------------------------------------------------------------
    def rope_interleaved(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
        norm_eps: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Llama 4 RoPE: adjacent pairs (x[2i], x[2i+1]) are one complex number.
        q: [T, H, D], k: [T, KVH, D], positions: [T]. norm_eps: then the QK L2 norm."""
        if norm_eps is not None:
            q, k = self.rope_interleaved(q, k, positions, inv_freq)
            return self.l2_norm(q, norm_eps), self.l2_norm(k, norm_eps)
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
        cis = torch.polar(torch.ones_like(freqs), freqs)[:, None, :]  # [T, 1, D/2]

        def rot(x):
            xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(xc * cis).flatten(-2).type_as(x)

        return rot(q), rot(k)

    def rope_half(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Llama 3 RoPE (HF layout): the two halves of the head dim are the pair."""
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(q.dtype)[:, None, :], emb.sin().to(q.dtype)[:, None, :]

        def rot(x):
            x1, x2 = x.chunk(2, dim=-1)
            return x * cos + torch.cat((-x2, x1), dim=-1) * sin

        return rot(q), rot(k)

    # -- MLPs ----------------------------------------------------------------------------
    def moe(
        self,
        x: torch.Tensor,  # [T, H]
        router: torch.Tensor,  # [E, H]
        gate_up: torch.Tensor,  # [E, H, 2I], gate is the first half
        down: torch.Tensor,  # [E, I, H]
    ) -> torch.Tensor:
        """Llama 4 top-1 MoE: the expert sees x * sigmoid(its router logit)."""
        logits = F.linear(x, router)  # [T, E]
        top_logit, expert = logits.max(dim=-1)
        score = torch.sigmoid(top_logit.float()).to(x.dtype)
        xs = x * score[:, None]
        out = torch.zeros_like(x)
        # Group tokens by expert so each expert's weights are read once per step.
        order = torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=router.shape[0]).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = order[start : start + n]
            start += n
            g, u = (xs[idx] @ gate_up[e]).chunk(2, dim=-1)
            out[idx] = (F.silu(g) * u) @ down[e]
        return out

    # -- attention -----------------------------------------------------------------------
    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                 kv_scale: torch.Tensor | None = None) -> None:
        """kv_cache: [2, num_blocks, block_size, KVH, D]; k, v: [T, KVH, D]; slots: [T].
        kv_scale: [2] fp32 (K, V) for an fp8 cache, which stores x / scale rounded to e4m3
        (tandem_kernels/kv_write.py's quantize_fp8_reference)."""
        _check_kv_scale(kv_cache, kv_scale)
        kvh, d = k.shape[1], k.shape[2]
        if kv_scale is None:
            kv_cache[0].view(-1, kvh, d)[slots] = k
            kv_cache[1].view(-1, kvh, d)[slots] = v
            return
        from tandem_kernels.kv_write import quantize_fp8_reference  # imports triton: only fp8 caches need it

        for i, x in enumerate((k, v)):  # scattered as bytes: index_put need not support fp8 on every device
            dst = kv_cache[i].view(torch.uint8).view(-1, kvh, d)
            dst[slots] = quantize_fp8_reference(x, kv_scale[i]).view(torch.uint8)

    def attention(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Every query of the step; an fp8 cache is read with meta.kv_scale."""
        _check_kv_scale(kv_cache, meta.kv_scale)
        with sdpa_kernel(_SDPA_BACKENDS):
            return self._attention(q, kv_cache, meta, scale)

    def decode_attention(self, q: torch.Tensor, kv_cache: torch.Tensor, dec: DecodeBatch, scale: float,
                         kv_scale: torch.Tensor | None = None) -> torch.Tensor:
        """One query per row, q: [B, H, D] -> [B, H, D]. Grouped matmuls in fp32, each KV
        head read once for its G query heads (SDPA with a mask and GQA falls back to its
        math kernel, which repeats K/V G times: 4 ms a step at 16 x 8k, measured).
        kv_scale: an fp8 cache's (K, V) scales; the gathered keys are dequantised in fp32."""
        _check_kv_scale(kv_cache, kv_scale)
        kvh, d, bs = kv_cache.shape[-2], kv_cache.shape[-1], kv_cache.shape[2]
        b, h = q.shape[0], q.shape[1]
        slots, mask = dec.key_slots(bs)
        qd = q.view(b, kvh, h // kvh, d).float()  # [B, KVH, G, D]; head i uses KV head i // G
        k, v = _gather_kv(kv_cache, slots, kv_scale)  # [B, L, KVH, D]
        k, v = k.float(), v.float()
        scores = torch.einsum("bkgd,blkd->bkgl", qd, k) * scale
        scores.masked_fill_(~mask[:, None, None, :], float("-inf"))
        o = torch.einsum("bkgl,blkd->bkgd", scores.softmax(-1), v)
        return o.reshape(b, h, d).to(q.dtype)

    def _attention(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """q: [T, H, D] -> [T, H, D], reading keys/values from the paged cache.
        Decode rows (one query each) run as one padded batch; each prefill segment
        runs on its own with its own mask. An fp8 cache's keys are dequantised to q's dtype."""
        kvh = kv_cache.shape[-2]
        out = torch.empty_like(q)
        gqa = q.shape[1] != kvh
        if meta.decode is not None:
            dec = meta.decode
            out[dec.token_index] = self.decode_attention(q[dec.token_index], kv_cache, dec, scale, meta.kv_scale)
        for seg in meta.prefills:
            qs = q[seg.start : seg.end].transpose(0, 1)[None]  # [1, H, n, D]
            k, v = (x.to(q.dtype).transpose(0, 1)[None]  # [1, KVH, L, D]
                    for x in _gather_kv(kv_cache, seg.kv_slots, meta.kv_scale))
            n, length = qs.shape[2], k.shape[2]
            if n == length:  # causal over exactly these tokens
                o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
            else:  # a chunk after a prefix: lower-right causal, which flash runs without a mask
                if gqa:  # the lower-right path has no GQA; expanding K/V costs far less than a mask
                    k = k.repeat_interleave(q.shape[1] // kvh, dim=1)
                    v = v.repeat_interleave(q.shape[1] // kvh, dim=1)
                o = F.scaled_dot_product_attention(qs, k, v, attn_mask=causal_lower_right(n, length), scale=scale)
            out[seg.start : seg.end] = o[0].transpose(0, 1)
        return out


class TritonOps(TorchOps):
    """TorchOps with Triton kernels (tandem_kernels/) where one exists, on CUDA tensors; CPU
    tensors keep the torch versions, unless `on_cpu` is set: then the kernels run on CPU
    tensors too, in Triton's interpreter (TRITON_INTERPRET=1; tests only, slow).
    Issue 3 adds kernels here one op at a time."""

    name = "triton"
    on_cpu = False
    prefill_on_cpu = False  # with on_cpu: prefill attention too (slow in the interpreter; its own tests)
    # No step syncs the host (the fused MoE routes on the device), so decode steps can be
    # captured in CUDA graphs (engine/cuda_graphs.py).
    graph_safe = True

    def __init__(self):
        from tandem_kernels.kv_write import write_kv  # needs triton
        from tandem_kernels.moe import fused_moe
        from tandem_kernels.paged_attention import choose_num_splits, paged_decode_attention
        from tandem_kernels.prefill_attention import default_config, prefill_attention, prefill_plan
        from tandem_kernels.rms_norm import fused_add_rms_norm, rms_norm
        from tandem_kernels.rope import rope

        self._rms_norm = rms_norm
        self._fused_add_rms_norm = fused_add_rms_norm
        self._write_kv = write_kv
        self._rope = rope
        self._moe = fused_moe
        self._paged_decode = paged_decode_attention
        self._num_splits = choose_num_splits
        self._prefill = prefill_attention
        self._prefill_plan = prefill_plan
        self._prefill_config = default_config
        self._num_sms: dict[torch.device, int] = {}

    def _kernel(self, t: torch.Tensor) -> bool:
        return t.is_cuda or self.on_cpu

    def _sms(self, device: torch.device) -> int:
        if device not in self._num_sms:
            self._num_sms[device] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        return self._num_sms[device]

    def decode_attention(self, q, kv_cache, dec, scale, kv_scale=None):
        if not self._kernel(q):
            return super().decode_attention(q, kv_cache, dec, scale, kv_scale)
        bs, kvh = kv_cache.shape[2], kv_cache.shape[3]
        splits = self._num_splits(q.shape[0], kvh, dec.max_len // bs + 1, self._sms(q.device))
        # The metadata is the engine's own (build_metadata checked the block indices), so
        # the value checks and their host syncs are skipped.
        return self._paged_decode(q, kv_cache[0], kv_cache[1], dec.block_tables, dec.kv_start, dec.kv_len,
                                  scale, kv_scale, num_splits=splits, validate=False)

    def _attention(self, q, kv_cache, meta, scale):
        """Prefill segments through the paged prefill kernel, all of them in one launch per
        layer, reading K/V through the block tables (no gather), with one tile plan per
        step and layer group (built by the first layer, kept on the metadata). The kernel
        reads K/V in q's dtype only: an fp8 cache keeps the SDPA path. On CPU tensors only
        with prefill_on_cpu (the interpreter is slow at prompt lengths)."""
        pb = meta.prefill_batch
        if pb is None or kv_cache.dtype != q.dtype or not (q.is_cuda or (self.on_cpu and self.prefill_on_cpu)):
            return super()._attention(q, kv_cache, meta, scale)
        out = torch.empty_like(q)
        if meta.decode is not None:
            dec = meta.decode
            out[dec.token_index] = self.decode_attention(q[dec.token_index], kv_cache, dec, scale, meta.kv_scale)
        config = self._prefill_config(q.shape[-1], q.dtype, q.device)
        if pb.plan is None or pb.plan.config != config:  # a plan is made for one config
            pb.plan = self._prefill_plan(pb.cu_seqlens_q, pb.kv_start, pb.kv_len, pb.num_tokens, config)
        # The metadata is the engine's own (build_metadata checked the block indices): no value checks, no sync.
        out[pb.rows] = self._prefill(q[pb.rows], kv_cache[0], kv_cache[1], pb.block_tables, pb.cu_seqlens_q,
                                     pb.kv_start, pb.kv_len, scale, validate=False, plan=pb.plan)
        return out

    def rope_interleaved(self, q, k, positions, inv_freq, norm_eps=None):
        if not self._kernel(q):
            return super().rope_interleaved(q, k, positions, inv_freq, norm_eps)
        return self._rope(q, k, positions, inv_freq, True, norm_eps)

    def rope_half(self, q, k, positions, inv_freq):
        if not self._kernel(q):
            return super().rope_half(q, k, positions, inv_freq)
        return self._rope(q, k, positions, inv_freq, False)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not self._kernel(x):
            return super().rms_norm(x, weight, eps)
        return self._rms_norm(x, weight, eps)

    def fused_add_rms_norm(self, x, residual, weight, eps):
        if not self._kernel(x):
            return super().fused_add_rms_norm(x, residual, weight, eps)
        return self._fused_add_rms_norm(x, residual, weight, eps)

    def write_kv(self, kv_cache, k, v, slots, kv_scale=None):
        if not self._kernel(k):
            return super().write_kv(kv_cache, k, v, slots, kv_scale)
        _check_kv_scale(kv_cache, kv_scale)  # the kernel's own check names its argument `scale`
        return self._write_kv(kv_cache, k, v, slots, kv_scale)

    def moe(self, x, router, gate_up, down):
        if not self._kernel(x):
            return super().moe(x, router, gate_up, down)
        return self._moe(x, router, gate_up, down)


OPS = {"torch": TorchOps, "triton": TritonOps}


def make_ops(name: str, device: str = "cpu") -> TorchOps:
    """name: "torch", "triton", or "auto": Triton's kernels (and so decode CUDA graphs) on
    a CUDA device when triton is installed, plain torch otherwise."""
    if name == "auto":
        name = "torch"
        if device.startswith("cuda"):
            try:
                import triton  # noqa: F401
                name = "triton"
            except ImportError:
                pass
    if name not in OPS:
        raise ValueError(f"ops must be one of {sorted(OPS)} or 'auto', got {name!r}")
    return OPS[name]()
