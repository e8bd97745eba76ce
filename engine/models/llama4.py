"""Llama 4 text model (Scout 17B-16E, Maverick 17B-128E), plain PyTorch over the ops layer.

What it must get right (see shared/DESIGN.md):
  - iRoPE: layer i uses RoPE + chunked local attention iff (i+1) % 4 != 0 (config
    `no_rope_layers`); the other layers are NoPE global layers.
  - NoPE temperature tuning: q *= log1p(floor((pos+1) / floor_scale)) * attn_scale + 1.
  - RoPE: complex, interleaved pairs, fp32. QK L2 norm after RoPE on RoPE layers only.
  - MoE: top-1 router, the expert sees x * sigmoid(logit), plus the shared expert.
  - Dense/MoE interleaving (Maverick: MoE every 2nd layer).
Parameter names are transformers' Llama4ForCausalLM names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata
from engine.config import ModelConfig, llama3_inv_freq
from engine.models.layers import MLP, Embedding, Linear, RMSNorm, fuse_rows, param


class Llama4Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, ops):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = Linear(h, cfg.num_heads * d)
        self.k_proj = Linear(h, cfg.num_kv_heads * d)
        self.v_proj = Linear(h, cfg.num_kv_heads * d)
        self.o_proj = Linear(cfg.num_heads * d, h)
        self.qkv: torch.Tensor | None = None  # q, k, v weights as one (fuse(); the loader does it)
        self.split = (cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d)
        self.use_rope = cfg.uses_rope(layer)
        self.qk_norm = cfg.use_qk_norm and self.use_rope
        self.temperature_tuning = cfg.attn_temperature_tuning and not self.use_rope
        self.floor_scale, self.attn_scale, self.eps = cfg.floor_scale, cfg.attn_scale, cfg.rms_norm_eps
        self.scale = d**-0.5
        self.register_buffer("inv_freq", llama3_inv_freq(d, cfg.rope_theta, cfg.rope_scaling), persistent=False)
        self.ops = ops

    def fuse(self) -> None:
        self.qkv = fuse_rows(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata):
        t = x.shape[0]
        q, k, v = F.linear(x, self.qkv).split(self.split, dim=-1)  # views: every op takes token strides
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.use_rope:  # QK L2 norm (RoPE layers only) fused in when the model uses it
            q, k = self.ops.rope_interleaved(q, k, positions, self.inv_freq, self.eps if self.qk_norm else None)
        if self.temperature_tuning:
            # Long-context NoPE layers sharpen attention with the absolute position.
            scales = torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (q * scales[:, None, None]).to(q.dtype)
        self.ops.write_kv(kv_cache, k, v, meta.slot_mapping, meta.kv_scale)
        o = self.ops.attention(q, kv_cache, meta, self.scale)
        return F.linear(o.reshape(t, -1), self.o_proj.weight)


class Llama4Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = param(e, h, 2 * i)  # [E, H, 2I]: gate columns first, then up
        self.down_proj = param(e, i, h)  # [E, I, H]


class Llama4MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, ops):
        super().__init__()
        self.router = Linear(cfg.hidden_size, cfg.num_experts)
        self.experts = Llama4Experts(cfg)
        self.shared_expert = MLP(cfg.hidden_size, cfg.intermediate_size, ops)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routed = self.ops.moe(x, self.router.weight, self.experts.gate_up_proj, self.experts.down_proj)
        return self.shared_expert(x) + routed


class Llama4DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, ops):
        super().__init__()
        self.self_attn = Llama4Attention(cfg, layer, ops)
        if layer in cfg.moe_layers:
            self.feed_forward = Llama4MoE(cfg, ops)
        else:
            self.feed_forward = MLP(cfg.hidden_size, cfg.intermediate_size_mlp, ops)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ops = ops

    def forward(self, x, residual, positions, kv_cache, meta):
        """x: the previous layer's output, not yet added to the residual stream (the
        embeddings, with residual None, for the first layer). Returns (this layer's
        output, the residual stream): each add is fused into the norm that follows it."""
        n = self.input_layernorm
        if residual is None:
            y, residual = self.ops.rms_norm(x, n.weight, n.eps), x
        else:
            y, residual = self.ops.fused_add_rms_norm(x, residual, n.weight, n.eps)
        a = self.self_attn(y, positions, kv_cache, meta)
        n = self.post_attention_layernorm
        y, residual = self.ops.fused_add_rms_norm(a, residual, n.weight, n.eps)
        return self.feed_forward(y), residual


class Llama4TextModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Llama4DecoderLayer(cfg, i, ops) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama4ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ops):
        super().__init__()
        self.config = cfg
        self.model = Llama4TextModel(cfg, ops)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.ops = ops

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],  # per layer [2, num_blocks, block_size, KVH, D]
        metas: list[AttentionMetadata],  # per layer (shared within a layer group)
        on_layer: Callable[[int], None] | None = None,  # called once layer i's KV is in the cache
    ) -> torch.Tensor:
        x, residual = F.embedding(input_ids, self.model.embed_tokens.weight), None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, positions, kv_caches[i], metas[i])
            if on_layer is not None:
                on_layer(i)
        return self.ops.fused_add_rms_norm(x, residual, self.model.norm.weight, self.model.norm.eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head.weight)
