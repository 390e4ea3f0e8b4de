"""Attention backends behind one interface, picked from a registry by name (backend.py).

The package fills the registry as it loads: backend.py first (the interface and the registry;
it imports no backend), then each backend module, whose @register_backend enters it. So any
`from engine.attention... import` finds the registry full, and imports run one way only:
backends -> backend.py."""
from __future__ import annotations

# registration order, and so available_backends()'s: flash, torch (paged_cpu's base class), cpu
from engine.attention import backend, flash, paged_cpu, torch_ref  # noqa: F401
