"""The C passes for the layer's elementwise steps equal the torch expressions they replace."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.layers.fused import _activation_lib, _lib, add_rms_norm, argmax_rows, silu_mul
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


@pytest.mark.skipif(_activation_lib() is None, reason="the activation kernel (activation.c) did not build here")
@pytest.mark.parametrize("rows", [1, 3, 40])  # 40 x 1000 takes the threaded path
def test_silu_mul_matches_torch(rows: int) -> None:  # silu_mul runs activation.c, not fused.c: its own skip
    gate_up = torch.randn(rows, 2 * 500, generator=torch.Generator().manual_seed(rows)) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    # exp differs from torch's (Sleef) in the last bit now and then
    torch.testing.assert_close(silu_mul(gate_up), F.silu(gate) * up, atol=1e-6, rtol=1e-6)


def test_argmax_rows_is_torchs_argmax() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 49152, generator=gen)
    x[1, 100] = x[1, 40000] = 50.0  # ties: the first wins
    x[2, 7], x[2, 9000] = float("nan"), float("nan")  # NaN is the largest, the first of them
    x[3] = float("-inf")
    x[4, -1] = 99.0  # in the tail past the last full vector
    x[5, 49151], x[5, 3] = float("nan"), 1e9  # a NaN in the tail beats an earlier maximum
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    for cols in (1, 15, 16, 17, 33):
        y = torch.randn(5, cols, generator=gen)
        y[0, -1] = y[0, 0] = 9.0
        assert torch.equal(argmax_rows(y), y.argmax(dim=-1))
