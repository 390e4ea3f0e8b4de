"""Fit the service's costs (planner.simulate.Service) to measured runs: the seconds the profile's step models
cannot see, because they are the cluster's (the router and its hops, the engine loop around the forward, the
streaming, and how much slower a pool's forward runs beside the others and the service on shared cores).

Each case is a measured `pdserve bench --json` run or sweep, the cluster configuration it ran on and the
requests it sent. The fit is a search over a grid (few parameters, each simulation takes milliseconds):
it minimises the squared log-ratio of simulated to measured TTFT and TPOT at p50 and p90 over every run
of every case. What it returns is only as good as the cases: validate it on runs it did not
see (another workload, other rates)."""
from __future__ import annotations

import math
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, replace
from typing import Any

from planner.cost import Profile, pool_key
from planner.simulate import Service, simulate_sweep

GRID: dict[str, tuple[float, ...]] = {
    "request_s": (0.0, 0.005, 0.01, 0.02, 0.04),
    "hop_s": (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08),
    "step_s": (0.0, 0.0005, 0.001, 0.002, 0.004, 0.008),
    "token_s": (0.0, 0.00025, 0.0005, 0.001, 0.002, 0.004),
}
SLOWDOWNS = tuple(round(1 + 0.05 * i, 2) for i in range(17))  # 1.0 .. 1.8
METRICS = (("ttft_ms", "p50"), ("ttft_ms", "p90"), ("tpot_ms", "p50"), ("tpot_ms", "p90"))


@dataclass(frozen=True)
class Case:
    """A measured run (or sweep) and what produced it."""
    config: Any  # pdserve.config.ClusterConfig
    requests: list  # the requests every run sent ([(prompt, output_len)]), or one such list per run
    measured: dict[str, Any]  # pdserve bench --json: a run, or a sweep with "runs" (one cluster, in order)
    seed: int = 0
    warmup: list[tuple[list[int], int]] = field(default_factory=list)  # sent all at once before the first run

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.measured.get("runs", [self.measured])


def errors(profile: Profile, service: Service, cases: Seq[Case]) -> list[dict[str, Any]]:
    """Per measured run: its rate and, per metric, measured and simulated ms."""
    rows = []
    for case in cases:
        sims = simulate_sweep(case.config, profile, case.requests, [run["rate"] for run in case.runs],
                              case.runs[0].get("seed", case.seed), service=service, warmup=case.warmup)
        rows += compared(case, sims)
    return rows


def compared(case: Case, sims: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per measured run of the case and its simulated twin: the rate and, per metric, (measured, simulated) ms."""
    return [{"rate": run["rate"], **{f"{m}.{q}": (run[m][q], sim[m][q]) for m, q in METRICS}}
            for run, sim in zip(case.runs, sims)]


def _loss(rows: list[dict[str, Any]]) -> float:
    total = 0.0
    for row in rows:
        for m, q in METRICS:
            measured, simulated = row[f"{m}.{q}"]
            if measured and simulated:
                total += math.log(simulated / measured) ** 2
    return total


def calibrate(profile: Profile, cases: Seq[Case], max_rounds: int = 10) -> tuple[Service, list[dict[str, Any]]]:
    """The Service on the grid that makes the simulator best match the cases, and its per-run errors. Search:
    each parameter over its whole grid with the others held, then every pair of parameters one grid step
    each way together (slowdown and token_s trade against each other on decode steps, where tokens = rows),
    until neither improves."""
    keys = sorted({pool_key(pool.engine_kwargs()) for c in cases
                   for pool in (c.config.prefill, c.config.decode) if pool.replicas})
    axes = [*GRID.values(), *(SLOWDOWNS for _ in keys)]
    names = [*GRID, *keys]

    measured = Service.of(profile)  # what is measured, not fitted, stays (the KV transfer's speed)

    def service(at: tuple[int, ...]) -> Service:
        values = dict(zip(names, (axis[i] for axis, i in zip(axes, at))))
        return replace(measured, **{k: values[k] for k in GRID}, slowdown={k: values[k] for k in keys})

    seen: dict[tuple[int, ...], float] = {}

    def loss(at: tuple[int, ...]) -> float:
        if at not in seen:
            seen[at] = _loss(errors(profile, service(at), cases))
        return seen[at]

    best = (0,) * len(GRID) + (0,) * len(keys)
    for _ in range(max_rounds):
        before = best
        for a, axis in enumerate(axes):
            best = min((best[:a] + (i,) + best[a + 1:] for i in range(len(axis))), key=loss)
        for a in range(len(axes)):
            for b in range(a + 1, len(axes)):
                for da in (-1, 1):
                    for db in (-1, 1):
                        at = list(best)
                        at[a], at[b] = at[a] + da, at[b] + db
                        if 0 <= at[a] < len(axes[a]) and 0 <= at[b] < len(axes[b]) and loss(tuple(at)) < loss(best):
                            best = tuple(at)
        if best == before:
            break
    return service(best), errors(profile, service(best), cases)


def format_errors(rows: list[dict[str, Any]]) -> str:
    head = "rate  " + "  ".join(f"{m.split('_')[0]} {q} meas/sim ms" for m, q in METRICS)
    lines = [head]
    for row in rows:
        cells = []
        for m, q in METRICS:
            measured, simulated = row[f"{m}.{q}"]
            err = f"{100 * (simulated / measured - 1):+4.0f}%" if measured and simulated else "   -"
            cells.append(f"{measured or 0:7.0f}/{simulated or 0:7.0f} {err}")
        lines.append(f"{row['rate'] or 'inf':<5} " + "  ".join(cells))
    return "\n".join(lines)
