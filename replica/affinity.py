"""Which cores a replica's threads run on (Linux CPU affinity), where the config names them: the engine's
thread (and the OpenMP team it starts, which inherits its mask) on its pool's cores, every other thread of
the process (Ray's, the actor's event loop, the KV store's) on the service cores beside the router's. On a
host with as many cores as engine threads, the router, Ray and the replicas' own service threads otherwise
land on an engine's core and stop its steps (the `pdserve_step_off_cpu_seconds` metric counts that time).
Plain os calls: no torch, so the config and the router may import it."""
from __future__ import annotations

import os
from pathlib import Path


def parse_cpus(text: str, where: str) -> tuple[int, ...]:
    """A CPU list as Linux writes one ("0-3", "0,2", "1,4-5") as the cores in order; ValueError naming `where`
    on anything else."""
    cpus: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 0 or last < first:
                raise ValueError
            cpus.extend(range(first, last + 1))
    except ValueError:
        raise ValueError(f"{where}={text!r}: give a CPU list such as '0-3' or '0,2'") from None
    if len(set(cpus)) != len(cpus):
        raise ValueError(f"{where}={text!r} names a CPU twice")
    return tuple(cpus)


def replica_cpus(cpus: tuple[int, ...], index: int, width: int) -> tuple[int, ...]:
    """Replica `index`'s share of its pool's cores: consecutive runs of `width` (its engine threads), the
    runs taken in turn (a pool with more replicas than runs shares them from the first again)."""
    runs = max(1, len(cpus) // max(1, width))
    i = index % runs
    return cpus[i * width:(i + 1) * width] or cpus


def pin(tid: int, cpus: tuple[int, ...], where: str) -> None:
    """Thread `tid` (0: the calling thread) onto `cpus`; a clear error where this host lacks one of them."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError(f"{where}: placing threads on cores needs Linux (os.sched_setaffinity)")
    if missing := set(cpus) - set(range(os.cpu_count() or 1)):
        raise ValueError(f"{where}: CPU {sorted(missing)} is not on this host (it has {os.cpu_count()})")
    os.sched_setaffinity(tid, cpus)


def pin_process(cpus: tuple[int, ...], where: str) -> None:
    """Every thread of this process onto `cpus`; threads they start later inherit it."""
    for tid in _threads():
        try:
            pin(tid, cpus, where)
        except ProcessLookupError:  # it ended meanwhile
            pass


def thread_masks() -> dict[int, list[int]]:
    """Each thread of this process (native id) and the cores it may run on, sorted."""
    out = {}
    for tid in _threads():
        try:
            out[tid] = sorted(os.sched_getaffinity(tid))
        except ProcessLookupError:
            pass
    return out


def _threads() -> list[int]:
    return [int(task.name) for task in Path("/proc/self/task").iterdir()]
