"""The machine a benchmark ran on: its limits through the engine's one peak probe (engine.peaks),
taken with the benchmarks' torch threads, in this process or in a child of its own."""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import platform
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from engine import native, peaks

THREADS = 2  # torch threads for every part of a benchmark: the 2 cores of a development machine


def measure_machine(quick: bool = False) -> dict[str, Any]:
    """fp32 matmul peak and memory read bandwidth with THREADS torch threads, best of several
    (matmul_peak_gflops, mem_read_bw_gbs and the figures they are the best of), and the FMA peak."""
    torch.set_num_threads(THREADS)
    return {**peaks.measure(peaks.QUICK if quick else peaks.FULL), "fma_peak_gflops": fma_peak_gflops()}


def fma_peak_gflops(threads: int = THREADS, reps: int = 5) -> float | None:
    """The CPU's fp32 FMA peak on `threads` threads (csrc/fma_peak.c: independent chains of FMAs on the
    widest vectors the build has), best of reps of ~0.2 s; None without a C compiler. What a matmul kernel
    can approach at best: the engine's own probe times a library matmul, which loses a share to its loads."""
    lib = native.load(Path(__file__).parent / "csrc" / "fma_peak.c", ["-O3", "-march=native", "-fopenmp", "-shared",
                                                                      "-fPIC"],
                      {"fma_peak": ([ctypes.c_int, ctypes.c_int64, ctypes.POINTER(ctypes.c_float)], ctypes.c_double)})
    if lib is None:
        return None
    sink = ctypes.c_float()
    return round(max(lib.fma_peak(threads, 20_000_000, ctypes.byref(sink)) for _ in range(reps)) / 1e9, 1)


def probe_machine() -> dict[str, float]:
    """A short check of the same two limits (about 2 s), taken between workloads: on a shared host
    they drift, and the spread tells how far apart in time figures may be compared."""
    torch.set_num_threads(THREADS)
    m = peaks.measure(peaks.DRIFT)
    return {"matmul_gflops": m["matmul_peak_gflops"], "matvec_gbs": m["mem_read_matvec_gbs"]}


def _machine_child(quick: bool, conn: Connection) -> None:
    while True:
        cmd = conn.recv()
        if cmd == "quit":
            return
        try:
            conn.send(("ok", measure_machine(quick) if cmd == "full" else probe_machine()))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class MachineProbe:
    """The machine measurements in a child process of their own, so that their 1 GiB buffers stay
    out of the benchmark's peak RSS. `probes` keeps every drift check, in order."""

    def __init__(self, quick: bool) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_machine_child, args=(quick, child), daemon=True)
        self.proc.start()
        self.probes: list[dict[str, Any]] = []

    def _ask(self, cmd: str) -> dict[str, Any]:
        self.conn.send(cmd)
        status, result = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"machine measurement failed:\n{result}")
        return result

    def full(self) -> dict[str, Any]:
        return self._ask("full")

    def probe(self, when: str) -> None:
        self.probes.append({"when": when, **self._ask("probe")})

    def close(self) -> None:
        self.conn.send("quit")
        self.proc.join(timeout=30)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
