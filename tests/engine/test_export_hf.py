"""benchmarks.export_hf: the default model written as a Hugging Face folder (what `vllm serve` and vLLM's offline
engine are given in the side-by-side benchmarks) holds the very weights, config and tokenizer pdserve's engine reads
from the GGUF; and the engine benchmark's vLLM runner names what it lacks."""
from __future__ import annotations

import torch

from benchmarks.export_hf import export_hf
from engine.loader import open_model


def test_the_exported_folder_is_the_same_model(tmp_path) -> None:
    folder = export_hf("default", tmp_path / "hf")
    gguf, hf = open_model("default"), open_model(str(folder))
    assert hf.hf_config == gguf.hf_config
    ours = dict(gguf.weights)
    theirs = dict(hf.weights)
    assert set(theirs) == set(ours) - {"lm_head.weight"}  # tied to the embedding, as config.json says
    for name, w in theirs.items():
        assert torch.equal(w, ours[name]), name
    text = "What is the capital of France?"
    assert hf.tokenizer.encode(text) == gguf.tokenizer.encode(text)
    chat = [{"role": "user", "content": text}]
    assert hf.tokenizer.apply_chat_template(chat, tokenize=False) == gguf.tokenizer.apply_chat_template(
        chat, tokenize=False)


def test_the_vllm_runner_names_what_is_missing(tmp_path) -> None:
    """benchmarks.engine --vllm: a wrong interpreter or folder is named before anything runs, and a child whose
    interpreter has no vLLM says so through the runner's pipes (the same protocol a real vLLM child answers on)."""
    import sys

    import pytest

    from benchmarks.engine_runners import RemoteVLLM

    with pytest.raises(SystemExit, match="not an interpreter"):
        RemoteVLLM(str(tmp_path / "nope" / "python"), str(tmp_path))
    with pytest.raises(SystemExit, match="no Hugging Face folder"):
        RemoteVLLM(sys.executable, str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    runner = RemoteVLLM(sys.executable, str(tmp_path))  # this venv's interpreter: no vllm in it
    with pytest.raises(RuntimeError, match="No module named 'vllm'"):
        runner.wait_loaded()
    assert runner.proc.wait(timeout=30) == 0
