"""Hugging Face folder: config.json, *.safetensors, tokenizer files."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch


def read_hf_folder(path: str | Path) -> tuple[dict, Iterator[tuple[str, torch.Tensor]]]:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json; is it a Hugging Face model folder?")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors weight files")
    handles = [_open(f) for f in files]  # opens (and so checks the header of) every file up front
    return hf_config, _tensors(handles)


def _open(file: Path):
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return file, handle


def _tensors(handles) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError

    for file, handle in handles:
        for name in handle.keys():
            try:
                yield name, handle.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ValueError(f"{file}: tensor {name!r} cannot be read (truncated file?): {e}") from None


def load_hf_tokenizer(path: str | Path):
    """The folder's tokenizer, or None when it has none (then prompts must be token ids)."""
    path = Path(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
