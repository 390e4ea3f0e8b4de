"""The machine's limits that MFU, MBU and every roofline are measured against: fp32 matmul peak
and memory read bandwidth, with this process's current torch threads, on one device.

One probe for the whole project: the engine's metrics take the replica's denominators from it
at start-up (`engine.metrics.measure_peaks`, sized by `replica_size`), and every benchmark reports
it beside its figures (FULL, QUICK, DRIFT). The sizes differ (a replica's start-up spends ~0.1 s
on it; a benchmark several seconds on 1 GiB buffers), the measurement does not:

    matmul   2 n^3 / t of torch.mm on fp32 n x n matrices, best of reps after one warm-up
    read     bytes read / t while streaming one buffer three ways: sum, matrix-vector product
             (what a batch-1 decode step does with its weights), copy (counting the bytes read,
             not those written); the bandwidth is the best of the ways measured
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

READ_WAYS = ("sum", "matvec", "copy")


@dataclass(frozen=True)
class ProbeSize:
    """How hard to look: larger matrices and buffers read closer to the limits and take longer."""
    matmuls: tuple[tuple[int, int], ...]  # (n, reps) per matrix size
    read_bytes: int  # the streamed buffer, far past the caches
    read_reps: int
    read_ways: tuple[str, ...] = READ_WAYS

    def __post_init__(self) -> None:
        unknown = set(self.read_ways) - set(READ_WAYS)
        if unknown:
            raise ValueError(f"unknown read ways {sorted(unknown)}: pick from {READ_WAYS}")


# a benchmark's full measurement (about 10 s on 2 cores; 2 GiB of buffers)
FULL = ProbeSize(matmuls=((2048, 8), (3072, 4)), read_bytes=1 << 30, read_reps=5)
QUICK = ProbeSize(matmuls=((2048, 4), (3072, 2)), read_bytes=1 << 30, read_reps=3)
# a check between a benchmark's workloads of how far a shared host drifts (about 2 s)
DRIFT = ProbeSize(matmuls=((2048, 4),), read_bytes=256 << 20, read_reps=4, read_ways=("matvec",))


def replica_size(device: str = "cpu", read_bytes: int = 64 << 20) -> ProbeSize:
    """A probe for a replica's start-up, where every second counts (~0.1-0.3 s on a CPU): one matmul
    size, and a matrix-vector product (a batch-1 decode step's access) over read_bytes, which the
    replica sets to the weights one step of its rank reads: so the bandwidth comes from the same
    level of the memory hierarchy the steps read from (a 300 MiB last-level cache holds a small
    model's weights; a 64 MiB buffer would fit it whatever the model)."""
    n = 4096 if device.startswith("cuda") else 1024  # a GPU needs a larger matmul to reach its peak
    return ProbeSize(matmuls=((n, 5),), read_bytes=max(read_bytes, 64 << 20), read_reps=5, read_ways=("matvec",))


def best_seconds(fn: Callable[[], Any], reps: int, device: str = "cpu") -> float:
    """The fastest of `reps` calls of fn, after one untimed warm-up call."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_gflops(n: int, reps: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / best_seconds(lambda: torch.mm(a, b, out=c), reps, device) / 1e9


def read_gbs(num_bytes: int, reps: int, device: str = "cpu", ways: tuple[str, ...] = READ_WAYS) -> dict[str, float]:
    """GB/s read by each way of streaming a square fp32 buffer of about num_bytes."""
    side = math.isqrt(num_bytes // 4)
    x = torch.empty(side, side, device=device).fill_(1.0)  # first touch outside the timing
    size = x.numel() * 4
    out: dict[str, float] = {}
    if "sum" in ways:
        out["sum"] = size / best_seconds(x.sum, reps, device) / 1e9
    if "matvec" in ways:
        v = torch.randn(side, device=device)
        out["matvec"] = size / best_seconds(lambda: torch.mv(x, v), reps, device) / 1e9
    if "copy" in ways:
        y = torch.empty_like(x).fill_(0.0)
        out["copy"] = size / best_seconds(lambda: y.copy_(x), reps, device) / 1e9
    return out


def measure(size: ProbeSize = FULL, device: str = "cpu") -> dict[str, float]:
    """The limits as the benchmarks' JSON names them: matmul_<n>_gflops per size,
    matmul_peak_gflops, mem_read_<way>_gbs per way (copy: mem_copy_read_gbs) and mem_read_bw_gbs,
    the best way."""
    out: dict[str, float] = {}
    for n, reps in size.matmuls:
        out[f"matmul_{n}_gflops"] = round(matmul_gflops(n, reps, device), 1)
    out["matmul_peak_gflops"] = max(out[f"matmul_{n}_gflops"] for n, _ in size.matmuls)
    read = read_gbs(size.read_bytes, size.read_reps, device, size.read_ways)
    for way, gbs in read.items():
        out["mem_copy_read_gbs" if way == "copy" else f"mem_read_{way}_gbs"] = round(gbs, 2)
    out["mem_read_bw_gbs"] = round(max(read.values()), 2)
    return out
