"""Where a model comes from: "default", a Hugging Face folder, or a GGUF file."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class ModelSource:
    path: str  # resolved file or folder
    hf_config: dict[str, Any]  # config.json form
    weights: Iterator[tuple[str, torch.Tensor]]  # (Hugging Face name, tensor), read lazily
    tokenizer: Any | None  # a transformers tokenizer, or None (then prompts must be token ids)


def open_model(model: str | None) -> ModelSource:
    from engine.loader.gguf import default_model_path, load_gguf_tokenizer, read_gguf
    from engine.loader.hf import load_hf_tokenizer, read_hf_folder

    path = default_model_path() if model in (None, "default") else str(model)
    p = Path(path)
    if p.is_dir():
        hf_config, weights = read_hf_folder(p)
        return ModelSource(path, hf_config, weights, load_hf_tokenizer(p))
    if p.suffix == ".gguf" or p.is_file():
        hf_config, weights = read_gguf(path)
        return ModelSource(path, hf_config, weights, load_gguf_tokenizer(path))
    raise ValueError(f"model {model!r} not found: give a Hugging Face folder, a .gguf file, or 'default'")
