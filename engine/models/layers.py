"""Parameter holders shared by the models. They allocate uninitialised storage (weights
always come from a checkpoint) and keep the HF names, so a checkpoint tensor's name is
the parameter's name once the architecture prefix is stripped."""

from __future__ import annotations

import torch
from torch import nn


def param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = param(out_features, in_features)  # nn.Linear layout [out, in]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = param(size)
        self.eps = eps


class Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.weight = param(vocab, hidden)


class MLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, ops):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
