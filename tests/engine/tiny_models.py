"""Tiny random HF checkpoints + transformers reference outputs for engine tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    head_dim=16,
    num_hidden_layers=2,
    intermediate_size=128,
    vocab_size=512,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    initializer_range=0.2,  # ~10x default: diverse, non-degenerate greedy outputs
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

_ARCH_KW: dict[str, dict[str, Any]] = {
    "llama": dict(
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=256,
        ),
        attention_bias=False,
        mlp_bias=False,
    ),
    # Mistral is Llama's layer without Llama-3 rope scaling; sliding_window=None here (Mistral-7B-v0.1's 4096 is
    # tested on its own: tests/engine/test_sliding_window.py)
    "mistral": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0), sliding_window=None),
    "qwen2": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0), use_sliding_window=False),
    "qwen3": dict(
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        attention_bias=False,
        use_sliding_window=False,
    ),
    "mixtral": dict(
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=None,
    ),
    "qwen3_moe": dict(
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        attention_bias=False,
        use_sliding_window=False,
    ),
}

_MODELS: dict[str, Any] = {}


def _config(arch: str, **kw: Any) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(arch, **kw)


def make_tiny_checkpoint(
    arch: str,
    path: str | Path,
    *,
    seed: int = 0,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = False,
    hub_style_config: bool = False,
    **overrides: Any,
) -> Path:
    """Save a tiny random float32 HF checkpoint (config.json + model.safetensors) to `path`.

    hub_style_config rewrites config.json the way most Hub checkpoints look (transformers 4
    style: top-level rope_theta + rope_scaling, qwen3_moe `num_experts`, `torch_dtype`);
    transformers 5 loads it to the same model."""
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}")
    kw = {**_COMMON, **_ARCH_KW[arch]}
    kw.update(
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        tie_word_embeddings=tie_word_embeddings,
        **overrides,
    )
    cfg = _config(arch, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomize so bugs there show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.2)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if hub_style_config:
        _to_hub_style(path / "config.json")
    for key in [k for k in _MODELS if k[0] == str(path.resolve())]:
        del _MODELS[key]
    return path


def _to_hub_style(cfg_path: Path) -> None:
    cfg = json.loads(cfg_path.read_text())
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    if cfg["model_type"] == "qwen3_moe":
        cfg["num_experts"] = cfg.pop("num_local_experts")
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _load(path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager") -> Any:
    """transformers' model of the checkpoint in `dtype` (cached). In bf16/fp16 pass attn_implementation="sdpa":
    the engine's torch attention is the same torch SDPA call, where "eager" rounds the scores to the dtype."""
    from transformers import AutoModelForCausalLM

    key = (str(Path(path).resolve()), dtype, attn_implementation)
    if key not in _MODELS:
        model = AutoModelForCausalLM.from_pretrained(
            key[0], dtype=dtype, attn_implementation=attn_implementation, experts_implementation="eager"
        )
        _MODELS[key] = model.eval()
    return _MODELS[key]


@torch.inference_mode()
def hf_greedy(path: str | Path, prompts: list[list[int]], max_new_tokens: int, dtype: torch.dtype = torch.float32,
              attn_implementation: str = "eager") -> list[list[int]]:
    """Greedy continuation of each prompt (one at a time, no eos stop); new tokens only."""
    model = _load(path, dtype, attn_implementation)
    outs: list[list[int]] = []
    for prompt in prompts:
        ids = torch.tensor([prompt], dtype=torch.long)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            use_cache=True,
        )
        outs.append(out[0, len(prompt):].tolist())
    return outs


@torch.inference_mode()
def hf_logits(path: str | Path, prompt: list[int], continuation: list[int], dtype: torch.dtype = torch.float32,
              attn_implementation: str = "eager") -> torch.Tensor:
    """The logits (as float32) from which each continuation token is picked, from one forward over prompt +
    continuation (teacher-forced): shape [len(continuation), vocab]."""
    model = _load(path, dtype, attn_implementation)
    ids = torch.tensor([prompt + continuation], dtype=torch.long)
    n = len(prompt)
    return model(ids, use_cache=False).logits[0, n - 1 : n - 1 + len(continuation)].float()


def hf_logprobs(path: str | Path, prompt: list[int], continuation: list[int], dtype: torch.dtype = torch.float32,
                attn_implementation: str = "eager") -> torch.Tensor:
    """Log-probs (float32) the model assigns to each continuation token: shape [len(continuation)]."""
    lp = torch.log_softmax(hf_logits(path, prompt, continuation, dtype, attn_implementation), dim=-1)
    return lp.gather(-1, torch.tensor(continuation, dtype=torch.long)[:, None])[:, 0]


def write_tiny_gguf(path: Path, arch: str, *, tied: bool = False, bias: bool = False, qk_norm: bool = False,
                    head_dim: int = 16, quant: Any = None, rope_scaling: bool = False) -> None:
    """A tiny random GGUF (2 layers, hidden 64, 4 heads, 2 kv heads, vocab 300) in llama.cpp's
    layout: F32 tensors, or its matrices block-quantized as `quant` (a gguf.GGMLQuantizationType);
    rope_scaling: linear, factor 2."""
    import gguf
    import numpy as np

    hidden, inter, heads, kv, vocab = 64, 128, 4, 2, 300
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2); w.add_context_length(512); w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter); w.add_head_count(heads); w.add_head_count_kv(kv)
    w.add_key_length(head_dim); w.add_value_length(head_dim); w.add_vocab_size(vocab)
    w.add_layer_norm_rms_eps(1e-6); w.add_rope_freq_base(1e6)
    if rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR); w.add_rope_scaling_factor(2.0)
    w.add_tokenizer_model("gpt2"); w.add_token_list([f"t{i}" for i in range(vocab)])
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        shapes["output.weight"] = (vocab, hidden)
    q, k = heads * head_dim, kv * head_dim
    for i in range(2):
        shapes.update({f"blk.{i}.{n}": s for n, s in [
            ("attn_norm.weight", (hidden,)), ("ffn_norm.weight", (hidden,)), ("attn_q.weight", (q, hidden)),
            ("attn_k.weight", (k, hidden)), ("attn_v.weight", (k, hidden)), ("attn_output.weight", (hidden, q)),
            ("ffn_gate.weight", (inter, hidden)), ("ffn_up.weight", (inter, hidden)),
            ("ffn_down.weight", (hidden, inter))]})
        if bias:
            shapes.update({f"blk.{i}.attn_q.bias": (q,), f"blk.{i}.attn_k.bias": (k,), f"blk.{i}.attn_v.bias": (k,)})
        if qk_norm:
            shapes.update({f"blk.{i}.attn_q_norm.weight": (head_dim,), f"blk.{i}.attn_k_norm.weight": (head_dim,)})
    for name, shape in shapes.items():
        data = rng.standard_normal(shape).astype(np.float32)
        if quant is not None and len(shape) == 2:
            w.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
