"""The AMX matmul over block-quantized weights (engine/layers/qgemm.py): exact to fp32 against a
float64 reference, a row's result independent of the batch, the integers read from GGUF blocks
as gguf dequantizes them, and the default model's layers on it."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from engine.layers import gemm, qgemm
from engine.layers.qgemm import BlockQuant

torch.set_num_threads(2)
needs_amx = pytest.mark.skipif(not qgemm.supported(), reason="no AMX-BF16 on this CPU (or no compiler)")


def random_quant(rows: int, cols: int, kind: str, seed: int = 0) -> BlockQuant:
    g = torch.Generator().manual_seed(seed)
    blocks = (rows, cols // 32)
    if kind == "q8_0":
        q = torch.randint(-128, 128, (rows, cols), generator=g)
    elif kind == "q5_1":
        q = torch.randint(0, 32, (rows, cols), generator=g)
    else:
        q = torch.randint(0, 16, (rows, cols), generator=g) - (8 if kind == "q4_0" else 0)
    d = (torch.rand(blocks, generator=g) * 0.05).half().float()  # GGUF scales are fp16
    with_m = kind in ("q4_1", "q5_1")
    m = -(torch.rand(blocks, generator=g) * 0.2).half().float() if with_m else torch.zeros(blocks)
    return BlockQuant(q.to(torch.int8), d, m)


@needs_amx
@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q5_1", "q8_0"])
@pytest.mark.parametrize("rows,n,k", [(1, 40, 64), (2, 1, 32), (3, 17, 64), (16, 48, 96), (32, 960, 576),
                                      (33, 100, 1536), (200, 576, 576)])
def test_matches_float64(kind: str, rows: int, n: int, k: int) -> None:
    check_against_float64(lambda x, quant, bias: qgemm.linear(x, qgemm.pack(quant), bias), kind, rows, n, k)


def check_against_float64(linear, kind: str, rows: int, n: int, k: int) -> None:
    """linear(x, quant, bias) within a few fp32 roundings of float64 over the dequantized weight (this
    kernel's test and bqgemm's)."""
    quant = random_quant(n, k, kind, seed=rows + n + k)
    w = quant.dequantize()
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(n)
    y = linear(x, quant, bias)
    ref = x.double() @ w.double().T + bias.double()
    fp32_err = ((x @ w.T + bias).double() - ref).abs().max()  # what a plain fp32 matmul is off by
    bound = 2 * fp32_err + 4 * 2.0 ** -24 * (x.abs() @ w.abs().T + bias.abs()).double()  # + a few roundings
    assert y.shape == (rows, n) and y.dtype is torch.float32
    assert ((y.double() - ref).abs() <= bound).all()
    # the bound catches a kernel that multiplied x rounded to bf16 (AMX: one part of the three)
    coarse = x.bfloat16().double() @ w.double().T + bias.double()
    assert ((coarse - ref).abs() > bound).any()


@needs_amx
@pytest.mark.parametrize("rows", [1, 32, 70])
def test_formats_without_offsets_skip_the_m_term(rows: int) -> None:
    assert qgemm.pack(random_quant(48, 96, "q4_1")).has_m
    quant = random_quant(48, 96, "q8_0")
    packed = qgemm.pack(quant)
    assert not packed.has_m
    x = torch.randn(rows, 96)
    with_term = qgemm.linear(x, packed._replace(has_m=True), None)  # adds m * S = 0 * S
    assert torch.equal(qgemm.linear(x, packed, None), with_term)


@needs_amx
def test_row_does_not_depend_on_batch() -> None:
    quant = random_quant(130, 576, "q4_1")
    packed = qgemm.pack(quant)
    x = torch.randn(70, 576)
    full = qgemm.linear(x, packed, None)
    for start, stop in ((5, 6), (5, 7), (0, 16), (20, 53), (40, 70)):
        assert torch.equal(qgemm.linear(x[start:stop].contiguous(), packed, None), full[start:stop])


@needs_amx
def test_strided_rows_and_out_features() -> None:
    quant = random_quant(40, 64, "q8_0")
    packed = qgemm.pack(quant)
    base = torch.randn(6, 100)
    x = base[:, 10:74]  # row stride 100
    assert not qgemm.usable(base, packed) and qgemm.usable(x, packed) and qgemm.usable(x[:1], packed)
    assert not qgemm.usable(x.double(), packed)
    ref = x.contiguous() @ quant.dequantize().T
    torch.testing.assert_close(qgemm.linear(x, packed, None), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qgemm.linear(x, packed, None, out_features=33), ref[:, :33], rtol=1e-5, atol=1e-5)
    columns = x.t().contiguous().t()  # column-major: copied to rows first
    assert columns.stride(1) != 1 and torch.equal(qgemm.linear(columns, packed, None), qgemm.linear(x, packed, None))


def test_take_and_assemble() -> None:
    quant = random_quant(12, 96, "q4_1")
    assert quant.take(slice(0, 4), slice(16, 48)) is None  # cuts a block
    half = quant.take(slice(None), slice(32, 96))
    assert torch.equal(half.dequantize(), quant.dequantize()[:, 32:])
    parts = [(4, quant.take(slice(4, 12))), (0, quant.take(slice(0, 4)))]
    whole = qgemm.assemble(parts, 14)  # rows 12-13: padding (a vocabulary slice's)
    assert torch.equal(whole.dequantize()[:12], quant.dequantize()) and not whole.q[12:].any()
    assert qgemm.assemble(parts + [(3, quant.take(slice(0, 2)))], 14) is None  # overlap
    loaded = quant.dequantize()
    assert qgemm.collect([], loaded, slice(None), slice(None), 0) is None  # came without integers
    loaded.block_quant = quant
    assert qgemm.collect(None, loaded, slice(None), slice(None), 0) is None  # an earlier shard had none


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_gguf_blocks_match_gguf_dequantize(tmp_path, kind: str) -> None:
    from engine.loader.gguf import _block_quant

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    w = np.random.default_rng(0).standard_normal((24, 128)).astype(np.float32)
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    data = gguf.quants.quantize(w, qtype)
    writer.add_tensor("w", data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = gguf.GGUFReader(str(path)).tensors[0]
    quant = _block_quant(tensor)
    expected = gguf.quants.dequantize(tensor.data, qtype).reshape(24, 128)
    assert quant.q.dtype is torch.int8 and quant.q.shape == (24, 128)
    assert torch.equal(quant.dequantize(), torch.from_numpy(expected))  # bit for bit


def _layers(llm) -> list:
    from engine.layers.linear import _Linear
    from engine.layers.vocab import VocabParallelEmbedding

    model = llm.engine.runner.model
    return [m for m in model.modules() if isinstance(m, (_Linear, VocabParallelEmbedding))]


@needs_amx
def test_default_model_runs_on_the_integers() -> None:
    from engine import LLM, SamplingParams

    llm = LLM("default", max_num_batched_tokens=64)
    layers = _layers(llm)
    assert layers and all(m.weight_amx is not None and m.weight_panels is None for m in layers)
    assert all(getattr(m, "weight_t", None) is None for m in layers)  # the tiles take every row count
    assert all(m.block_quant is None for m in layers)  # the integers are not kept twice
    plain = LLM("default", max_num_batched_tokens=64, weight_panels=False)  # MKL on the fp32 weights
    assert all(m.weight_amx is None and m.weight_panels is None and m.block_quant is None for m in _layers(plain))
    # metrics count the bytes a step reads as stored: bf16 integers + fp32 d and m a block (2.25 bytes
    # a weight), so MBU is not overstated by the fp32 size
    assert llm.engine.runner.cost.weight_bytes == 2.25 / 4 * plain.engine.runner.cost.weight_bytes
    # ... and a step of up to FEW_ROWS tokens reads the int8 blocks beside them: 1 byte + fp16 d and m a block
    from engine.layers import bqgemm

    assert llm.engine.runner.cost.small_step_tokens == (bqgemm.FEW_ROWS if bqgemm.supported() else 0)
    if bqgemm.supported():
        few = bqgemm.FEW_ROWS
        assert llm.engine.runner.cost.weight_bytes_for(few) == 1.125 / 4 * plain.engine.runner.cost.weight_bytes
        assert llm.engine.runner.cost.weight_bytes_for(few + 1) == llm.engine.runner.cost.weight_bytes
    prompts = [[1, 504, 3458, 314, 4649, 30], list(range(100, 190)), [7, 8, 9]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    for a, b in zip(llm.generate(prompts, params), plain.generate(prompts, params)):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            assert abs(la.logprob - lb.logprob) < 1e-3
            assert la.top.keys() == lb.top.keys()


@pytest.mark.parametrize("int8_blocks", [True, False])
def test_without_amx_int8_blocks_or_the_panels_take_over(monkeypatch, int8_blocks: bool) -> None:
    from engine import LLM
    from engine.layers import bqgemm

    if gemm._lib() is None:
        pytest.skip("the fp32 panel kernel (engine/layers/gemm.py) did not build on this CPU: no panels to take over")
    monkeypatch.setattr(qgemm, "supported", lambda: False)
    if not int8_blocks:
        monkeypatch.setattr(bqgemm, "supported", lambda: False)
    llm = LLM("default")
    layers = _layers(llm)
    assert len(layers) == 30 * 4 + 1  # each layer's qkv, o, gate_up, down, and the tied lm head
    assert all(m.weight_amx is None for m in layers)
    # the int8 blocks replace the panels (a quarter of their bytes) and take every step, so the linear layers
    # drop their fp32 copy (the tied head's is the embedding table); without AVX-512 the panels stay, and MKL
    # keeps the fp32 weights for single rows and prefill chunks
    assert all(m.weight_bq is not None and m.weight_panels is None for m in layers) == int8_blocks
    assert all(m.weight_panels is not None for m in layers) == (not int8_blocks)
    assert sum(getattr(m, "weight_t", 0) is None for m in layers) == (120 if int8_blocks else 0)


@needs_amx
def test_threads_calling_at_once_get_their_own_results() -> None:
    from concurrent.futures import ThreadPoolExecutor

    packed = qgemm.pack(random_quant(96, 576, "q4_1"))
    xs = [torch.randn(24 + 8 * i, 576, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = [qgemm.linear(x, packed, None) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            got = list(pool.map(lambda x: qgemm.linear(x, packed, None), xs))
            assert all(torch.equal(a, b) for a, b in zip(got, expected))


@needs_amx
def test_beside_the_tiles_steps_of_a_few_rows_take_int8_blocks() -> None:
    # a step of up to bqgemm.FEW_ROWS rows streams its weights once: int8 is half the tiles' bytes
    from engine import LLM
    from engine.layers import bqgemm

    if not bqgemm.supported():
        pytest.skip(str(bqgemm.unsupported()))
    llm = LLM("default")
    layers = [m for m in _layers(llm) if m.weight_amx is not None]
    assert len(layers) == 30 * 4 + 1
    assert all(m.weight_bq is not None and m.weight_bq.dm.dtype is torch.float16 for m in layers)
    gate_up = llm.engine.runner.model.model.layers[0].mlp.gate_up_proj
    for rows in (1, bqgemm.FEW_ROWS, bqgemm.FEW_ROWS + 1):
        x = torch.randn(rows, gate_up.weight_amx.bq.shape[1] * qgemm.BLOCK)
        kernel = bqgemm.linear(x, gate_up.weight_bq, None) if rows <= bqgemm.FEW_ROWS else qgemm.linear(
            x, gate_up.weight_amx, None)
        assert torch.equal(gate_up(x), kernel), rows
    assert f"int8 blocks on AVX-512 FMAs for steps of up to {bqgemm.FEW_ROWS} rows" in gemm.matmul_path(
        llm.engine.runner.model)
    assert llm.engine.runner.stack_path == ("the C decoder stack over AMX tiles "
                                            f"(int8 blocks for steps of up to {bqgemm.FEW_ROWS} tokens)")
