"""Guards the tiny-checkpoint fixtures themselves (shapes, reload, non-degenerate outputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.engine.tiny_models import ARCHS, hf_greedy, hf_logprobs, make_tiny_checkpoint

torch.set_num_threads(2)

PROMPTS = [[1, 2, 3, 4], [100, 7, 300, 9, 11, 250, 42]]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {a: make_tiny_checkpoint(a, root / a) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_files(ckpts: dict[str, Path], arch: str) -> None:
    path = ckpts[arch]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == arch
    assert (cfg["hidden_size"], cfg["head_dim"], cfg["num_hidden_layers"]) == (64, 16, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (4, 2, 512)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
        assert tuple(f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape()) == (32, 64)
    assert "lm_head.weight" in keys
    assert sum(k.startswith("model.layers.1.") for k in keys) > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_non_degenerate(ckpts: dict[str, Path], arch: str) -> None:
    outs = hf_greedy(ckpts[arch], PROMPTS, 16)
    assert all(len(o) == 16 for o in outs)
    assert all(len(set(o)) >= 3 for o in outs), outs
    assert outs[0] != outs[1]
    assert hf_greedy(ckpts[arch], PROMPTS[:1], 16) == outs[:1]  # deterministic + cached model
    lp = hf_logprobs(ckpts[arch], PROMPTS[1], outs[1])
    assert lp.shape == (16,) and lp.dtype == torch.float32
    assert torch.all(lp < 0) and torch.all(lp > -20)
    # teacher-forced logprobs agree with prefix-extended ones; greedy token beats an alternative
    for i in (0, 5, 15):
        one = hf_logprobs(ckpts[arch], PROMPTS[1] + outs[1][:i], [outs[1][i]])
        torch.testing.assert_close(one, lp[i : i + 1], atol=1e-4, rtol=1e-4)
        alt = hf_logprobs(ckpts[arch], PROMPTS[1] + outs[1][:i], [(outs[1][i] + 1) % 512])
        assert alt[0] < lp[i]


def test_hub_style_config_and_tied(tmp_path: Path) -> None:
    a = make_tiny_checkpoint("llama", tmp_path / "a", seed=3)
    b = make_tiny_checkpoint("llama", tmp_path / "b", seed=3, hub_style_config=True)
    cfg = json.loads((b / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_theta"] == 10000.0
    assert hf_greedy(a, PROMPTS, 8) == hf_greedy(b, PROMPTS, 8)
    m = make_tiny_checkpoint("qwen3_moe", tmp_path / "m", hub_style_config=True)
    assert json.loads((m / "config.json").read_text())["num_experts"] == 4
    assert len(set(hf_greedy(m, PROMPTS[:1], 16)[0])) >= 3
    t = make_tiny_checkpoint("qwen3", tmp_path / "t", tie_word_embeddings=True)
    with safe_open(str(t / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    assert len(set(hf_greedy(t, PROMPTS[:1], 16)[0])) >= 3


def test_step_cost_counts_the_flat_batch(tiny_checkpoints) -> None:
    """Metrics' FLOPs and bytes per step follow the model's shape and the step's batch."""
    from engine import LLMEngine, SamplingParams

    engine = LLMEngine.from_model(str(tiny_checkpoints["llama"]), num_kv_blocks=32)
    engine.add_request([1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=2))
    engine.step()  # prefill of 4 tokens, one sampled row
    tokens, flops, bytes_read = engine.runner.step_cost
    c = engine.runner.cost
    assert tokens == 4
    assert flops == 4 * c.matmul_flops_per_token + c.lm_head_flops + c.attention_flops_per_context * (1 + 2 + 3 + 4)
    assert bytes_read == c.weight_bytes + 4 * c.kv_bytes_per_token
    engine.step()  # one decode token over a context of 5
    assert engine.runner.step_cost[0] == 1 and engine.runner.step_cost[2] == c.weight_bytes + 5 * c.kv_bytes_per_token


@pytest.mark.parametrize("arch", ARCHS)
def test_model_cost_is_the_checkpoints_parameter_count(tiny_checkpoints, arch: str) -> None:
    """ModelCost's formulas against what transformers builds from the same checkpoint, counted
    tensor by tensor: 2 FLOPs a multiplied weight (an expert's weights a token's top-k share of them),
    4 bytes a stored weight, K and V of every layer a token (from the engine's cache shape)."""
    from engine import LLMEngine
    from tests.engine.tiny_models import _load

    hf = _load(tiny_checkpoints[arch])
    cfg = hf.config
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    share = cfg.num_experts_per_tok / experts if experts else 1.0
    matrices = {n: p for n, p in hf.named_parameters() if p.dim() >= 2}  # norms and biases are not counted
    multiplied = sum(p.numel() * (share if ".experts." in n else 1.0) for n, p in matrices.items()
                     if ".layers." in n)
    engine = LLMEngine.from_model(str(tiny_checkpoints[arch]), num_kv_blocks=8, weight_panels=False)
    c = engine.runner.cost
    assert c.matmul_flops_per_token == pytest.approx(2 * multiplied)
    assert c.lm_head_flops == 2 * hf.lm_head.weight.numel()
    assert c.weight_bytes == 4 * sum(p.numel() for p in matrices.values())  # named_parameters counts a tied one once
    cache = engine.runner.kv_cache
    assert c.kv_bytes_per_token == cache.numel() * cache.element_size() / (8 * engine.runner.block_size)
    assert c.attention_flops_per_context == 4 * cfg.num_hidden_layers * hf.model.layers[0].self_attn.q_proj.out_features
