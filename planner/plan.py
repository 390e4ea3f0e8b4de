"""`pdserve plan`: search the layouts a profile can simulate for the one with the most goodput per device.

A layout is a cluster configuration: colocated (decode replicas that prefill too) or split (prefill and decode
replicas), each pool's replicas and pool configuration (TP degree and threads: the profile's pool keys), and,
split, the dispatch (every prompt to the prefill pool, prompts under a threshold on the decode replica, or
`slo_aware`: per request, the path its predictions say keeps more requests within the SLOs, on the rule the
simulator tunes to the traffic, as the router runs it).
Every layout that fits the devices (cores on a CPU host: TP x threads per replica; GPUs: TP per replica) and
whose pools the profile holds is simulated at a rising rate until fewer than `attainment` of its requests
meet both SLOs; its goodput is the highest rate that still did (found by doubling, then bisection), and the
ranking is by goodput per device used."""
from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

from planner.cost import Profile
from planner.simulate import Service, Simulator, Tuner, simulate
from router.dispatch import Rule

THRESHOLDS = (64, 256, 1024)  # conditional dispatch: prompts under this many tokens prefill on the decode replica
DISPATCHES = ("threshold", "slo_aware")  # router.dispatch of a split layout


@dataclass(frozen=True)
class Layout:
    prefill: tuple[int, int, int]  # (replicas, tensor_parallel_size, num_threads); replicas 0: colocated
    decode: tuple[int, int, int]
    threshold: int = 0  # router.local_prefill_threshold
    dispatch: str = "threshold"  # router.dispatch (slo_aware: threshold unused)

    @property
    def devices(self) -> int:
        return sum(n * tp * threads for n, tp, threads in (self.prefill, self.decode))

    def describe(self) -> str:
        d = self.decode
        if not self.prefill[0]:
            return f"colocated {d[0]}x(tp{d[1]}, {d[2]} thr)"
        p = self.prefill
        dispatch = ("slo_aware" if self.dispatch == "slo_aware" else
                    f"conditional < {self.threshold}" if self.threshold else "disaggregated")
        return f"{p[0]}P(tp{p[1]}, {p[2]} thr) + {d[0]}D(tp{d[1]}, {d[2]} thr), {dispatch}"

    def config(self, base):
        (pn, ptp, pth), (dn, dtp, dth) = self.prefill, self.decode
        changes = {"decode.replicas": dn, "decode.tensor_parallel_size": dtp, "decode.num_threads": dth,
                   "decode.num_cpus": float(dth), "prefill.replicas": pn, "router.local_prefill_threshold":
                   self.threshold, "router.dispatch": self.dispatch}
        if self.dispatch == "slo_aware":  # it predicts with the profile planned on, wherever that came from
            changes["router.profile"] = base.router.profile or "(the profile planned on)"
        if pn:
            changes |= {"prefill.tensor_parallel_size": ptp, "prefill.num_threads": pth,
                        "prefill.num_cpus": float(pth)}
        return base.replace(**changes)


@dataclass
class Planned:
    layout: Layout
    goodput: float  # requests/s
    run: dict[str, Any] | None = None  # the simulated run at the goodput rate
    rates_tried: list[tuple[float, float]] = field(default_factory=list)  # (rate, attainment)

    @property
    def per_device(self) -> float:
        return self.goodput / self.layout.devices


def layouts(profile: Profile, devices: int, thresholds: Seq[int] = THRESHOLDS,
            dispatches: Seq[str] = DISPATCHES) -> list[Layout]:
    """Every layout of up to `devices` devices whose pool configurations the profile holds; split ones with each
    of `dispatches` (threshold: every prompt to the prefill pool, then each of `thresholds`)."""
    shapes = sorted({(p.options.get("tensor_parallel_size", 1), p.options.get("num_threads") or 1)
                     for p in profile.pools.values()})
    out = []
    for shape in shapes:
        size = shape[0] * shape[1]
        out += [Layout((0, 1, 1), (n, *shape)) for n in range(1, devices // size + 1)]
    for ps, ds in itertools.product(shapes, shapes):
        for pn in range(1, devices + 1):
            for dn in range(1, devices + 1):
                layout = Layout((pn, *ps), (dn, *ds))
                if layout.devices <= devices:
                    if "threshold" in dispatches:
                        out += [layout] + [Layout(layout.prefill, layout.decode, t) for t in thresholds]
                    if "slo_aware" in dispatches:
                        out.append(Layout(layout.prefill, layout.decode, 0, "slo_aware"))
    return out


def search(config, profile: Profile, requests, ttft_slo: float, tpot_slo: float, attainment: float = 0.9,
           service: Service | None = None, seed: int = 0, steps: int = 6, rule: Rule | None = None
           ) -> tuple[float, dict[str, Any] | None, list[tuple[float, float]]]:
    """(goodput, the simulated run at it, every (rate, attainment) tried) of one cluster configuration: the rate
    doubled from 0.25 req/s until fewer than `attainment` meet both SLOs, then `steps` bisections. requests: a
    list, or a function of the rate giving one (so that a high rate can run long enough to reach its steady
    state). rule: slo_aware's, fixed (None: tuned to the traffic, as router.dispatch_retune_s has it)."""
    best: tuple[float, dict[str, Any] | None] = (0.0, None)
    tried: list[tuple[float, float]] = []
    tuner = None
    if config.router.policy == "slo_aware" and rule is None:  # one for every rate tried: what it picked stays
        tuner = Tuner(config, profile, service or Service.of(profile))

    def meets(rate: float) -> bool:
        nonlocal best
        run = simulate(config, profile, requests(rate) if callable(requests) else requests, rate, seed, ttft_slo,
                       tpot_slo, service, sim=Simulator(config, profile, service, rule, tuner))
        share = run["slo"]["both"] or 0.0
        tried.append((rate, share))
        if share >= attainment and rate > best[0]:
            best = (rate, run)
        return share >= attainment

    lo, hi = 0.0, 0.25
    while meets(hi) and hi < 1e4:  # double until it fails
        lo, hi = hi, 2 * hi
    for _ in range(steps):  # then halve the gap
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    return (*best, tried)


MAX_KV_BLOCKS = 1 << 17  # a simulated replica's KV blocks at most (2M tokens of 16: more than any batch here holds)


def kv_sized(config, profile: Profile):
    """`config` with each pool's num_kv_blocks from its profile's KV room, where the profile knows it (a profile on
    paper, planner/roofline.py: a replica's memory less its weights, which grows with the TP degree)."""
    changes = {}
    for role in ("prefill", "decode"):
        pool = getattr(config, role)
        if pool.replicas:
            tokens = profile.pool(pool.engine_kwargs()).fit.get("kv_tokens")
            if tokens:
                changes[f"{role}.num_kv_blocks"] = min(tokens // pool.block_size, MAX_KV_BLOCKS)
    return config.replace(**changes) if changes else config


def goodput(layout: Layout, base, profile: Profile, requests, ttft_slo: float, tpot_slo: float,
            attainment: float = 0.9, service: Service | None = None, seed: int = 0, steps: int = 6) -> Planned:
    config = kv_sized(layout.config(base), profile)
    if layout.dispatch == "slo_aware":  # its predictions aim at the SLOs planned for
        config = config.replace(**{"router.ttft_slo_s": ttft_slo, "router.tpot_slo_s": tpot_slo})
    rate, run, tried = search(config, profile, requests, ttft_slo, tpot_slo, attainment, service, seed, steps)
    return Planned(layout, rate, run, tried)


def plan(base, profile: Profile, requests, devices: int, ttft_slo: float, tpot_slo: float,
         attainment: float = 0.9, service: Service | None = None, thresholds: Seq[int] = THRESHOLDS,
         seed: int = 0, dispatches: Seq[str] = DISPATCHES) -> list[Planned]:
    """Every layout, best goodput per device first (ties: fewer devices, then the simpler layout: a fixed
    dispatch before slo_aware, a lower threshold before a higher)."""
    found = [goodput(layout, base, profile, requests, ttft_slo, tpot_slo, attainment, service, seed)
             for layout in layouts(profile, devices, thresholds, dispatches)]
    return sorted(found, key=lambda p: (-p.per_device, p.layout.devices, p.layout.dispatch != "threshold",
                                        p.layout.threshold))


def format_plan(found: list[Planned], top: int) -> str:
    head = (f"{'layout':58s} {'devices':>7s} {'goodput':>8s} {'/device':>8s}   TTFT p50/p90 ms   TPOT p50/p90 ms "
            "(at the goodput)")
    lines = [head]
    for p in found[:top]:
        run = p.run
        lat = (f"{run['ttft_ms']['p50']:7.0f}/{run['ttft_ms']['p90']:<7.0f}  {run['tpot_ms']['p50']:7.1f}/"
               f"{run['tpot_ms']['p90']:<7.1f}" if run else "      -            -")
        lines.append(f"{p.layout.describe():58s} {p.layout.devices:7d} {p.goodput:8.2f} {p.per_device:8.2f}   {lat}")
    return "\n".join(lines)


def as_json(found: list[Planned]) -> list[dict[str, Any]]:
    return [{"layout": p.layout.describe(), "prefill": p.layout.prefill, "decode": p.layout.decode,
             "local_prefill_threshold": p.layout.threshold, "dispatch": p.layout.dispatch,
             "devices": p.layout.devices, "goodput_rps": p.goodput,
             "goodput_per_device": p.per_device, "rates_tried": p.rates_tried,
             "at_goodput": {k: p.run[k] for k in ("ttft_ms", "tpot_ms", "slo", "busy_fraction")} if p.run else None}
            for p in found]
