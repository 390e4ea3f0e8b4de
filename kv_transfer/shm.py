"""The `ipc` backend on CPU: the decode replica's KV pool lives in a shared-memory file; the
prefill replica maps it and writes each layer's new K/V straight into the reserved blocks."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from engine.kv_connector import KVSaver, StepLayout
from engine.model_runner import KVAllocator
from kv_transfer.metadata import PoolHandle
from kv_transfer.plan import plan_step

SHM_DIR = Path("/dev/shm")


def pool_path(name: str) -> Path:
    return SHM_DIR / f"pdserve-kv-{name}"


def shared_pool_allocator(name: str, handles: list[PoolHandle] | None = None) -> KVAllocator:
    """An engine KVAllocator that puts the pool in /dev/shm under `name` (appending its handle
    to `handles` so the caller can publish it)."""
    def allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            raise ValueError("the shared-memory KV pool is for CPU engines; on CUDA use CUDA IPC")
        path = pool_path(name)
        with open(path, "wb") as f:
            f.truncate(math.prod(shape) * dtype.itemsize)
        pool = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype).view(shape)
        pool.zero_()  # touch every page now, not on the hot path
        if handles is not None:
            handles.append(PoolHandle(name, tuple(shape), str(dtype).removeprefix("torch.")))
        return pool
    return allocate


def attach_pool(handle: PoolHandle) -> torch.Tensor:
    path = pool_path(handle.name)
    if not path.exists():
        raise ValueError(f"KV pool {handle.name!r} is not in shared memory ({path}); is its decode replica up?")
    dtype = getattr(torch, handle.dtype)
    return torch.from_file(str(path), shared=True, size=math.prod(handle.shape), dtype=dtype).view(handle.shape)


def unlink_pool(name: str) -> None:
    try:
        os.unlink(pool_path(name))
    except FileNotFoundError:
        pass


class ShmKVSaver(KVSaver):
    """Worker half on the prefill side: per layer, one gather + one scatter per decode pool."""

    def __init__(self, pools: dict[str, torch.Tensor] | None = None) -> None:
        self.pools: dict[str, torch.Tensor] = dict(pools or {})
        self._plan: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self.bytes_sent = 0

    def attach(self, handle: PoolHandle) -> None:
        if handle.name not in self.pools:
            self.pools[handle.name] = attach_pool(handle)

    def begin_step(self, layout: StepLayout) -> None:
        plans = plan_step(layout, lambda name: self.pools[name].shape[3] if name in self.pools else None)
        num_rows = layout.query_start_loc[-1]
        self._plan = [
            (self.pools[name], None if len(p.rows) == num_rows else torch.tensor(p.rows), torch.tensor(p.slots))
            for name, p in plans.items()]

    def save_kv_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for pool, rows, slots in self._plan:
            heads, dim = pool.shape[4:]
            for kv, src in ((0, k), (1, v)):
                src = src if rows is None else src.index_select(0, rows)
                pool[layer, kv].view(-1, heads, dim).index_copy_(0, slots, src)
                self.bytes_sent += src.numel() * src.element_size()

    def end_step(self) -> None:
        self._plan = []
