"""Large host buffers on 2 MiB pages, where Linux's transparent huge pages are on "madvise":
the decode steps stream every weight and much of the KV cache each step, and through 4 KiB
pages the TLB misses every 4 KiB (measured: the decode matmuls ~8% faster on huge pages).
Each buffer is a fresh anonymous mapping, so the advice comes before any page is touched (the
heap may hand back memory already faulted in on small pages). Elsewhere it is a plain buffer."""
from __future__ import annotations

import mmap

import torch

HUGE_PAGE = 2 << 20


def empty(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 1-D CPU tensor of numel elements, not initialised, 2 MiB aligned and advised onto huge
    pages with none of them touched yet (the caller fills it, off the hot path); buffers under
    2 MiB, or without madvise, are plain torch.empty."""
    nbytes = numel * dtype.itemsize
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(numel, dtype=dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # untouched
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive
    start = -raw.data_ptr() % HUGE_PAGE
    region.madvise(mmap.MADV_HUGEPAGE, start, nbytes - nbytes % mmap.PAGESIZE)  # a hint: refusal is harmless
    return raw[start:start + nbytes].view(dtype)
