"""The AVX-512 matmul over block-quantized weights (engine/layers/bqgemm.py, hosts without AMX):
within a few fp32 roundings of a float64 reference on each of its paths (up to 8 rows streamed,
packed tiles of up to 24, the wide path's widened weights from 48 rows), a row's result bit for bit
the same whichever path its step took, and its portable build declining (nothing written) rather
than computing."""
from __future__ import annotations

import pytest
import torch

from engine.layers import bqgemm
from tests.engine.test_qgemm import check_against_float64, random_quant

torch.set_num_threads(2)
needs_avx512 = pytest.mark.skipif(not bqgemm.supported(), reason=str(bqgemm.unsupported()))


@needs_avx512
@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q5_1", "q8_0"])
@pytest.mark.parametrize("rows,n,k", [(1, 40, 64), (2, 1, 32), (3, 17, 64), (4, 48, 96), (5, 960, 576), (11, 33, 64),
                                      (16, 100, 1536), (30, 50, 96), (49, 17, 64), (100, 70, 128), (200, 48, 64)])
def test_matches_float64(kind: str, rows: int, n: int, k: int) -> None:
    check_against_float64(lambda x, quant, bias: bqgemm.linear(x, bqgemm.pack(quant), bias), kind, rows, n, k)


@needs_avx512
def test_formats_without_offsets_skip_the_m_term_and_no_bias() -> None:
    quant = random_quant(48, 96, "q8_0")
    packed = bqgemm.pack(quant)
    assert not packed.has_m and bqgemm.pack(random_quant(48, 96, "q4_1")).has_m
    x = torch.randn(3, 96)
    torch.testing.assert_close(bqgemm.linear(x, packed, None), x @ quant.dequantize().T, rtol=1e-5, atol=1e-5)


@needs_avx512
@pytest.mark.parametrize("n", [70, 96])  # 70: a last pair of column groups with one group, a part-filled one
def test_a_row_does_not_depend_on_the_batch_or_the_path_and_strided_rows_work(n: int) -> None:
    quant = random_quant(n, 128, "q4_1", seed=3)
    packed = bqgemm.pack(quant)
    bias = torch.randn(n)
    x = torch.randn(130, 256)[:, ::2]  # rows with a stride: copied to contiguous
    alone = torch.cat([bqgemm.linear(x[i:i + 1], packed, bias) for i in range(130)])
    # up to 8: streamed, 1-4 column groups at a time by row count; 9-47 packed tiles (24 + 1 at 25); 48-128: the
    # wide path, chunks of 96 and a partial tile
    for rows in (2, 3, 4, 5, 7, 8, 9, 25, 47, 48, 97, bqgemm.PANEL_MIN - 1):
        assert torch.equal(bqgemm.linear(x[:rows], packed, bias), alone[:rows]), rows
    assert bqgemm.usable(x, packed) and not bqgemm.usable(x, packed, bqgemm.FEW_ROWS)


@needs_avx512
@pytest.mark.parametrize("kind,n,k", [("q4_0", 200, 96), ("q4_1", 200, 96), ("q5_1", 70, 576), ("q8_0", 17, 1536)])
def test_prefill_chunks_are_an_fp32_matmul_over_the_dequantized_weights(kind: str, n: int, k: int) -> None:
    # from PANEL_MIN rows: 64-column panels dequantized as the checkpoint's fp32 weights are (d q, then + m, each
    # rounded), then fp32 sums per output over 128 k at a time: MKL's numbers up to the order of the sum. 200 columns: 3
    # panels and a part-filled fourth; 70 and 17: a last group of 6 and 1 columns. 500 rows: 3 work items of rows
    # (240, 240, 20), a short last tile. x's rows strided (read in place, not copied)
    quant = random_quant(n, k, kind, seed=5)
    packed, bias = bqgemm.pack(quant), torch.randn(n)
    x = torch.randn(500, k + 40)[:, 8:8 + k]
    assert x.stride(1) == 1 and x.stride(0) != k
    got = bqgemm.linear(x, packed, bias)
    want = x.double() @ quant.dequantize().double().T + bias.double()  # fp32 weights, summed in float64
    fp32 = torch.addmm(bias, x, quant.dequantize().T)
    assert (got.double() - want).abs().max() <= 2 * (fp32.double() - want).abs().max() + 1e-6
    assert torch.equal(bqgemm.linear(x.contiguous(), packed, bias), got)
    # a row's result does not depend on how the call's rows fall into work items and tiles
    assert torch.equal(bqgemm.linear(x[233:233 + bqgemm.PANEL_MIN], packed, bias), got[233:233 + bqgemm.PANEL_MIN])


def test_it_runs_exactly_where_the_cpu_has_avx512_and_names_why_not() -> None:
    from engine import native

    has = "avx512f" in open("/proc/cpuinfo").read() and not native.portable()
    assert bqgemm.supported() == has
    assert bqgemm.unsupported() == (None if has else f"{native.PORTABLE_ENV} is set (AVX-512 off)"
                                    if native.portable() else "no AVX-512 on this CPU")


@needs_avx512
def test_scales_are_kept_in_fp16_exactly_or_refused() -> None:
    quant = random_quant(48, 96, "q4_1")  # GGUF-made: its d and m are fp16 values
    packed = bqgemm.pack(quant)
    assert packed.dm.dtype is torch.float16
    off = quant._replace(d=quant.d + 1e-6)  # not an fp16 value any more: the fp32 layouts take such a weight
    assert bqgemm.packable(quant) and not bqgemm.packable(off)
    with pytest.raises(ValueError, match="fp16"):
        bqgemm.pack(off)
