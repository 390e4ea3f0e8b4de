"""Model registry: a Hugging Face architecture name picks the class."""
from __future__ import annotations

from torch import nn

from engine.config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.options import EngineOptions

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    name: LlamaForCausalLM for name in (
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
        "MixtralForCausalLM", "Qwen3MoeForCausalLM")
}


def build_model(cfg: ModelConfig, parallel: EngineOptions | None = None) -> nn.Module:
    """The model for this rank of the current tensor-parallel group (engine.distributed)."""
    if cfg.architecture not in MODEL_REGISTRY:
        raise ValueError(f"architecture {cfg.architecture!r} is not supported; supported: {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[cfg.architecture](cfg, parallel)
