"""The key test: our greedy tokens equal transformers' token for token, for every arch, with a
batch that mixes prompt lengths, under the default, chunked-prefill and preemption configs;
fp32 logprobs agree with transformers' to 1e-3."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.tiny_models import ARCHS, hf_greedy, hf_logprobs, make_tiny_checkpoint

LENGTHS = (1, 2, 7, 16, 17, 40, 129, 300)
NUM_NEW = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    # chunks smaller than the long prompts, decodes sharing the budget with them
    "chunked": {"max_num_batched_tokens": 64, "max_prefill_chunk": 32},
    # chunk and block boundaries out of step: chunks of 13 (or what the budget leaves) over blocks of 8
    "chunked_unaligned": {"max_num_batched_tokens": 37, "max_prefill_chunk": 13, "block_size": 8, "num_kv_blocks": 512},
    # just enough blocks for the longest request (300 + 32 tokens: 21 blocks of 16); the short
    # ones fill the pool as they decode and the newest is preempted
    "preempt": {"num_kv_blocks": 21},
    # preemption while chunked prefills are in flight
    "preempt_chunked": {"num_kv_blocks": 24, "max_num_batched_tokens": 64, "max_prefill_chunk": 32},
    # the shortest prompt first (another batch composition each step), preempting
    "preempt_chunked_spf": {"num_kv_blocks": 24, "max_num_batched_tokens": 64, "max_prefill_chunk": 32,
                            "scheduling_policy": "spf"},
}

PROMPTS = [[random.Random(n).randrange(512) for _ in range(n)] for n in LENGTHS]

_reference: dict[Path, list[list[int]]] = {}


def reference(path: Path) -> list[list[int]]:
    if path not in _reference:
        _reference[path] = hf_greedy(path, PROMPTS, NUM_NEW)
    return _reference[path]


def assert_same_tokens(outs, ref: list[list[int]]) -> None:
    for prompt, out, want in zip(PROMPTS, outs, ref):
        assert out.prompt_token_ids == prompt
        assert out.token_ids == want, f"prompt of {len(prompt)} tokens diverges"
        assert out.finish_reason == "length"


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(tiny_checkpoints: dict[str, Path], arch: str, config: str) -> None:
    path = tiny_checkpoints[arch]
    ref = reference(path)
    assert len({tuple(r) for r in ref}) == len(ref)  # distinct continuations: a mix-up would show
    engine = LLMEngine.from_model(str(path), **CONFIGS[config])
    free_at_start = engine.block_manager.num_free_blocks
    seqs = [engine.add_request(p, GREEDY) for p in PROMPTS]
    outs: dict[str, Any] = {}
    preempted_with_output = set()
    max_batch = 0
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id] = out
        max_batch = max(max_batch, len(engine.scheduler.running))
        # a sequence sent back to waiting after it generated: its recompute covers its own tokens
        preempted_with_output |= {s.request_id for s in engine.scheduler.waiting if s.num_output_tokens}
    assert_same_tokens([outs[s.request_id] for s in seqs], ref)
    assert engine.block_manager.num_free_blocks == free_at_start
    assert max_batch > 1  # the prompts really ran as one batch
    num_preemptions = sum(o.num_preemptions for o in outs.values())
    if config.startswith("preempt"):
        assert num_preemptions > 0
    if config == "preempt":  # the victims had generated tokens: recompute must replay them
        assert preempted_with_output
    elif config == "default":
        assert num_preemptions == 0 and max_batch == len(PROMPTS)


@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_match_transformers(tiny_checkpoints: dict[str, Path], arch: str) -> None:
    path = tiny_checkpoints[arch]
    llm = LLM(str(path), num_kv_blocks=128, max_num_batched_tokens=64)
    prompts = [PROMPTS[2], PROMPTS[5], PROMPTS[6]]
    params = [SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=5),
              SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=0),
              # a sampled continuation: logprobs of tokens off the greedy path
              SamplingParams(temperature=1.0, seed=3, max_tokens=NUM_NEW, ignore_eos=True, logprobs=2)]
    outs = llm.generate(prompts, params)
    for prompt, out, p in zip(prompts, outs, params):
        assert out.logprobs is not None and len(out.logprobs) == NUM_NEW
        assert [lp.token_id for lp in out.logprobs] == out.token_ids
        ours = torch.tensor([lp.logprob for lp in out.logprobs])
        want = hf_logprobs(path, prompt, out.token_ids)
        torch.testing.assert_close(ours, want, atol=1e-3, rtol=0)
        for lp in out.logprobs:
            assert len(lp.top) == p.logprobs
            vals = list(lp.top.values())
            assert vals == sorted(vals, reverse=True)
            if p.greedy and lp.top:  # the greedy token is the most likely one
                assert next(iter(lp.top)) == lp.token_id and vals[0] == pytest.approx(lp.logprob)
    assert outs[2].token_ids != reference(path)[6]  # the sampled one really left the greedy path


@pytest.fixture(scope="module")
def variant_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {
        "qwen3_tied": make_tiny_checkpoint("qwen3", root / "qwen3_tied", seed=1, tie_word_embeddings=True),
        "llama_hub": make_tiny_checkpoint("llama", root / "llama_hub", seed=2, hub_style_config=True),
        "qwen3_moe_hub": make_tiny_checkpoint("qwen3_moe", root / "qwen3_moe_hub", seed=3, hub_style_config=True),
    }


@pytest.mark.parametrize("variant", ["qwen3_tied", "llama_hub", "qwen3_moe_hub"])
def test_checkpoint_variants_match_transformers(variant_checkpoints: dict[str, Path], variant: str) -> None:
    path = variant_checkpoints[variant]
    ref = reference(path)
    for config in ("default", "chunked"):
        outs = LLM(str(path), **{"num_kv_blocks": 256, **CONFIGS[config]}).generate(PROMPTS, GREEDY)
        assert_same_tokens(outs, ref)
