"""The decoder stack as one C call (engine/models/native_decoder.py) against the Python forward
it replaces: the same tokens and bit for bit the same logprobs, through mixed prefill/decode
steps, chunked prefill and preemption; and the Python forward wherever a part is not in C."""
from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

from engine import LLM, SamplingParams
from engine.layers import qgemm
from tests.engine.tiny_models import write_tiny_gguf

needs_amx = pytest.mark.skipif(qgemm._lib() is None, reason="no AMX tile unit (or no C compiler) here")


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


@needs_amx
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


@needs_amx
def test_default_model_batch_matches_the_python_forward() -> None:
    prompts = _prompts(6, 49152, 1)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    native, python, _ = _run_both("default", prompts, params, max_num_batched_tokens=64)
    for a, b in zip(native, python):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs


@needs_amx
def test_the_python_forward_runs_where_a_part_is_not_in_c(tiny_checkpoints, tmp_path: Path) -> None:
    off = LLM("default", num_threads=2, native_decoder=False)
    assert off.engine.runner.native_unsupported == "native_decoder=False"
    assert off.engine.runner.model.model.native is None
    dense = LLM(str(tiny_checkpoints["llama"]), num_threads=2)  # fp32 safetensors: MKL and panels, not tiles
    assert dense.engine.runner.native_unsupported == "a weight is not in AMX tiles"
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


def test_a_quantized_llama_runs_in_c_exactly_where_the_tile_unit_does(tmp_path: Path) -> None:
    # on an AMX host both are None; elsewhere the engine gives the tile unit's own reason (no AMX,
    # PDSERVE_NO_AMX, PDSERVE_PORTABLE_C), not "a C kernel did not build"
    path = tmp_path / "q.gguf"
    write_tiny_gguf(path, "llama", quant=gguf.GGMLQuantizationType.Q8_0)
    llm = LLM(str(path), num_threads=2, num_kv_blocks=16, load_tokenizer=False)
    assert llm.engine.runner.native_unsupported == qgemm.unsupported()
    off = LLM(str(path), num_threads=2, num_kv_blocks=16, load_tokenizer=False, native_decoder=False)
    assert off.engine.runner.native_unsupported == "native_decoder=False"
