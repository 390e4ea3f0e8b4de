"""Attention backends behind one interface, picked from a registry by name."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from engine.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    """Writes this step's K/V into the paged cache, then attends over each sequence's
    whole context (cached + new) with causal masking inside the new tokens."""

    name: str

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
        caches: [num_blocks, block_size, num_kv_heads, head_dim].
        Returns [num_tokens, num_heads, head_dim]."""

    @staticmethod
    def is_available() -> bool:
        return True


# filled by each backend module's @register_backend as engine/attention/__init__.py imports it;
# this module imports none of them, so the imports run one way (backends -> here)
_REGISTRY: dict[str, Callable[[], AttentionBackend]] = {}


def register_backend(name: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    """Class decorator: put the backend in the registry under `name` (what a config string picks)."""
    def wrap(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def available_backends() -> list[str]:
    return [name for name, cls in _REGISTRY.items() if cls.is_available()]


def get_backend(name: str, device: torch.device) -> AttentionBackend:
    """"auto": flash attention on CUDA when a flash-attention package imports; on CPU the
    paged C kernel when a C compiler is there; else the torch reference."""
    if name == "auto":
        preferred = "flash" if device.type == "cuda" else "cpu"
        name = preferred if _REGISTRY[preferred].is_available() else "torch"
    if name not in _REGISTRY:
        raise ValueError(f"attention backend {name!r} is unknown; choose one of {sorted(_REGISTRY)} or 'auto'")
    if not _REGISTRY[name].is_available():
        raise ValueError(f"attention backend {name!r} is not available here; available: {available_backends()}")
    return _REGISTRY[name]()
