from __future__ import annotations

import torch
from torch import nn

from engine.layers.fused import add_rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """With residual: add it first and return (normed, new residual), saving a pass; x and
        residual may be overwritten (the callers never read them again)."""
        out, residual = add_rms_norm(x, residual, self.weight, self.eps)
        return out if residual is None else (out, residual)
