"""The decoder stack as one C call (engine/models/native_decoder.py) against the Python forward
it replaces: the same tokens and bit for bit the same logprobs, through mixed prefill/decode
steps, chunked prefill and preemption; and the Python forward wherever a part is not in C."""
from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

from engine import LLM, SamplingParams
from engine.layers import bqgemm, qgemm
from tests.engine.tiny_models import write_tiny_gguf

# the stack runs over AMX tiles, or over int8 blocks on AVX-512 without them (tests/engine/test_portable_c.py
# runs this file's checks again with PDSERVE_NO_AMX=1, so an AMX host tests both)
needs_c_stack = pytest.mark.skipif(not (qgemm.supported() or bqgemm.supported()),
                                   reason=f"{qgemm.unsupported()}; {bqgemm.unsupported()}")


def _run_both(path: str, prompts: list[list[int]], params: SamplingParams, **engine_config):
    llm = LLM(path, num_threads=2, **engine_config)
    runner = llm.engine.runner
    inner = runner.model.model
    assert runner.native_unsupported is None and inner.native is not None
    sched = llm.engine.scheduler
    native = llm.generate(prompts, params)
    preempted = sched.num_preemptions
    inner.native = None  # the same engine, weights and cache pool: the Python forward
    sched.block_manager.reset_prefix_cache()  # so it computes every token again, not the first run's KV
    python = llm.generate(prompts, params)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    return native, python, preempted


def _prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 17, 40, 100, 160][:n]
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


@needs_c_stack
@pytest.mark.parametrize("arch,bias,qtype", [
    ("llama", False, gguf.GGMLQuantizationType.Q8_0),  # no m term
    ("qwen2", True, gguf.GGMLQuantizationType.Q4_1),  # qkv bias, with m
])
def test_same_tokens_and_logprobs_as_the_python_forward(tmp_path: Path, arch: str, bias: bool, qtype) -> None:
    path = tmp_path / f"{arch}.gguf"
    write_tiny_gguf(path, arch, tied=True, bias=bias, quant=qtype)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=3)
    # chunks of 24 tokens: most steps mix decodes and prefill chunks; 16 blocks of 16 tokens for
    # 6 sequences of up to 200: preemption by recompute
    native, python, preempted = _run_both(str(path), _prompts(6, 300, 0), params, max_num_batched_tokens=24,
                                          num_kv_blocks=16, load_tokenizer=False)
    assert preempted > 0
    for a, b in zip(native, python):
        assert a.token_ids == b.token_ids
        assert a.logprobs == b.logprobs  # bit for bit: the same kernels in the same order
    assert len({tuple(o.token_ids) for o in native}) > 1  # the sequences are not all one answer


@needs_c_stack
def test_default_model_batch_matches_the_python_forward() -> None:
    prompts = _prompts(6, 49152, 1)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    native, python, _ = _run_both("default", prompts, params, max_num_batched_tokens=64)
    for a, b in zip(native, python):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs


@needs_c_stack
def test_the_python_forward_runs_where_a_part_is_not_in_c(tiny_checkpoints, tmp_path: Path) -> None:
    off = LLM("default", num_threads=2, native_decoder=False)
    assert off.engine.runner.native_unsupported == "native_decoder=False"
    assert off.engine.runner.model.model.native is None
    dense = LLM(str(tiny_checkpoints["llama"]), num_threads=2)  # fp32 safetensors: MKL and panels, not tiles
    assert dense.engine.runner.native_unsupported == ("a weight is not in AMX tiles" if qgemm.supported()
                                                      else "a weight is not in int8 blocks")
    path = tmp_path / "q.gguf"
    write_tiny_gguf(path, "llama", quant=gguf.GGMLQuantizationType.Q8_0)
    torch_attn = LLM(str(path), num_threads=2, attention_backend="torch", load_tokenizer=False)
    assert torch_attn.engine.runner.native_unsupported == "not the paged CPU attention"


@pytest.mark.parametrize("arch,why", [("mixtral", "MoE"), ("qwen3_moe", "MoE"), ("qwen3", "q/k norm")])
def test_the_model_reasons_need_no_amx(tiny_checkpoints, arch: str, why: str) -> None:
    # checked before the tile unit is asked for: the same answer on every host
    llm = LLM(str(tiny_checkpoints[arch]), num_threads=2, num_kv_blocks=16)
    assert llm.engine.runner.native_unsupported == why
    assert llm.engine.runner.model.model.native is None


def test_a_quantized_llama_runs_in_c_exactly_where_tiles_or_avx512_do(tmp_path: Path) -> None:
    # on tiles, or int8 blocks without them (no AMX, PDSERVE_NO_AMX); with neither (PDSERVE_PORTABLE_C,
    # no AVX-512) the engine gives both kernels' own reasons, not "a C kernel did not build"
    path = tmp_path / "q.gguf"
    write_tiny_gguf(path, "llama", quant=gguf.GGMLQuantizationType.Q8_0)
    llm = LLM(str(path), num_threads=2, num_kv_blocks=16, load_tokenizer=False)
    runs = qgemm.supported() or bqgemm.supported()
    assert llm.engine.runner.native_unsupported == (None if runs else f"{qgemm.unsupported()}; {bqgemm.unsupported()}")
    if runs:
        native = llm.engine.runner.model.model.native
        assert native.tiles == qgemm.supported()
        assert native.int8 == bqgemm.supported()
        assert llm.engine.runner.stack_path == (  # what the bench and `pdserve serve` print
            "the C decoder stack over " + ("AMX tiles" if native.tiles else "int8 blocks") +
            (f" (int8 blocks for steps of up to {bqgemm.FEW_ROWS} tokens)" if native.tiles and native.int8 else ""))
    else:
        assert llm.engine.runner.stack_path == f"the Python forward ({llm.engine.runner.native_unsupported})"
    off = LLM(str(path), num_threads=2, num_kv_blocks=16, load_tokenizer=False, native_decoder=False)
    assert off.engine.runner.native_unsupported == "native_decoder=False"


@needs_c_stack
def test_prefill_steps_run_in_c_too_on_either_path(tmp_path: Path, monkeypatch) -> None:
    from engine.models.native_decoder import NativeDecoder

    path = tmp_path / "q.gguf"
    write_tiny_gguf(path, "llama", quant=gguf.GGMLQuantizationType.Q4_1)
    seen: list[int] = []
    call = NativeDecoder.__call__
    monkeypatch.setattr(NativeDecoder, "__call__", lambda self, x, *a: seen.append(x.shape[0]) or call(self, x, *a))
    prompts = [list(range(1, 201)), list(range(3, 40))]  # a 200-token prefill step, then decodes
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    native, python, _ = _run_both(str(path), prompts, params, max_num_batched_tokens=256, load_tokenizer=False)
    # tiles, or int8 blocks alone: every step in C, the 200-token one over the dequantized-panel path there
    assert max(seen) >= bqgemm.PANEL_MIN
    for a, b in zip(native, python):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
