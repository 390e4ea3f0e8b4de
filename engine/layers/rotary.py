"""Rotary position embedding (the rotate-half form), with Llama-3 frequency scaling."""
from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import torch
from torch import nn

from engine.layers.fused import rotary_inplace


def _inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"rope scaling {kind!r} is not supported; supported: llama3 (or none)")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed by `factor`, short ones kept, the band between blended
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


class Rope:
    """One step's rotary inputs, made once and used by every layer: the C pass reads the tables
    through positions; the per-token cos/sin rows are gathered only if the torch path needs them."""

    def __init__(self, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor) -> None:
        self.positions = positions  # [num_tokens] int64
        self.cos_table, self.sin_table = cos_table, sin_table  # [max_positions, head_dim]

    @cached_property
    def cos(self) -> torch.Tensor:
        return self.cos_table[self.positions].unsqueeze(1)  # [num_tokens, 1, head_dim]

    @cached_property
    def sin(self) -> torch.Tensor:
        return self.sin_table[self.positions].unsqueeze(1)  # rotate-half sign folded in


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), _inv_freq(head_dim, theta, scaling))
        # computed in fp32, kept in the model's dtype (the default dtype while it is built): in bf16/fp16 the
        # rotation then rounds as transformers' and vLLM's do (cos/sin cast to the activations' dtype first)
        dtype = torch.get_default_dtype()
        cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)  # [max_positions, head_dim / 2]
        self.register_buffer("cos", torch.cat((cos, cos), dim=-1), persistent=False)
        # rotate_half(x) * sin == cat(x2, x1) * cat(-sin, sin): the sign is folded in here, once
        self.register_buffer("sin", torch.cat((-sin, sin), dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor) -> Rope:
        return Rope(positions, self.cos, self.sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim]; sin carries the rotate-half sign (see above)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((x2, x1), dim=-1) * sin


def rotate_(x: torch.Tensor, rope: Rope) -> None:
    """apply_rotary in place on x: [num_tokens, num_heads, head_dim] (a view into q|k|v is fine)."""
    if not rotary_inplace(x, rope.positions, rope.cos_table, rope.sin_table):
        x.copy_(apply_rotary(x, rope.cos, rope.sin))
