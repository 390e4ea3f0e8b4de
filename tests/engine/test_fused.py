"""The C passes for the layer's elementwise steps equal the torch expressions they replace."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.layers.fused import _lib, add_rms_norm
from engine.layers.rotary import RotaryEmbedding, apply_rotary, rotate_

pytestmark = pytest.mark.skipif(_lib() is None, reason="no C compiler here")


@pytest.mark.parametrize("rows", [1, 5, 300])  # 300 x 96 takes the threaded path
def test_add_rms_norm_matches_torch(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    x, residual = torch.randn(rows, 96, generator=gen), torch.randn(rows, 96, generator=gen)
    weight = torch.randn(96, generator=gen)
    want_sum = x + residual
    want = F.rms_norm(want_sum, (96,), weight, 1e-6)
    out, new_residual = add_rms_norm(x.clone(), residual.clone(), weight, 1e-6)
    assert torch.equal(new_residual, want_sum)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    alone, none = add_rms_norm(want_sum, None, weight, 1e-6)
    assert none is None and torch.equal(want_sum, x + residual)  # the input is left alone without a residual
    torch.testing.assert_close(alone, want, atol=1e-6, rtol=1e-6)


def test_rotary_in_place_is_bitwise_torch_on_a_qkv_view() -> None:
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim = 4, 2, 32
    qkv = torch.randn(7, heads + 2 * kv_heads, dim, generator=gen)  # [tokens, q|k|v heads, head_dim]
    rope = RotaryEmbedding(dim, 64, 10000.0)(torch.tensor([0, 1, 2, 9, 10, 40, 63]))
    want = apply_rotary(qkv[:, :heads + kv_heads], rope.cos, rope.sin)
    v = qkv[:, heads + kv_heads:].clone()
    rotate_(qkv[:, :heads + kv_heads], rope)
    assert torch.equal(qkv[:, :heads + kv_heads], want)
    assert torch.equal(qkv[:, heads + kv_heads:], v)  # the v heads are not touched
