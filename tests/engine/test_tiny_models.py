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
