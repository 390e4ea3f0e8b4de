"""Moving KV from the prefill pool into reserved decode blocks. The connector's halves: KVSender /
KVReceiver (scheduler halves) and each backend's saver and receiver (worker halves: shm.py,
collective.py); the rank roles of both sides (ranks.py) and the wiring of a cluster (wiring.py).

Names are loaded on first use, so `kv_transfer.wiring` imports without torch in the process
that starts a cluster (and hosts the router)."""
from __future__ import annotations

import importlib
from typing import Any

# the KV backends: same host ("ipc": shared memory on CPU, CUDA IPC on GPU), or any hosts ("collective":
# torch.distributed send/recv, NCCL between GPUs, gloo on CPU: kv_transfer.collective.Wire)
BACKENDS = ("ipc", "collective")
# what a cluster config may say: a backend, or "auto" (resolve_backend picks one when the cluster starts)
CHOICES = ("auto", *BACKENDS)


def resolve_backend(choice: str, one_host: bool, gpus: bool = False) -> str:
    """The backend a cluster runs: `choice` itself, or for "auto" `ipc` (shared memory) when every replica
    shares one host and the pools are on CPUs, and `collective` otherwise: a joined Ray cluster may place the
    pools on different nodes (gloo on CPUs), and GPU pools take NCCL, since Ray shows each replica only its own
    GPUs, so one could not open a CUDA IPC handle into another's (name `ipc` for pools that share a GPU)."""
    if choice not in CHOICES:
        raise ValueError(f"kv_backend={choice!r}; available: {CHOICES}")
    return choice if choice != "auto" else "ipc" if one_host and not gpus else "collective"

_EXPORTS = {"KVReceiver": "kv_transfer.receiver", "KVSender": "kv_transfer.sender", "PrefillDone": "kv_transfer.sender",
            "Lease": "kv_transfer.metadata", "PoolHandle": "kv_transfer.metadata"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kv_transfer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
