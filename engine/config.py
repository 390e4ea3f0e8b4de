"""Frozen configuration: the model's architecture (ModelConfig), and one engine's model and options resolved
against each other (EngineConfig). The options themselves are declared once, in engine/options.py."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.options import DTYPES, EngineOptions

logger = logging.getLogger(__name__)


def dtype_name(dtype: str | torch.dtype) -> str:
    """A dtype as EngineOptions spells it: torch.bfloat16 -> "bfloat16"; a string stays as given."""
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    name = dtype_name(dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}")
    return getattr(torch, DTYPES[name])


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, read from a Hugging Face config.json (or a GGUF's metadata)."""
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before rotary
    num_experts: int = 0  # 0 means a dense MLP
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalize the top-k routing weights to sum to 1
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # the attention window of the model's sliding-window layers (Mistral-7B-v0.1: 4096); None: every layer attends
    # to the whole context. The engine has no sliding-window attention: EngineConfig caps max_model_len to it
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                             f"[1, num_experts={self.num_experts}]")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope_scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
        rope_theta = hf.get("rope_theta") or (rope_scaling or {}).get("rope_theta", 10000.0)
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        num_experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", arch == "Qwen2ForCausalLM")),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            num_experts=num_experts,
            num_experts_per_tok=hf.get("num_experts_per_tok", 0) if num_experts else 0,
            moe_intermediate_size=hf.get("moe_intermediate_size") or hf["intermediate_size"],
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=_sliding_window(hf),
        )


def _sliding_window(hf: dict[str, Any]) -> int | None:
    """The window of the layers that attend to only the last `sliding_window` tokens, read as transformers reads
    it: `layer_types` where the config lists them; else Qwen2/Qwen3 have windows only with use_sliding_window,
    on layers max_window_layers and up; Mistral and Mixtral wherever sliding_window is set."""
    window = hf.get("sliding_window")
    if not window:
        return None
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"config.json: sliding_window={window!r} must be a positive integer or null")
    if hf.get("layer_types") is not None:
        return window if "sliding_attention" in hf["layer_types"] else None
    if "use_sliding_window" in hf:  # (28: transformers' default max_window_layers)
        windowed = hf["use_sliding_window"] and hf.get("max_window_layers", 28) < hf["num_hidden_layers"]
        return window if windowed else None
    return window


def check_parallel(options: EngineOptions, cfg: ModelConfig) -> None:
    """Raise, naming the valid degrees, when the model cannot be cut options.tensor_parallel_size ways."""
    from engine.distributed import valid_tp_degrees

    n = options.tensor_parallel_size
    width = cfg.moe_intermediate_size if cfg.num_experts else cfg.intermediate_size
    valid = valid_tp_degrees(cfg.num_attention_heads, cfg.num_key_value_heads, width)
    if options.expert_parallel:
        if not cfg.num_experts:
            raise ValueError("expert_parallel needs an MoE model; this one is dense")
        valid = valid_tp_degrees(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_experts)
    if n not in valid:
        split = f"{cfg.num_experts} experts" if options.expert_parallel else f"MLP width {width}"
        raise ValueError(
            f"tensor_parallel_size={n} does not fit this model ({cfg.num_attention_heads} attention heads, "
            f"{cfg.num_key_value_heads} KV heads, {split}); valid degrees: {', '.join(map(str, valid))}")


@dataclass(frozen=True)
class EngineConfig:
    """One engine's model and its options, checked against each other. `options` is what the caller
    gave; the fields after it are what those options resolve to for this model."""
    model: str  # a Hugging Face folder, a .gguf file, or "default"
    model_config: ModelConfig
    options: EngineOptions = EngineOptions()
    dtype: torch.dtype = field(init=False)  # options.dtype as torch's dtype
    max_model_len: int = field(init=False)  # options.max_model_len, or the model's limit where that is 0

    def __post_init__(self) -> None:
        check_parallel(self.options, self.model_config)
        limit = self.model_config.max_position_embeddings
        window = self.model_config.sliding_window
        if window is not None and window < limit:
            # attention is exact only while no query is `window` or more tokens past a key: within the window,
            # full attention is sliding-window attention, past it the engine would attend where the model does not
            if self.options.max_model_len > window:
                raise ValueError(
                    f"max_model_len={self.options.max_model_len} is past this model's sliding_window={window}: the "
                    f"engine has no sliding-window attention, so a sequence may have at most {window} tokens (prompt "
                    f"+ output); give max_model_len <= {window}, or leave it out")
            if not self.options.max_model_len:
                logger.warning("%s: max_model_len capped to the model's sliding_window=%d (of %d positions): the "
                               "engine has no sliding-window attention", self.model, window, limit)
            limit = window
        max_model_len = self.options.max_model_len or limit
        if not 0 < max_model_len <= limit:
            raise ValueError(f"max_model_len={max_model_len} must be in [1, {limit}] for this model")
        object.__setattr__(self, "dtype", resolve_dtype(self.options.dtype))
        object.__setattr__(self, "max_model_len", max_model_len)
