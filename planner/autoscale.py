"""The autoscaler's decisions (router.autoscale; pdserve/supervisor.py runs them in a loop and resizes the pools
with their drain): from what the router observed, how many replicas each pool should have.

Two signals, each per pool, and a pool wants the most of them (within its [min, max]):
- the planner: the fewest replicas with which the simulator (planner/simulate.py, the real scheduler and
  placement over the profile's step models) keeps `attainment` of requests within both SLOs, serving the
  observed length mix at headroom x the observed arrival rate, SIM_SECONDS of it (a steady state, not a burst).
  The decode pool is sized first with the most
  prefill replicas, then the prefill pool with that decode pool. Answers are kept per (rate, mix) bucket, so a
  steady load costs no simulation.
- the load: ongoing requests on the pool / target_ongoing_requests (Ray Serve's signal), for clusters without
  a profile and as a floor when the planner's model runs behind the live cluster.

Hysteresis: a pool grows once every decision for upscale_delay_s wanted more (to the least of them), and
shrinks once every decision for downscale_delay_s wanted fewer (to the most of them); a resize starts the
count again. So a burst shorter than the delay moves nothing, and the pool never goes down and up again on
the noise of one window."""
from __future__ import annotations

import math
from collections.abc import Sequence as Seq
from concurrent.futures import Executor
from dataclasses import dataclass, field

from pdserve.workload import mix_key, mix_requests, steady_count
from planner.answers import Answers
from planner.cost import Profile
from planner.plan import kv_sized
from planner.simulate import Service, Simulator, simulate
from router.dispatch import Rule

POOLS = ("prefill", "decode")
SIM_SECONDS = 10.0  # of arrivals per simulated check (a steady state, not one burst), drawn from the observed mix
SIM_REQUESTS = (64, 1000)  # within these bounds


@dataclass(frozen=True)
class Observation:
    rate: float  # requests/s arriving
    mix: Seq[tuple[int, int]]  # (prompt tokens, output tokens) of recent requests
    ongoing: dict[str, int] = field(default_factory=dict)  # requests on each pool now
    rule: Rule = Rule()  # slo_aware's rule now: the planner sizes the pools for the dispatch they serve under


@dataclass(frozen=True)
class Decision:
    wanted: dict[str, int]  # what each pool wants now (both signals, within bounds)
    planned: dict[str, int] | None  # the planner's part (None: no profile)
    resize: dict[str, int]  # pools to resize now, after hysteresis, to this many replicas


class Autoscaler:
    def __init__(self, config, profile: Profile | None, service: Service | None = None, vocab: int = 1000,
                 seed: int = 0, cache_size: int = 256, executor: Executor | None = None) -> None:
        """config: the cluster's ClusterConfig (its pools' options are what the planner simulates; its
        router.autoscale the bounds, delays and targets; router.ttft_slo_s / tpot_slo_s the SLOs). executor:
        where the simulations run (a process pool, so a serving router's process is not slowed; None: here)."""
        self.base, self.cfg = config, config.router.autoscale
        if profile is not None:  # the pool configurations it will simulate: ValueError naming one it lacks
            for pool in POOLS:
                if self.bounds(pool)[1]:
                    try:
                        profile.pool(getattr(config, pool).engine_kwargs())
                    except ValueError as e:
                        raise ValueError(f"router.autoscale ({pool} pool): {e}") from None
            service = service or Service.of(profile)
        self.profile, self.service = profile, service
        self.vocab, self.seed = vocab, seed
        self.answers = Answers(cache_size, executor)
        self._history: dict[str, list[tuple[float, int]]] = {pool: [] for pool in POOLS}  # (time, wanted)

    @property
    def simulations(self) -> int:  # simulated checks run, for tests and logs
        return self.answers.simulations

    def bounds(self, pool: str) -> tuple[int, int]:
        return getattr(self.cfg, pool)

    def decide(self, now: float, obs: Observation, current: dict[str, int]) -> Decision:
        planned = self.plan(obs.rate, obs.mix, obs.rule) if self.profile is not None else None
        wanted = {}
        for pool in POOLS:
            low, high = self.bounds(pool)
            want = planned[pool] if planned else low
            if self.cfg.target_ongoing_requests:
                want = max(want, math.ceil(obs.ongoing.get(pool, 0) / self.cfg.target_ongoing_requests))
            wanted[pool] = min(max(want, low), high)
        resize = {}
        for pool in POOLS:
            n = self._hysteresis(pool, now, wanted[pool], current[pool])
            if n is not None:
                resize[pool] = n
        return Decision(wanted, planned, resize)

    def _hysteresis(self, pool: str, now: float, want: int, have: int) -> int | None:
        history = self._history[pool]
        history.append((now, want))
        # the decisions since the last one that wanted what the pool has (or went the other way)
        run: list[int] = []
        for t, w in reversed(history):
            if (w > have) != (want > have) or w == have:
                break
            run.append(w)
        del history[:len(history) - len(run)]
        if want == have or not run:
            return None
        delay = self.cfg.upscale_delay_s if want > have else self.cfg.downscale_delay_s
        if now - history[0][0] < delay:
            return None
        history.clear()  # a resize starts the count again
        return min(run) if want > have else max(run)

    def plan(self, rate: float, mix: Seq[tuple[int, int]], rule: Rule = Rule()) -> dict[str, int]:
        """The fewest replicas per pool that the simulator says meet the SLOs at headroom x rate (under slo_aware's
        `rule`, where the cluster dispatches so)."""
        lows = {pool: self.bounds(pool)[0] for pool in POOLS}
        target = rate * self.cfg.headroom
        if target <= 0 or not mix:
            return lows

        def args() -> tuple:
            requests = mix_requests(mix, steady_count(target, SIM_SECONDS, *SIM_REQUESTS), self.vocab, self.seed)
            return self.base, self.profile, self.service, requests, target, self.seed, rule

        return self.answers.get((mix_key(target, mix), rule), size_pools, args)


def size_pools(base, profile: Profile, service: Service | None, requests, rate: float, seed: int,
               rule: Rule = Rule()) -> tuple[dict[str, int], int]:
    """({pool: replicas}, simulations run): the decode pool's fewest replicas that keep base.router.autoscale's
    attainment within both SLOs at `rate` with the most prefill replicas, then the prefill pool's with that.
    slo_aware dispatch keeps `rule` throughout (the tuner's answer for the mix, not tuned again in each run)."""
    cfg, r = base.router.autoscale, base.router
    (p_low, p_high), (d_low, d_high) = cfg.prefill, cfg.decode
    ran = 0

    def meets(prefill: int, decode: int) -> bool:
        nonlocal ran
        ran += 1
        config = kv_sized(base.replace(**{"prefill.replicas": prefill, "decode.replicas": decode}), profile)
        run = simulate(config, profile, requests, rate, seed, r.ttft_slo_s, r.tpot_slo_s, service,
                       sim=Simulator(config, profile, service, rule=rule))
        return (run["slo"]["both"] or 0.0) >= cfg.attainment

    decode = next((d for d in range(d_low, d_high + 1) if meets(p_high, d)), d_high)
    prefill = next((p for p in range(p_low, p_high) if meets(p, decode)), p_high)
    return {"prefill": prefill, "decode": decode}, ran
