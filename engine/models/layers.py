"""Parameter holders shared by the models. They allocate uninitialised storage (weights
always come from a checkpoint) and keep the HF names, so a checkpoint tensor's name is
the parameter's name once the architecture prefix is stripped."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def fuse_rows(*linears: Linear) -> torch.Tensor:
    """One weight `[sum of outs, in]` holding the linears' weights as row blocks, in
    order; each linear's weight becomes a view of its rows (names unchanged). One matmul
    then reads them all: at batch 1 a 1024-row projection alone runs well below the
    memory bandwidth a 7168-row one reaches."""
    fused = torch.cat([lin.weight.detach() for lin in linears])
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[start : start + n], requires_grad=False)
        start += n
    return fused


class MLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)), gate and up as one matmul once `fuse()`d
    (the loader does it)."""

    def __init__(self, hidden: int, intermediate: int, ops):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)
        self.gate_up: torch.Tensor | None = None
        self.ops = ops

    def fuse(self) -> None:
        self.gate_up = fuse_rows(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj.weight)


def fuse_projections(model: nn.Module) -> None:
    """Fuse every module's projections that read the same input (see `fuse_rows`)."""
    for m in model.modules():
        if hasattr(m, "fuse"):
            m.fuse()
