"""On a machine with two or more GPUs: tensor parallelism and the `collective` KV backend over
NCCL (the same code as gloo on CPU). One GPU cannot host two NCCL ranks, so on a single-GPU
machine these skip. Run: pytest -m gpu tests/gpu"""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from replica.ranks import start_followers
from tests.kv_transfer.test_shm_transfer import prompts_of

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices for two NCCL ranks")]


def test_tensor_parallel_over_nccl_equals_one_rank(ray_local, tiny_checkpoints) -> None:
    model = str(tiny_checkpoints["llama"])
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    prompts = prompts_of([3, 40, 130])
    with LLM(model, num_kv_blocks=64, device="cuda", attention_backend="torch") as llm:
        want = [o.token_ids for o in llm.generate(prompts, params)]
    with LLM(model, num_kv_blocks=64, device="cuda", attention_backend="torch", tensor_parallel_size=2,
             rank_launcher=start_followers) as llm:
        assert [o.token_ids for o in llm.generate(prompts, params)] == want
