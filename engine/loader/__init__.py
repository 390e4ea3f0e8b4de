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


def open_model(model: str | None, load_tokenizer: bool = True) -> ModelSource:
    from engine.loader.gguf import load_gguf_tokenizer, read_gguf
    from engine.loader.hf import load_hf_tokenizer, read_hf_folder

    path = default_model_path_or(model)
    p = Path(path)
    if p.is_dir():
        hf_config, weights = read_hf_folder(p)
        return ModelSource(path, hf_config, weights, load_hf_tokenizer(p) if load_tokenizer else None)
    if p.suffix == ".gguf" or p.is_file():
        hf_config, weights = read_gguf(path)
        return ModelSource(path, hf_config, weights, load_gguf_tokenizer(path) if load_tokenizer else None)
    raise ValueError(f"model {model!r} not found: give a Hugging Face folder, a .gguf file, or 'default'")


def tokenizer_files(model: str | None) -> dict[str, str] | None:
    """The model's tokenizer as the text of its Hugging Face files (tokenizer.json,
    tokenizer_config.json, chat_template.jinja), for a process that tokenizes without
    transformers or torch (the router). None when the model has no tokenizer. Building it from a
    GGUF takes seconds, so the files are cached on disk per model file."""
    import hashlib
    import os
    import shutil

    path = Path(default_model_path_or(model)).resolve()
    st = path.stat()
    key = hashlib.sha1(f"{path}:{st.st_mtime_ns}:{st.st_size}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve")) / "tokenizers" / key
    if not (cache / "tokenizer.json").exists():
        tokenizer = open_model(str(path)).tokenizer
        if tokenizer is None:
            return None
        tmp = cache.with_name(f"{key}.tmp{os.getpid()}")
        tokenizer.save_pretrained(tmp)
        if not (tmp / "tokenizer.json").exists():
            raise ValueError(f"{path}: its tokenizer has no fast (tokenizer.json) form; the router needs one")
        try:
            tmp.rename(cache)
        except OSError:  # another process cached it first
            shutil.rmtree(tmp)
    return {f.name: f.read_text() for f in cache.iterdir() if f.suffix in (".json", ".jinja")}


def default_model_path_or(model: str | None) -> str:
    from engine.loader.gguf import default_model_path

    return default_model_path() if model in (None, "default") else str(model)
