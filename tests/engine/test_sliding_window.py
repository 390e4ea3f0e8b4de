"""A config with a sliding window (Mistral-7B-v0.1: sliding_window=4096 of 32768 positions). The engine has no
sliding-window attention, and full attention equals it only while no query is a window or more past a key, so a
model whose window is shorter than its positions runs with max_model_len capped to the window (a warning says
so), and a larger max_model_len is refused naming sliding_window: what vLLM does where it does not slide the
window (disable_sliding_window=True). Within the cap the tokens are transformers' with the window."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import ModelConfig
from tests.engine.tiny_models import make_tiny_checkpoint

WINDOW = 24
PROMPT = [random.Random(1).randrange(512) for _ in range(10)]


@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mistral with sliding_window=24 of its 1024 positions."""
    return make_tiny_checkpoint("mistral", tmp_path_factory.mktemp("swa") / "mistral", sliding_window=WINDOW)


@torch.inference_mode()
def hf_continuation(path: Path, new_tokens: int, **config) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager", **config)
    ids = torch.tensor([PROMPT])
    out = model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def test_a_window_caps_max_model_len_and_stays_exact(windowed: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="engine.config"):
        llm = LLM(str(windowed), num_kv_blocks=16)
    assert llm.engine.config.max_model_len == WINDOW
    assert f"max_model_len capped to the model's sliding_window={WINDOW}" in caplog.text
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(PROMPT) + len(out.token_ids) == WINDOW
    with_window = hf_continuation(windowed, 40)
    assert out.token_ids == with_window[:WINDOW - len(PROMPT)]
    # past the window transformers' tokens are not full attention's: running on there would have been wrong
    assert hf_continuation(windowed, 40, sliding_window=None) != with_window
    with pytest.raises(ValueError, match=f"prompt has {WINDOW} tokens; the model's context is {WINDOW}"):
        llm.generate(list(range(WINDOW)), SamplingParams(max_tokens=1))


def test_max_model_len_past_the_window_is_refused(windowed: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match=rf"max_model_len={WINDOW + 1} is past this model's sliding_window={WINDOW}"):
        LLM(str(windowed), max_model_len=WINDOW + 1)
    with caplog.at_level(logging.WARNING, logger="engine.config"):  # within the window: taken as given, quietly
        assert LLM(str(windowed), num_kv_blocks=4, max_model_len=16).engine.config.max_model_len == 16
    assert "sliding_window" not in caplog.text


HUB = dict(architectures=["MistralForCausalLM"], vocab_size=32000, hidden_size=4096, intermediate_size=14336,
           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768)


@pytest.mark.parametrize("config,window", [
    (dict(sliding_window=4096), 4096),  # Mistral-7B-v0.1
    (dict(sliding_window=None), None),  # Mistral-7B-v0.2 on, Mixtral
    (dict(), None),  # a Llama config has no key
    # Qwen2/Qwen3 carry a window that is off unless use_sliding_window, and then from layer max_window_layers up
    (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=False, sliding_window=4096), None),
    (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=4096, max_window_layers=32),
     None),
    (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=4096, max_window_layers=16),
     4096),
    (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=4096, num_hidden_layers=24),
     None),  # max_window_layers' default, 28, is past the 24 layers
    # transformers 5 writes the layers' kinds out
    (dict(sliding_window=4096, layer_types=["full_attention"] * 32), None),
    (dict(sliding_window=4096, layer_types=["full_attention", "sliding_attention"] * 16), 4096),
])
def test_which_configs_have_a_window(config: dict, window: int | None) -> None:
    assert ModelConfig.from_hf({**HUB, **config}).sliding_window == window


def test_a_bad_window_is_named() -> None:
    with pytest.raises(ValueError, match="sliding_window=-4 must be a positive integer or null"):
        ModelConfig.from_hf({**HUB, "sliding_window": -4})
