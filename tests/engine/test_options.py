"""EngineOptions, the one list of engine options: filled from keyword arguments by name, checked where it
is made, importable without torch, and resolved against the model by EngineConfig."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import LLM, LLMEngine
from engine.options import EngineOptions


def test_options_import_without_torch() -> None:
    code = ("import sys, engine.options, pdserve.config; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=Path(__file__).parents[2])


def test_an_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown engine option max_batch_size; valid: .*max_num_batched_tokens"):
        EngineOptions.from_kwargs(max_batch_size=8)
    # before any file is opened: the model path need not exist
    with pytest.raises(ValueError, match=r"unknown engine options kv_blocks, tp; valid: attention_backend, "):
        LLM("no/such/model", tp=2, kv_blocks=8)
    with pytest.raises(ValueError, match=r"unknown engine option gpu_memory_utilization"):
        LLMEngine.from_model("no/such/model", gpu_memory_utilization=0.9)


@pytest.mark.parametrize("options,message", [
    (dict(block_size=24), "block_size=24 must be a power of two"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens=0 must be at least 1"),
    (dict(num_kv_blocks=0), "num_kv_blocks=0 must be at least 1 or None"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size=0 must be at least 1"),
    (dict(dtype="int8"), "dtype 'int8' is not supported; use one of"),
    (dict(device="tpu"), "device='tpu'; choose 'cpu' or 'cuda'"),
    (dict(max_model_len=-1), "max_model_len=-1 must be >= 0"),
])
def test_a_bad_option_says_what_to_change(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        EngineOptions(**options)


def test_the_engine_runs_on_the_options_it_was_given(tiny_checkpoints) -> None:
    llm = LLM(str(tiny_checkpoints["llama"]), torch.float32, num_kv_blocks=8, block_size=8, max_num_seqs=3,
              max_model_len=64, load_tokenizer=False)
    config = llm.engine.config
    assert config.options == EngineOptions(dtype="float32", num_kv_blocks=8, block_size=8, max_num_seqs=3,
                                           max_model_len=64)
    assert (config.dtype, config.max_model_len) == (torch.float32, 64)  # resolved for torch and the model
    assert (llm.engine.block_manager.num_blocks, llm.engine.block_manager.block_size) == (8, 8)
    assert llm.engine.scheduler.config.max_num_seqs == 3
