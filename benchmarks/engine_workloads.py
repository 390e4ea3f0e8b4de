"""The engine benchmark's timed runs: engines taking turns on one workload, each keeping its best
run, with the CPU utilisation that tells whether another process took the cores meanwhile."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from benchmarks.machine import THREADS

Prompts = list[list[int]]
DECODE_METHOD = ("decode tok/s = (N - K) / (T - T_first) within one generate call: T its wall time, T_first when "
                 "every prompt has its first new token, K the new tokens existing then, N all new tokens; "
                 "e2e tok/s = N / T; best of the reps")


class Engine(Protocol):
    """What a workload runs: OurEngine or RemoteHF (benchmarks.engine_runners)."""
    name: str

    def generate(self, prompts: Prompts, n: int) -> dict[str, Any]: ...


def random_prompts(num: int, length: int, vocab: int, seed: int) -> Prompts:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num, length), generator=g).tolist()


def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return sum(vals), vals[3] + vals[4]  # total, idle + iowait


def wait_quiet(max_wait: float) -> float:
    """Wait (at most max_wait s) until the other processes leave the cpus idle for two seconds in a row:
    with one core taken, every OpenMP barrier of a 2-thread torch op waits a scheduler slice.
    Called between our runs, when nothing of ours is working. Returns the seconds waited."""
    if max_wait <= 0 or not os.path.exists("/proc/stat"):
        return 0.0
    start, quiet = time.perf_counter(), 0
    while time.perf_counter() - start < max_wait and quiet < 2:
        t0, i0 = _cpu_jiffies()
        time.sleep(1.0)
        t1, i1 = _cpu_jiffies()
        busy = 1 - (i1 - i0) / max(1, t1 - t0)
        quiet = quiet + 1 if busy < 0.1 else 0
    return time.perf_counter() - start


class Runs:
    """Timed generate calls on one engine: the best run by `key` (a rate), and CPU utilisation."""

    MIN_UTIL = 0.85  # below this, another process had the cores during the run

    def __init__(self, engine: Engine, key: Callable[[dict[str, Any]], float]) -> None:
        self.engine, self.key = engine, key
        self.best: dict[str, Any] | None = None
        self.wall = self.cpu = self.waited = 0.0
        self.utils: list[float] = []
        self.good = 0

    def run(self, prompts: Prompts, n: int, quiet_wait: float) -> None:
        self.waited += wait_quiet(quiet_wait)
        r = self.engine.generate(prompts, n)
        self.wall += r["wall"]
        self.cpu += r["cpu"]
        util = r["cpu"] / (r["wall"] * THREADS)
        self.utils.append(round(util, 3))
        self.good += util >= self.MIN_UTIL
        if self.best is None or self.key(r) > self.key(self.best):
            self.best = r

    def stats(self) -> dict[str, Any]:
        util = round(self.cpu / (self.wall * THREADS), 3) if self.wall else None
        return {"cpu_util": util, "run_cpu_utils": self.utils, "waited_quiet_s": round(self.waited, 1),
                "tokens": self.best["tokens"]}


def alternate(engines: list[Engine], prompts: Prompts, n: int, warm_prompts: Prompts, warm_n: int,
              key: Callable[[dict[str, Any]], float], reps: int, quiet_wait: float = 0.0,
              retries: int = 0) -> dict[str, Runs]:
    """Warm every engine up once, then time them in turns (ours, transformers, ours, ...) so that a host
    that drifts during the workload hurts both alike. A run with CPU utilisation below Runs.MIN_UTIL does
    not count towards reps; up to `retries` extra rounds are run for it. Each engine keeps its best run."""
    runs = {e.name: Runs(e, key) for e in engines}
    for e in engines:
        e.generate(warm_prompts, warm_n)
    for _ in range(reps + retries):
        if all(r.good >= reps for r in runs.values()):
            break
        for r in runs.values():
            if r.good < reps:
                r.run(prompts, n, quiet_wait)
    return runs


def _decode_rate(r: dict[str, Any]) -> float:
    total = sum(map(len, r["tokens"]))
    return (total - r["tokens_at_first"]) / (r["wall"] - r["t_first"])


def decode_workload(engines: list[Engine], prompts: Prompts, n: int, warm_prompts: Prompts, reps: int,
                    **opts: Any) -> dict[str, dict[str, Any]]:
    """Decode rates (DECODE_METHOD) and the best run's timings, per engine name."""
    out = {}
    for name, runs in alternate(engines, prompts, n, warm_prompts, 4, _decode_rate, reps, **opts).items():
        r = runs.best
        total = sum(map(len, r["tokens"]))
        out[name] = {"t_first_s": round(r["t_first"], 4), "t_total_s": round(r["wall"], 3),
                     "tokens_at_first": r["tokens_at_first"], "new_tokens": total,
                     "decode_tok_s": round(_decode_rate(r), 2), "e2e_tok_s": round(total / r["wall"], 2),
                     **runs.stats()}
    return out


def prefill_workload(engines: list[Engine], prompts: Prompts, warm_prompts: Prompts, reps: int,
                     **opts: Any) -> dict[str, dict[str, Any]]:
    """Prompt tokens per second of the fastest run (one new token each), per engine name."""
    out = {}
    for name, runs in alternate(engines, prompts, 1, warm_prompts, 1, lambda r: -r["wall"], reps, **opts).items():
        r = runs.best
        out[name] = {"t_s": round(r["wall"], 3), "tok_s": round(sum(map(len, prompts)) / r["wall"], 1),
                     **runs.stats()}
    return out
