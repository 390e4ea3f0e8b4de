"""The `ipc` backend: the decode replica's KV pool is memory the prefill replica on the same host
maps, and each layer's new K/V is written straight into the reserved blocks. On CPU the pool is
a shared-memory file; on CUDA it is device memory opened through a CUDA IPC handle (two
processes on one GPU, or GPUs with peer access)."""
from __future__ import annotations

import math
import mmap
import os

import torch

from engine.distributed import kv_head_range
from engine.kv_connector import KVSaver, StepLayout
from engine.model_runner import KVAllocator
from kv_transfer.metadata import SHM_DIR, PoolHandle, pool_path, rank_pool_name
from kv_transfer.plan import all_rows, plan_step

__all__ = ["SHM_DIR", "ShmKVSaver", "attach_pool", "cuda_ipc_handle", "pool_path", "rank_pool_handles",
           "rank_pool_name", "shared_pool_allocator", "unlink_pool"]


def shared_pool_allocator(name: str, handles: list[PoolHandle] | None = None) -> KVAllocator:
    """An engine KVAllocator that puts the pool where another process can map it: /dev/shm under
    `name` on CPU, a CUDA IPC handle on CUDA (appending its handle to `handles` so the caller
    can publish it)."""
    def allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type == "cuda":
            pool = torch.zeros(shape, dtype=dtype, device=device)
            if handles is not None:
                handles.append(PoolHandle(name, tuple(shape), str(dtype).removeprefix("torch."),
                                          cuda_ipc=cuda_ipc_handle(pool)))
            return pool
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
    if handle.cuda_ipc is not None:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        return rebuild_cuda_tensor(*handle.cuda_ipc)
    path = pool_path(handle.name)
    if not path.exists():
        raise ValueError(f"KV pool {handle.name!r} is not in shared memory ({path}); is its decode replica up?")
    dtype = getattr(torch, handle.dtype)
    # mapped with its page tables filled now: else each burst's writes fault on every page not yet written from
    # here (0.1 s a burst of 24 prompts; the pool is the decode replica's whole KV cache)
    with open(path, "r+b") as f:
        region = mmap.mmap(f.fileno(), math.prod(handle.shape) * dtype.itemsize,
                           flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    return torch.frombuffer(region, dtype=dtype).view(handle.shape)  # the tensor keeps the mapping


def unlink_pool(name: str) -> None:
    try:
        os.unlink(pool_path(name))
    except FileNotFoundError:
        pass


def rank_pool_handles(pool: str, first: PoolHandle, num_kv_heads: int, world_size: int,
                      cuda_ipc: list[tuple] | None = None) -> list[PoolHandle]:
    """Every rank's handle of a decode replica at TP world_size, from rank 0's: on CPU each rank's slice is
    a shared-memory file named by its rank; on CUDA each rank's slice is its own device memory, reached
    through the IPC handle that rank made (cuda_ipc, one per rank: cuda_ipc_handle on each)."""
    if first.cuda_ipc is not None and len(cuda_ipc or ()) != world_size:
        raise ValueError(f"decode pool {pool!r} is on CUDA at TP {world_size}: it needs each rank's IPC handle, "
                         f"got {len(cuda_ipc or ())}")
    return [PoolHandle(rank_pool_name(pool, r), first.shape, first.dtype, pool,
                       kv_head_range(num_kv_heads, r, world_size),
                       cuda_ipc=cuda_ipc[r] if first.cuda_ipc is not None else None) for r in range(world_size)]


def cuda_ipc_handle(pool: torch.Tensor) -> tuple:
    """A CUDA pool's IPC handle, as another process on the host opens it (attach_pool)."""
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(pool)[1]


class ShmKVSaver(KVSaver):
    """Worker half on a prefill rank: per layer, each of its KV heads goes straight into every
    decode rank's slice that holds that head (re-sharding between any two TP degrees: one gather
    of the step's rows, one scatter into the reserved slots, per destination slice)."""

    @property
    def after_step(self) -> bool:
        """Its copies run on the stepping thread: a CPU step may run whole, then copy (save_from_cache). On CUDA the
        copies overlap the later layers' kernels, so they keep going layer by layer."""
        return self.local_kv is not None and self.local_kv.device.type == "cpu"

    def __init__(self, pools: dict[str, torch.Tensor] | None = None, heads: tuple[int, int] | None = None,
                 writes: bool = True) -> None:
        self.heads = heads  # the model's KV heads this rank holds, [start, end); None: all of them
        self.writes = writes  # False for a rank whose (replicated) heads another rank already sends
        self.pools: dict[str, list[tuple[torch.Tensor, tuple[int, int] | None]]] = {
            name: [(t, None)] for name, t in (pools or {}).items()}
        # (destination slice, rows, slots, source heads, destination heads, cached slots of this rank's cache)
        self._sends: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, slice, slice,
                                torch.Tensor | None]] = []
        self._attached: dict[str, str] = {}  # slice name -> its pool's name
        self.bytes_sent = 0

    @classmethod
    def for_rank(cls, num_kv_heads: int, rank: int, world_size: int) -> ShmKVSaver:
        replicas = max(1, world_size // num_kv_heads)  # ranks holding each head
        return cls(heads=kv_head_range(num_kv_heads, rank, world_size), writes=rank % replicas == 0)

    def attach(self, handle: PoolHandle) -> None:
        """Map one decode rank's slice (attaching it again is a no-op)."""
        if handle.name not in self._attached:
            self.pools.setdefault(handle.pool_name, []).append((attach_pool(handle), handle.head_range))
            self._attached[handle.name] = handle.pool_name

    def reaches(self, pool: str) -> bool:
        return pool in self.pools

    def detach(self, pool_name: str) -> None:
        """Unmap a decode replica's pool (it was replaced). Between steps, once no prompt is bound there."""
        self.pools.pop(pool_name, None)
        self._attached = {name: pool for name, pool in self._attached.items() if pool != pool_name}

    def plan(self, layout: StepLayout) -> dict[str, tuple[list[int] | None, list[int], list[int]]]:
        """Rank 0: per destination pool, the rows of the flat batch (None: all) then of the cached slots
        (kv_transfer.plan.PoolPlan), their slots, and the cached slots."""
        plans = plan_step(layout, lambda name: self.pools[name][0][0].shape[3] if name in self.pools else None,
                          self.local_kv.shape[3])
        num_rows = layout.query_start_loc[-1]
        return {name: (all_rows(p, num_rows), p.slots, p.cached) for name, p in plans.items()}

    def begin_planned(self, sends: dict[str, tuple[list[int] | None, list[int], list[int]]]) -> None:
        """Every rank: turn rank 0's plan into this rank's copies (its heads into each slice that holds them)."""
        self._sends = []
        if not self.writes:
            return
        here = self.local_kv.device if self.local_kv is not None else None  # the rows' (on CUDA, the GPU's)
        for name, (rows, slots, cached) in sends.items():
            rows_t = None if rows is None else torch.tensor(rows, device=here)
            cached_t = torch.tensor(cached, device=here) if cached else None
            slots_on: dict[torch.device, torch.Tensor] = {}  # each destination slice's device (a GPU each at TP > 1)
            for pool, dst_heads in self.pools[name]:
                a, b = dst_heads or (0, pool.shape[4])
                c, d = self.heads or (a, b)
                lo, hi = max(a, c), min(b, d)
                if lo < hi:
                    if pool.device not in slots_on:
                        slots_on[pool.device] = torch.tensor(slots, device=pool.device)
                    slots_t = slots_on[pool.device]
                    self._sends.append((pool, rows_t, slots_t, slice(lo - c, hi - c), slice(lo - a, hi - a), cached_t))

    def begin_step(self, layout: StepLayout) -> None:
        self.begin_planned(self.plan(layout))

    def save_from_cache(self, slots: torch.Tensor) -> None:
        """After a whole CPU step: each send's rows read once per layer from the local cache (the step's slots,
        then the cached ones), straight into the decode slots. Nothing at all where the step sends nothing."""
        if not self._sends:
            return
        _, _, _, _, heads, dim = self.local_kv.shape
        sources = []
        for pool, rows, dst_slots, src_heads, dst_heads, cached in self._sends:
            src = slots if cached is None else torch.cat((slots, cached))
            sources.append((pool, src if rows is None else src.index_select(0, rows), dst_slots, src_heads, dst_heads))
        for layer in range(self.local_kv.shape[0]):
            for kv in (0, 1):
                cache = self.local_kv[layer, kv].view(-1, heads, dim)
                for pool, src, dst_slots, src_heads, dst_heads in sources:
                    self._copy(cache.index_select(0, src), pool, layer, kv, dst_slots, src_heads, dst_heads)

    def _copy(self, src: torch.Tensor, pool: torch.Tensor, layer: int, kv: int, slots: torch.Tensor,
              src_heads: slice, dst_heads: slice) -> None:
        """src ([rows, this rank's heads, dim]) into the decode slice's `slots` of K (kv 0) or V (1) of `layer`."""
        heads, dim = pool.shape[4:]
        if src_heads.stop - src_heads.start != src.shape[1]:
            src = src[:, src_heads]
        dst = pool[layer, kv].view(-1, heads, dim)
        if dst_heads.stop - dst_heads.start != heads:
            dst = dst[:, dst_heads]
        dst.index_copy_(0, slots, src.to(pool.device))  # a copy only into another GPU's slice
        self.bytes_sent += src.numel() * src.element_size()

    def save_kv_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for pool, rows, slots, src_heads, dst_heads, cached in self._sends:
            for kv, src in ((0, k), (1, v)):
                self._copy(self.rows(layer, kv, src, rows, cached), pool, layer, kv, slots, src_heads, dst_heads)

    def end_step(self) -> None:
        self._sends = []
