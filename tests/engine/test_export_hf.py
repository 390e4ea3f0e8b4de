"""benchmarks.export_hf: the default model written as a Hugging Face folder (what `vllm serve` is given in the
side-by-side benchmark) holds the very weights, config and tokenizer pdserve's engine reads from the GGUF."""
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
