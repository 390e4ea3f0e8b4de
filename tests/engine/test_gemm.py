"""The decode-sized matmul over 48-column weight panels (engine/layers/gemm.py, csrc/gemm.c):
the product is x @ W^T (+ bias) for every shape, a row's result does not depend on the rows
beside it, and the layers take it only for the row counts it is meant for."""
from __future__ import annotations

import pytest
import torch

from engine.layers import gemm
from engine.layers.linear import ColumnParallelLinear, RowParallelLinear

pytestmark = pytest.mark.skipif(gemm._lib() is None, reason="needs AVX-512 and a C compiler")


@pytest.mark.parametrize("k,n", [(576, 960), (64, 100), (7, 5), (130, 47), (300, 17), (129, 48)])
@pytest.mark.parametrize("rows", [1, 2, 8, 9, 33, 128])
def test_panels_give_x_times_w(k: int, n: int, rows: int) -> None:
    gen = torch.Generator().manual_seed(k * 1000 + n + rows)
    w_t, bias = torch.randn(k, n, generator=gen), torch.randn(n, generator=gen)
    x = torch.randn(rows, k, generator=gen)
    panels = gemm.pack(w_t)
    assert panels.shape == (-(-n // gemm.PANEL), k, gemm.PANEL)
    want = x.double() @ w_t.double()
    torch.testing.assert_close(gemm.linear(x, panels, n, None).double(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gemm.linear(x, panels, n, bias).double(), want + bias.double(), atol=1e-4, rtol=1e-5)


def test_a_row_does_not_depend_on_its_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    w_t, x = torch.randn(576, 1000, generator=gen), torch.randn(70, 576, generator=gen)
    panels = gemm.pack(w_t)
    whole = gemm.linear(x, panels, 1000, None)
    for lo, hi in ((0, 1), (17, 18), (3, 11), (60, 70)):  # alone, and at other places in other tiles
        assert torch.equal(gemm.linear(x[lo:hi].contiguous(), panels, 1000, None), whole[lo:hi])


def test_strided_rows_are_read_in_place() -> None:
    gen = torch.Generator().manual_seed(2)
    w_t, wide = torch.randn(64, 40, generator=gen), torch.randn(10, 100, generator=gen)
    x = wide[:, 10:74]  # rows 100 apart
    assert gemm.usable(x, gemm.pack(w_t))
    torch.testing.assert_close(gemm.linear(x, gemm.pack(w_t), 40, None), x @ w_t, atol=1e-5, rtol=1e-5)


def test_layers_take_the_panels_only_for_decode_sized_batches() -> None:
    gen = torch.Generator().manual_seed(3)
    col, row = ColumnParallelLinear(96, [80, 40], bias=True), RowParallelLinear(120, 96)
    for layer, k, n in ((col, 96, 120), (row, 120, 96)):
        layer.weight.data.copy_(torch.randn(n, k, generator=gen))
        if layer.bias is not None:
            layer.bias.data.copy_(torch.randn(n, generator=gen))
        want_w = layer.weight.data.clone()
        layer.post_load()
        assert layer.weight_panels is None  # until the model's panels are made, all in one buffer
        gemm.pack_model(layer)
        assert layer.weight_panels is not None
        for rows, taken in ((1, False), (2, True), (gemm.MAX_ROWS, True), (gemm.MAX_ROWS + 1, False)):
            x = torch.randn(rows, k, generator=gen)
            assert gemm.usable(x, layer.weight_panels) is taken
            want = x.double() @ want_w.double().t() + (layer.bias.double() if layer.bias is not None else 0)
            torch.testing.assert_close(layer(x).double(), want, atol=1e-4, rtol=1e-5)
    assert not gemm.usable(torch.randn(4, 96, dtype=torch.float64), col.weight_panels)


def test_only_cpu_layers_trade_their_weights_for_a_packed_layout() -> None:
    # a layer on another device (a GPU engine on an AVX-512 host) keeps its weights: the packed layouts take CPU
    # inputs only, and its fp32 copy is what its steps multiply
    from engine.layers import bqgemm, qgemm
    from tests.engine.test_qgemm import random_quant

    if not (bqgemm.supported() or qgemm.supported()):
        pytest.skip(f"no block-quant kernel here: {qgemm.unsupported()}; {bqgemm.unsupported()}")
    layers = []
    for device in ("cpu", "meta"):
        layer = ColumnParallelLinear(96, [48])
        quant = random_quant(48, 96, "q4_1")
        loaded = quant.dequantize()
        loaded.block_quant = quant
        layer.load_shard(layer.weight, loaded)
        layer.post_load()
        layer.weight_t = torch.nn.Parameter(layer.weight_t.data.to(device), requires_grad=False)
        gemm.pack_model(layer)
        layers.append(layer)
    cpu, other = layers
    assert (cpu.weight_bq or cpu.weight_amx) is not None and cpu.weight_t is None
    assert other.weight_bq is None and other.weight_amx is None and other.weight_t is not None
    with pytest.raises(ValueError, match="its fp32 copy went"):  # a CPU layer asked for what it no longer has
        cpu(torch.randn(3, 96, dtype=torch.float64))


def test_without_panels_the_engine_answers_the_same(tiny_checkpoints) -> None:
    from engine import LLM, SamplingParams

    prompts = [[5, 9, 200, 31], [7] * 40, [1, 2, 3]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with_panels = LLM(str(tiny_checkpoints["llama"]), num_kv_blocks=64)
    without = LLM(str(tiny_checkpoints["llama"]), num_kv_blocks=64, weight_panels=False)
    runner = without.engine.runner
    assert all(getattr(m, "weight_panels", None) is None for m in runner.model.modules())
    assert with_panels.engine.runner.model.model.layers[0].mlp.gate_up_proj.weight_panels is not None
    want = [o.token_ids for o in with_panels.generate(prompts, params)]
    assert [o.token_ids for o in without.generate(prompts, params)] == want
