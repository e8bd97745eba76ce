"""Llama 3-family dense model (LlamaForCausalLM: Llama 3.x, SmolLM2), plain PyTorch over
the ops layer. RoPE in HF's rotate-half layout; tied or untied embeddings."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata
from engine.config import ModelConfig, llama3_inv_freq
from engine.models.layers import MLP, Embedding, Linear, RMSNorm, fuse_rows


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = Linear(h, cfg.num_heads * d)
        self.k_proj = Linear(h, cfg.num_kv_heads * d)
        self.v_proj = Linear(h, cfg.num_kv_heads * d)
        self.o_proj = Linear(cfg.num_heads * d, h)
        self.qkv: torch.Tensor | None = None  # q, k, v weights as one (fuse(); the loader does it)
        self.split = (cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d)
        self.scale = d**-0.5
        self.register_buffer("inv_freq", llama3_inv_freq(d, cfg.rope_theta, cfg.rope_scaling), persistent=False)
        self.ops = ops

    def fuse(self) -> None:
        self.qkv = fuse_rows(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x, positions, kv_cache, meta: AttentionMetadata):
        t = x.shape[0]
        q, k, v = F.linear(x, self.qkv).split(self.split, dim=-1)  # views: every op takes token strides
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = self.ops.rope_half(q, k, positions, self.inv_freq)
        self.ops.write_kv(kv_cache, k, v, meta.slot_mapping, meta.kv_scale)
        o = self.ops.attention(q, kv_cache, meta, self.scale)
        return F.linear(o.reshape(t, -1), self.o_proj.weight)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, ops)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, ops)
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
        return self.mlp(y), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, ops) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ops):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, ops)
        # Tied models read the embedding matrix; the checkpoint has no lm_head then.
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self.ops = ops

    def forward(self, input_ids, positions, kv_caches, metas, on_layer: Callable[[int], None] | None = None):
        x, residual = F.embedding(input_ids, self.model.embed_tokens.weight), None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, positions, kv_caches[i], metas[i])
            if on_layer is not None:
                on_layer(i)
        return self.ops.fused_add_rms_norm(x, residual, self.model.norm.weight, self.model.norm.eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, w)
