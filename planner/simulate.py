"""`pdserve simulate`: a workload through a discrete-event model of a cluster, on a simulated clock.

What decides is the real code: each replica is the engine's own Scheduler and BlockManager (chunked
prefill, continuous batching, preemption, the prefix cache over the prompts' real token ids), and the
router's placement policies (router/placement.py) order the replicas, seeing each replica's prefix cache
as the router's index does (refreshed by a stats poll every POLL_S). Only time is modelled: a step lasts
what the pool's fitted step model (planner/cost.py, from `pdserve profile`) says for the batch the
scheduler formed, and the service's own hops take the profile's `service` seconds:

    request_s   arrival -> the request is placed (router: validate, tokenize, admit, reserve)
    hop_s       a replica's answer reaching the router (the prefill result, each streamed token) and the
                router's call reaching a replica (the commit that starts the decode)
    kv_gbs      per KV backend, as measured: the commit also waits for the last layer's KV of the prompt's
                last prefill step (kv_layer_bytes a token), which the layer-by-layer push could not hide
    slowdown    per pool configuration, how much slower its forward runs in the cluster than alone in
                `pdserve profile` (the cores it shares with the other pools and the service)
    step_s      each engine step's own cost past the model's forward (scheduling, bookkeeping, the worker's
                events)
    token_s     each token a step samples: the CPU the rest of the service spends streaming it (the replica's
                Ray and asyncio threads, the router, the client), which on a host whose engines use every core
                is taken from the steps

The request path is the router's (_generate): a prompt shorter than local_prefill_threshold, or any when no
prefill replica is up, prefills on its decode replica; otherwise the decode replica reserves its blocks
(retrying every RESERVE_RETRY_S while none has them), a prefill replica computes the prompt and samples the
first token (its KV is pushed layer by layer as it goes: only the last layer's is left past the hop), the router streams
that token and commits the request to the decode replica, which decodes the rest. At most
max_ongoing_requests are placed at once; the rest queue in arrival order. With router.dispatch slo_aware, the
router's own predictions place each prompt, under the rule a Tuner (below) picks every dispatch_retune_s from
the simulated traffic so far, as the supervisor's does from the live one.

The output is the dict `pdserve bench --json` writes for one run (pdserve.bench_stats.summarize), so the
same report, plots and goodput read a simulated run and a measured one."""
from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from engine.block_manager import BlockManager
from engine.options import EngineOptions
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence
from pdserve.workload import mix_requests, mix_shape, steady_count
from planner.answers import Answers
from planner.cost import Profile, StepModel, pool_key
from router.cache_index import Prompt
from router.dispatch import Load, Rule, SloAware
from router.dispatch import Prediction as SloPrediction
from router.placement import DECODE_POLICIES, PREFILL_POLICIES, RESERVE_RETRY_S, Replica
from router.traffic import Traffic

OUTPUT_TOKEN = 1  # the id every simulated output token gets (nothing reads it but the prefix cache)
POLL_S = 0.25  # how often the router polls the replicas' stats (router.Router._poll_stats)


@dataclass
class Service:
    """Seconds the service adds around the engines' steps (see the module's docstring)."""
    request_s: float = 0.0
    hop_s: float = 0.0
    step_s: float = 0.0
    token_s: float = 0.0
    slowdown: dict[str, float] = field(default_factory=dict)  # pool key (planner.cost.pool_key) -> factor; 1 if absent
    # measured by `pdserve profile`, not fitted: GB/s each KV backend moves a prompt's KV at, and one token's K
    # and V in one layer: the last layer of a prompt's last prefill step is what the layer-by-layer push
    # cannot hide behind compute, so the commit that starts its decode waits for it
    kv_gbs: dict[str, float] = field(default_factory=dict)
    kv_layer_bytes: float = 0.0

    def kv_exposed_s(self, backend: str, tokens: int) -> float:
        """Seconds the decode start waits past the prefill for the last layer's KV of `tokens` tokens."""
        gbs = self.kv_gbs.get(backend)
        return tokens * self.kv_layer_bytes / (gbs * 1e9) if gbs else 0.0

    @classmethod
    def of(cls, profile: Profile) -> Service:
        return cls(**{k: v for k, v in profile.service.items() if k in cls.__dataclass_fields__})


@dataclass
class SimRequest:
    rid: str
    prompt: list[int]
    output_len: int
    arrival: float
    seq: Sequence | None = None  # on its decode replica
    decode: Replica | None = None
    prefill: Replica | None = None
    local: bool = False
    first_at: float | None = None
    times: list[float] = field(default_factory=list)  # when each output token reached the client
    placed_at: float | None = None
    prefilled_at: float | None = None
    prediction: SloPrediction | None = None  # slo_aware: what decided its path
    key: Prompt | None = None  # the prompt as placement sees it, and the sequence a decode replica will take:
    pending: Sequence | None = None  # made once (their block keys with them), however often the router retries


class SimEngine:
    """One replica's engine on the simulated clock: the real scheduler and block manager, the step model's time."""

    def __init__(self, options: EngineOptions, step: StepModel, num_blocks: int, service: Service,
                 slowdown: float = 1.0, clock: Callable[[], float] | None = None) -> None:
        self.options, self.step_model, self.service, self.slowdown = options, step, service, slowdown
        self.block_manager = BlockManager(num_blocks, options.block_size, options.enable_prefix_caching)
        # the simulated clock for max_queue_wait_s (an engine of its own: one that stands still)
        self.scheduler = Scheduler(options, self.block_manager, clock or (lambda: 0.0))
        self.busy = False
        self.busy_s = 0.0
        self.owner: dict[int, SimRequest] = {}  # seq_id -> request
        self.free_seen = num_blocks  # free blocks when the simulator last looked (Simulator._sync)

    def step(self) -> tuple[SchedulerOutput, float]:
        out = self.scheduler.schedule()
        chunks = [(n, s.num_computed_tokens, s.num_computed_tokens + n == s.num_tokens)
                  for s, n in zip(out.seqs, out.num_scheduled_tokens)]
        sampled = sum(c[2] for c in chunks)
        svc = self.service
        seconds = self.slowdown * self.step_model.step_seconds(chunks) + svc.step_s + svc.token_s * sampled
        self.scheduler.costs.record(out, seconds)  # what step_time_target_s sizes chunks by, as the engine does
        return out, seconds

    def finish_step(self, out: SchedulerOutput) -> list[tuple[Sequence, bool]]:
        """Advance, sample: [(sequence that got a token, whether it is done)], as LLMEngine.step does."""
        sampled = [s for s, n in zip(out.seqs, out.num_scheduled_tokens) if s.num_computed_tokens + n == s.num_tokens]
        self.scheduler.advance(out)
        got = []
        for seq in sampled:
            seq.token_ids.append(OUTPUT_TOKEN)
            done = seq.num_output_tokens >= seq.params.max_tokens
            if done:
                self.scheduler.finish(seq, "length")
            got.append((seq, done))
        return got


class Simulator:
    """A cluster (pdserve.config.ClusterConfig) under a workload, on the step models of `profile`."""

    def __init__(self, config, profile: Profile, service: Service | None = None, rule: Rule | None = None,
                 tuner=None) -> None:
        """rule: slo_aware's, fixed (None: as router.dispatch_retune_s has it, tuned to the simulated traffic by
        `tuner`, a planner.simulate.Tuner of this config, or a new one)."""
        self.config, self.router = config, config.router
        self.backend = config.kv_backend_on(one_host=not config.ray_address)  # auto as its cluster resolves it
        self.service = service or Service.of(profile)
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self.prefill = [self._replica("prefill", i, config.prefill, profile) for i in range(config.prefill.replicas)]
        self.decode = [self._replica("decode", i, config.decode, profile) for i in range(config.decode.replicas)]
        self.dispatch, self.tuner = None, None
        if self.router.policy == "slo_aware":  # the router's own dispatch, on this simulation's service costs
            self.dispatch = SloAware.from_profile(replace(profile, service=asdict(self.service)), config.prefill,
                                                  config.decode, self.router.ttft_slo_s, self.router.tpot_slo_s)
            if rule is not None:
                self.dispatch = replace(self.dispatch, rule=rule)
            elif self.router.dispatch_retune_s > 0 and config.prefill.replicas:
                tuner = tuner or Tuner(config, profile, self.service)
                self.tuner = tuner
                if tuner.last is not None:  # a tuner that has seen traffic before: a cluster that has been serving
                    self.dispatch = replace(self.dispatch, rule=tuner.last)
        self.traffic = Traffic(started=0.0)  # what the tuner sees, on a clock that runs on across runs
        self._epoch = 0.0  # where this run's time 0 is on it
        self._pick_prefill = PREFILL_POLICIES[self.router.prefill_policy]()
        self._order_decode = DECODE_POLICIES[self.router.decode_policy]()
        self.ongoing = 0
        self.queue: deque[SimRequest] = deque()
        self._parked: list[tuple[SimRequest, float]] = []  # (request, its last try) waiting for decode blocks

    def _replica(self, role: str, index: int, pool, profile: Profile) -> Replica:
        try:
            step = profile.pool(pool.engine_kwargs()).step
        except ValueError as e:
            raise ValueError(f"the {role} pool: {e}") from None
        slowdown = self.service.slowdown.get(pool_key(pool.engine_kwargs()), 1.0)
        engine = SimEngine(EngineOptions(**pool.engine_kwargs()), step, pool.num_kv_blocks or 1024, self.service,
                           slowdown, clock=lambda: self.now)
        # the engine stands where the router keeps a replica's actor handle
        r = Replica(role, index, actor=engine, tensor_parallel_size=pool.tensor_parallel_size,
                    block_size=pool.block_size)
        r.free_blocks = engine.block_manager.num_free_blocks
        return r

    # the clock
    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._order), fn))

    def run(self, requests: Seq[tuple[list[int], int]], arrivals: Seq[float]) -> list[SimRequest]:
        """Send the requests at their arrival times (seconds from now = 0) and run until all have ended. A later
        run starts on the replicas as this one left them (their prefix caches), as a benchmark's next run does."""
        self.now = 0.0
        reqs = [SimRequest(str(i), list(p), n, t) for i, ((p, n), t) in enumerate(zip(requests, arrivals))]
        for r in reqs:
            self.at(r.arrival, lambda r=r: self._arrived(r))
        self._unfinished = len(reqs)
        self._poll()
        if self.tuner is not None:
            self.at(self.router.dispatch_retune_s, self._retune)
        while self._events:
            self.now, _, fn = heapq.heappop(self._events)
            fn()
        self._epoch += self.now + self.router.dispatch_window_s
        return reqs

    # the router
    def _retune(self) -> None:
        """slo_aware's rule, picked again from the traffic of the last window (the supervisor's tuning loop)."""
        seen = self.traffic.window(self.router.dispatch_window_s, self._epoch + self.now)
        if (rule := self.tuner.pick(seen.rate, seen.mix)) is not None:
            self.dispatch = replace(self.dispatch, rule=rule)
        if self._unfinished:
            self.at(self.now + self.router.dispatch_retune_s, self._retune)

    def _arrived(self, r: SimRequest) -> None:
        self.traffic.arrived(len(r.prompt), r.output_len, self._epoch + self.now)
        self._arrive(r)

    def _arrive(self, r: SimRequest) -> None:
        if self.ongoing < self.router.max_ongoing_requests:
            self.ongoing += 1
            self.at(self.now + self.service.request_s, lambda: self._place(r))
        else:
            self.queue.append(r)

    def _place(self, r: SimRequest) -> None:
        threshold = self.router.local_prefill_threshold
        if r.key is None:
            params = SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
            r.key, r.pending = Prompt(r.prompt), Sequence(r.prompt, params, seed=0, request_id=r.rid)
        prompt, seq = r.key, r.pending
        order = self._order_decode(self.decode, prompt)
        if self.dispatch is not None and self.prefill:
            if r.prediction is None:  # decided once: a retry only asks for the blocks again, as the router does
                d = order[0]
                r.prediction = self.dispatch.decide(len(r.prompt), r.output_len,
                                                    Load.of(d.stats, d.block_size, d.local_tokens),
                                                    min(p.queued_tokens for p in self.prefill))
            local = r.prediction.local
        else:
            local = len(r.prompt) < threshold or not self.prefill
        for d in order:
            engine: SimEngine = d.actor
            bm = engine.block_manager
            prefix = [] if local else bm.match_prefix(seq)
            if local or seq.num_prompt_tokens - len(prefix) * bm.block_size < threshold:
                r.local = True
            elif bm.can_allocate(seq, seq.num_prompt_tokens, prefix):
                bm.allocate(seq, seq.num_prompt_tokens, prefix)
                seq.num_cached_tokens = len(prefix) * bm.block_size
            else:
                continue
            r.seq, r.decode, r.placed_at = seq, d, self.now
            d.in_flight += 1
            engine.owner[seq.seq_id] = r
            if r.local:
                d.local_tokens += len(r.prompt)
                engine.scheduler.add(seq)
                self._kick(d)
            else:
                self._prefill_remote(r, prompt)
            self._sync(d)
            return
        # every decode replica is full: the router asks again every RESERVE_RETRY_S. The first time it can succeed
        # is the first of those ticks after some decode replica freed blocks (_wake), so it waits until then
        # (under KV pressure, most of a run's events were such retries)
        self._parked.append((r, self.now))

    def _prefill_remote(self, r: SimRequest, prompt: Prompt) -> None:
        p = self._pick_prefill(self.prefill, prompt)
        r.prefill = p
        p.queued_tokens += len(r.prompt)
        engine: SimEngine = p.actor
        seq = Sequence(r.prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), seed=0,
                       request_id=r.rid)
        engine.owner[seq.seq_id] = r
        engine.scheduler.add(seq, output_tokens=r.output_len)  # as a prefill replica orders (kv_transfer.sender)
        self._kick(p)

    def _prefilled(self, r: SimRequest) -> None:
        """The prefill result reached the router: the first token streams, the commit goes to the decode replica."""
        r.prefill.queued_tokens -= len(r.prompt)
        r.prefilled_at = self.now
        self._token(r, self.now)
        if r.output_len == 1:
            r.decode.actor.block_manager.free(r.seq)
            self._sync(r.decode)
            self._done(r)
            return
        last_step = min(len(r.prompt), r.prefill.actor.options.max_num_batched_tokens)
        kv_s = self.service.kv_exposed_s(self.backend, last_step)
        self.at(self.now + self.service.hop_s + kv_s, lambda: self._commit(r))

    def _commit(self, r: SimRequest) -> None:
        seq, engine = r.seq, r.decode.actor
        seq.num_computed_tokens = seq.num_prompt_tokens
        engine.block_manager.cache_full_blocks(seq)
        seq.token_ids.append(OUTPUT_TOKEN)
        engine.scheduler.add(seq)
        self._kick(r.decode)

    def _token(self, r: SimRequest, at: float) -> None:
        r.first_at = at if r.first_at is None else r.first_at
        r.times.append(at)

    def _poll(self) -> None:
        """The router's stats poll: what each replica's prefix cache holds, as its index would have it after
        applying the poll's report (placement.Placement.refresh_stats), every POLL_S while requests are out."""
        for replica in (*self.prefill, *self.decode):
            bm, sched = replica.actor.block_manager, replica.actor.scheduler
            replica.cache.keys = set(bm.cached_blocks)
            replica.local_tokens = 0
            replica.stats = {"running": len(sched.running), "kv_blocks_used": bm.num_blocks - bm.num_free_blocks,
                             "waiting_prefill_tokens": sum(s.num_tokens - s.num_computed_tokens
                                                           for s in (*sched.waiting, *sched.running)
                                                           if s.num_computed_tokens < s.num_prompt_tokens)}
        if self._unfinished:
            self.at(self.now + POLL_S, self._poll)

    def _done(self, r: SimRequest) -> None:
        self.traffic.finished(len(r.prompt), len(r.times))
        self._unfinished -= 1
        r.decode.in_flight -= 1
        self._sync(r.decode)
        self.ongoing -= 1
        if self.queue:
            self._arrive(self.queue.popleft())

    # the replicas
    def _kick(self, replica: Replica) -> None:
        """Start a step on an idle replica with work."""
        engine: SimEngine = replica.actor
        if engine.busy or not engine.scheduler.has_unfinished():
            return
        out, seconds = engine.step()
        self._wake(replica)  # a preemption frees blocks as the step is scheduled: a waiting reservation may take them
        if out.is_empty:
            return  # nothing fits now; a commit, a finish or a new request kicks it again
        engine.busy, engine.busy_s = True, engine.busy_s + seconds
        self.at(self.now + seconds, lambda: self._stepped(replica, out))

    def _stepped(self, replica: Replica, out: SchedulerOutput) -> None:
        engine: SimEngine = replica.actor
        engine.busy = False
        arrive = self.now + self.service.hop_s
        for seq, done in engine.finish_step(out):
            r = engine.owner[seq.seq_id]
            if replica.role == "prefill":
                del engine.owner[seq.seq_id]
                self.at(arrive, lambda r=r: self._prefilled(r))
                continue
            self.at(arrive, lambda r=r: self._token(r, self.now))
            if done:
                del engine.owner[seq.seq_id]
                self.at(arrive, lambda r=r: self._done(r))
        self._sync(replica)
        self._kick(replica)

    def _sync(self, replica: Replica) -> None:
        replica.free_blocks = replica.actor.block_manager.num_free_blocks
        self._wake(replica)

    def _wake(self, replica: Replica) -> None:
        """Blocks freed on a decode replica: the reservations waiting for some ask again, each at its next tick."""
        engine: SimEngine = replica.actor
        before, engine.free_seen = engine.free_seen, engine.block_manager.num_free_blocks
        if engine.free_seen > before and self._parked and replica.role == "decode":
            parked, self._parked = self._parked, []
            for r, last in parked:  # each at its own next retry tick
                ticks = max(1, math.ceil((self.now - last) / RESERVE_RETRY_S - 1e-9))
                self.at(last + ticks * RESERVE_RETRY_S, lambda r=r: self._place(r))


def results(reqs: Seq[SimRequest]):
    """The requests as the benchmark's client would have seen them (pdserve.request_result.RequestResult)."""
    from pdserve.request_result import RequestResult

    out = []
    for r in reqs:
        res = RequestResult(prompt_len=len(r.prompt), output_len=r.output_len, send_time=r.arrival)
        for t in r.times:
            res.arrived(t - r.arrival)
        res.num_output_tokens = len(r.times)
        res.e2e = r.times[-1] - r.arrival if r.times else None
        if not r.times:
            res.status, res.error = "NOT_FINISHED", "the simulation ended before it did"
        prefill_ms = ((r.prefilled_at or r.first_at or 0) - (r.placed_at or 0)) * 1e3
        res.server = {"path": "local" if r.local else "disaggregated",
                      "dispatch_reason": r.prediction.reason if r.prediction else "threshold",
                      "queue_ms": ((r.placed_at or 0) - r.arrival) * 1e3, "prefill_ms": prefill_ms}
        out.append(res)
    return out


def simulate(config, profile: Profile, requests: Seq[tuple[list[int], int]], rate: float | None, seed: int = 0,
             ttft_slo: float = 1.0, tpot_slo: float = 0.2, service: Service | None = None,
             sim: Simulator | None = None) -> dict[str, Any]:
    """One simulated run: `requests` (pdserve.workload.make_requests) at `rate` requests/s, Poisson arrivals
    with `seed` (None or inf: all at once), through `config` on `profile` (on `sim`, a Simulator earlier runs
    left, if given). Returns summarize's dict as `pdserve bench` does, plus each replica's busy fraction."""
    from pdserve.bench_stats import summarize
    from pdserve.workload import arrival_times

    sim = sim or Simulator(config, profile, service)
    replicas = (*sim.prefill, *sim.decode)
    busy = [r.actor.busy_s for r in replicas]
    reqs = sim.run(requests, arrival_times(len(requests), rate, seed))
    duration = max((r.times[-1] for r in reqs if r.times), default=0.0)
    run = {"rate": None if rate is None or math.isinf(rate) else rate, "concurrency": None, "seed": seed,
           "backend": "simulated", **summarize(results(reqs), duration, ttft_slo, tpot_slo)}
    run["busy_fraction"] = {r.name: (r.actor.busy_s - b) / max(duration, 1e-9) for r, b in zip(replicas, busy)}
    return run


def simulate_sweep(config, profile: Profile, requests, rates: Seq[float | None], seed: int = 0,
                   ttft_slo: float = 1.0, tpot_slo: float = 0.2, service: Service | None = None,
                   warmup: Seq[tuple[list[int], int]] = ()) -> list[dict[str, Any]]:
    """pdserve bench's sweep on one simulated cluster: the warmup requests all at once, then one run per rate, in
    order, each starting where the last left the replicas (so a prompt sent again may find its prefix cached).
    requests: the same for every rate, or a list of them, one per rate."""
    from pdserve.workload import per_rate

    sim = Simulator(config, profile, service)  # one tuner (slo_aware) over the sweep, as the router's
    if warmup:
        sim.run(warmup, [0.0] * len(warmup))
    return [simulate(config, profile, reqs, rate, seed, ttft_slo, tpot_slo, sim=sim)
            for reqs, rate in zip(per_rate(requests, len(rates)), rates)]


# slo_aware's rule, tuned to the traffic
RULE_THRESHOLDS = (0, 128, 256, 512, 1024)
RULES = (Rule(None), *(Rule(t, override) for t in RULE_THRESHOLDS for override in (False, True)))
TUNE_ATTAINMENT = 0.9  # the share within both SLOs a rule must keep at a rate to serve it
TUNE_SECONDS = 20.0  # of arrivals per simulated rate (a steady state, not one burst), drawn from the observed mix
TUNE_REQUESTS = (48, 400)  # within these bounds
TUNE_MIN_MIX = 32  # requests seen before the first pick (a mix of fewer says little about the next ones)
TUNE_STEPS = 4  # bisections of the rate between the last at which several rules held and the first at which none did


def score(run: dict) -> tuple[float, float]:
    """Higher is better: the share within both SLOs, then the room the p90s leave under their targets."""
    slo = run["slo"]
    ttft, tpot = run["ttft_ms"].get("p90"), run["tpot_ms"].get("p90")
    worst = max((ttft or math.inf) / (1e3 * slo["ttft_s"]), (tpot or 0.0) / (1e3 * slo["tpot_s"]))
    return slo["both"] or 0.0, -worst


def best_rule(config, profile: Profile, service: Service | None, mix: Seq[tuple[int, int]], rate: float,
              vocab: int, seed: int = 0) -> tuple[Rule, int]:
    """(the candidate rule with the highest simulated goodput on `mix` through `config`, simulations run): every
    rule serves the same requests at `rate`, then at twice it while more than one holds TUNE_ATTAINMENT, then
    bisects between the last rate at which several held and the first at which none did; the last rule left
    holding wins (several: the best score at the highest rate they held)."""
    r = config.router
    fixed = config.replace(**{"router.dispatch": "slo_aware", "router.dispatch_retune_s": 0.0})
    ran = 0

    def scores(rules: Seq[Rule], at: float) -> list[tuple[tuple[float, float], int, Rule]]:
        nonlocal ran
        requests = mix_requests(mix, steady_count(at, TUNE_SECONDS, *TUNE_REQUESTS), vocab, seed)
        ran += len(rules)
        return [(score(simulate(fixed, profile, requests, at, seed, r.ttft_slo_s, r.tpot_slo_s, service,
                                sim=Simulator(fixed, profile, service, rule=rule))), -RULES.index(rule), rule)
                for rule in rules]

    def holding(scored):
        return [x for x in scored if x[0][0] >= TUNE_ATTAINMENT]

    at = max(rate, 1e-3)
    scored = scores(RULES, at)
    while not holding(scored) and at > rate / 64:  # none holds here: lower, to where some do
        at /= 2
        scored = scores(RULES, at)
    held = holding(scored) or [max(scored)]
    lo, hi, steps = at, None, 0
    while len(held) > 1 and steps < TUNE_STEPS and lo < 1e4:
        at = 2 * lo if hi is None else (lo + hi) / 2
        now = holding(scores([x[2] for x in held], at))
        if now:
            lo, held = at, now
        else:
            hi = at
        steps += hi is not None
    return max(held)[2], ran


class Tuner:
    """slo_aware's rule, tuned to the traffic (router.dispatch_retune_s; the supervisor runs it in a loop, and so
    does a simulated cluster): which rule decides a request's path where its per-request predictions
    (router/dispatch.py) do not.

    The predictions see one request and the load now, not the requests about to arrive: a chat sent to an idle
    prefill replica looks free until a document queues behind it, a document prefilled on the decode replica
    looks harmless until the chats after it wait through its chunks. Which split pays is a property of the
    traffic (its length mix and rate) and the hardware, so the simulator answers it (best_rule): every rule of
    RULES serves requests drawn from the observed mix (fresh prompts, TUNE_SECONDS of arrivals a rate) through
    the cluster's own pools, and the one with the most goodput wins:

        least delay                 the predictions alone: fewer requests outside the SLOs, then the least delay in
                                    all (the rule before any traffic has been seen)
        local under T tokens        a size split: prompts under T prefill on the decode replica, the rest on the
                                    prefill pool (chats never queue behind documents, documents never stall decodes)
        ... with SLO override       the same, but a request goes the other way when the predictions say that keeps
                                    more requests within the SLOs (a backed-up prefill replica, an idle decode one)

    The answer depends on the mix, not on the rate now, so it is kept per mix shape (mix_shape), and a shape
    next to the one the rule was picked for keeps it: a steady mix costs no simulation, and the rule does not
    flip between two that serve it about as well as the sample of recent requests wobbles."""

    def __init__(self, config, profile: Profile, service: Service | None = None, vocab: int = 1000, seed: int = 0,
                 cache_size: int = 256, executor: Executor | None = None) -> None:
        self.config, self.profile, self.service = config, profile, service
        self.vocab, self.seed = vocab, seed
        self.answers = Answers(cache_size, executor)
        self.last: Rule | None = None  # the latest pick
        self._shape: tuple[int, ...] | None = None  # the mix shape it was picked for

    def pick(self, rate: float, mix: Seq[tuple[int, int]]) -> Rule | None:
        """The rule for `mix` ((prompt tokens, output tokens) of recent requests), arriving at `rate` requests/s
        now (where the search starts); None while fewer than TUNE_MIN_MIX have been seen."""
        if rate <= 0 or len(mix) < TUNE_MIN_MIX:
            return None
        shape = mix_shape(mix)
        if self._shape is not None and max(abs(a - b) for a, b in zip(shape, self._shape)) <= 1:
            return self.last  # a neighbouring shape: the same traffic, seen through another sample of it
        args = (self.config, self.profile, self.service, tuple(mix), rate, self.vocab, self.seed)
        self._shape, self.last = shape, self.answers.get(shape, best_rule, lambda: args)
        return self.last
