"""Frozen configuration, one dataclass per concern, validated where it is made."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


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
        )


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: allocated once, then handed out block by block."""
    block_size: int = 16
    num_blocks: int | None = None  # None: as many as kv_cache_bytes holds
    kv_cache_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} must be a power of two, e.g. 16")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks={self.num_blocks} must be at least 1")


@dataclass(frozen=True)
class SchedulerConfig:
    """The per-step token budget that gives chunked prefill and continuous batching."""
    max_num_batched_tokens: int = 2048  # the token budget of one step, prefill and decode together
    max_num_seqs: int = 256  # sequences in the running batch
    max_prefill_chunk: int | None = None  # most tokens one sequence gets in one step; None: the budget

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be at least 1")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be at least 1")
        if self.max_prefill_chunk is not None and self.max_prefill_chunk < 1:
            raise ValueError(f"max_prefill_chunk={self.max_prefill_chunk} must be at least 1 or None")

    @property
    def chunk_size(self) -> int:
        return self.max_prefill_chunk or self.max_num_batched_tokens


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1  # ranks per replica
    expert_parallel: bool = False  # MoE: experts partitioned over the ranks (else each expert is TP-sharded)

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} must be at least 1")

    def check(self, cfg: ModelConfig) -> None:
        """Raise, naming the valid degrees, when the model cannot be cut this many ways."""
        from engine.distributed import valid_tp_degrees

        n = self.tensor_parallel_size
        width = cfg.moe_intermediate_size if cfg.num_experts else cfg.intermediate_size
        valid = valid_tp_degrees(cfg.num_attention_heads, cfg.num_key_value_heads, width)
        if self.expert_parallel:
            if not cfg.num_experts:
                raise ValueError("expert_parallel needs an MoE model; this one is dense")
            valid = valid_tp_degrees(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_experts)
        if n not in valid:
            split = f"{cfg.num_experts} experts" if self.expert_parallel else f"MLP width {width}"
            raise ValueError(
                f"tensor_parallel_size={n} does not fit this model ({cfg.num_attention_heads} attention heads, "
                f"{cfg.num_key_value_heads} KV heads, {split}); valid degrees: {', '.join(map(str, valid))}")


@dataclass(frozen=True)
class EngineConfig:
    model: str  # a Hugging Face folder, a .gguf file, or "default"
    model_config: ModelConfig
    dtype: torch.dtype = torch.float32
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    attention_backend: str = "auto"  # "auto", "torch" or "flash"
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    max_model_len: int = 0  # 0: the model's max_position_embeddings
    # CPU fp32: the linear weights laid out once for the C matmuls: AMX tiles of a block-quantized
    # checkpoint's integers (every step; they replace the fp32 copy, at half its size), else a
    # second copy in 48-column fp32 panels (steps of 2-128 rows; the weights' size again)
    weight_panels: bool = True
    # CPU fp32 with the weights in AMX tiles: the decoder stack as one C call per step, bit for
    # bit the Python forward (models/native_decoder.py); False keeps the Python forward
    native_decoder: bool = True

    def __post_init__(self) -> None:
        self.parallel.check(self.model_config)
        limit = self.model_config.max_position_embeddings
        if self.max_model_len == 0:
            object.__setattr__(self, "max_model_len", limit)
        elif not 0 < self.max_model_len <= limit:
            raise ValueError(f"max_model_len={self.max_model_len} must be in [1, {limit}] for this model")
