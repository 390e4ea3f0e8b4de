"""pdserve's model runtime, shared by the prefill and decode pools. No Ray, no gRPC.

The public names load on first use (PEP 562), so that importing a torch-free submodule such as
engine.options (which pdserve.config, the CLI and the router's side import) does not import torch."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.llm import LLM
    from engine.llm_engine import LLMEngine, RequestOutput
    from engine.options import EngineOptions
    from engine.sampling_params import SamplingParams

_LAZY = {"LLM": "engine.llm", "LLMEngine": "engine.llm_engine", "RequestOutput": "engine.llm_engine",
         "SamplingParams": "engine.sampling_params", "EngineOptions": "engine.options"}

__all__ = ["EngineOptions", "LLM", "LLMEngine", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
