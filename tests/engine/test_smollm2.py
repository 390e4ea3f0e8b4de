"""The embedded default model: our greedy tokens equal transformers' on the same GGUF."""
from __future__ import annotations

import os

import pytest
import torch

from engine import LLM, SamplingParams
from engine.loader.gguf import default_model_path

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain in one sentence what a transformer is.",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("default", max_num_batched_tokens=32)  # chunks smaller than the chat prompts


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


def test_greedy_chat_equals_transformers(llm: LLM, hf_model) -> None:
    ids = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for prompt, out in zip(ids, outs):
        with torch.inference_mode():
            ref = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=2)
        assert out.token_ids == ref[0, len(prompt):].tolist()


def test_a_long_prompt_in_one_step_equals_transformers(hf_model) -> None:
    # a 300-token prompt in one prefill step: past 128 rows, the step's matmuls take the dequantized-panel path
    # where there are no AMX tiles (the tiles where there are), and the C decoder stack runs it either way
    llm = LLM("default", max_num_batched_tokens=512)
    text = " ".join(PROMPTS * 8)
    prompt = llm.apply_chat_template([{"role": "user", "content": f"Repeat after me: {text}"}])
    assert 129 <= len(prompt) <= 512
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    with torch.inference_mode():
        ref = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=2)
    assert out.token_ids == ref[0, len(prompt):].tolist()


def test_capital_of_france_is_paris(llm: LLM) -> None:
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"


def test_the_portable_path_equals_transformers_too(hf_model, monkeypatch) -> None:
    """PDSERVE_NO_AMX=1 takes the path of a CPU without AMX on any host (with AVX-512: int8 blocks and the C
    decoder stack over them; without: fp32 weights and the Python stack), so an AMX host tests the
    fallback too; it names why it took it."""
    from engine.layers import qgemm

    monkeypatch.setenv(qgemm.NO_AMX_ENV, "1")
    for fn in (qgemm._lib, qgemm.unsupported):
        fn.cache_clear()
    try:
        from engine.layers import bqgemm

        llm = LLM("default", max_num_batched_tokens=32)
        assert llm.engine.runner.native_unsupported == (
            None if bqgemm.supported() else f"{qgemm.NO_AMX_ENV} is set; {bqgemm.unsupported()}")
        # with AVX-512, every step multiplies every linear layer's integers (30 x 4 and the tied head)

        blocks = sum(getattr(m, "weight_bq", None) is not None for m in llm.engine.runner.model.modules())
        assert blocks == (121 if bqgemm.supported() else 0)
        cost = llm.engine.runner.cost  # what MBU counts: every step reads the int8 blocks, 1.125 bytes a weight
        assert cost.small_step_tokens == (bqgemm.ALL_ROWS if bqgemm.supported() else 0)
        if bqgemm.supported():
            assert cost.weight_bytes_for(4096) == cost.small_step_weight_bytes < 0.3 * cost.weight_bytes
            # and the linear layers keep no fp32 copy (the tied embedding keeps its table for the lookups)
            linears = [m for m in llm.engine.runner.model.modules() if hasattr(m, "weight_t")]
            assert len(linears) == 120 and all(m.weight_t is None for m in linears)
        from engine.layers.gemm import matmul_path

        path = matmul_path(llm.engine.runner.model)  # what the benchmark and `pdserve serve` print
        assert ("int8 blocks on AVX-512" in path and "PDSERVE_NO_AMX is set" in path) == bqgemm.supported()
        ids = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS[:2]]
        outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        for prompt, out in zip(ids, outs):
            with torch.inference_mode():
                ref = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                        dtype=torch.long), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                        pad_token_id=2)
            assert out.token_ids == ref[0, len(prompt):].tolist()
    finally:
        monkeypatch.delenv(qgemm.NO_AMX_ENV)
        for fn in (qgemm._lib, qgemm.unsupported):
            fn.cache_clear()
