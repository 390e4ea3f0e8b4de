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
first token (its KV is pushed layer by layer as it goes: no time of its own past the hop), the router streams
that token and commits the request to the decode replica, which decodes the rest. At most
max_ongoing_requests are placed at once; the rest queue in arrival order.

The output is the dict `pdserve bench --json` writes for one run (pdserve.bench_stats.summarize), so the
same report, plots and goodput read a simulated run and a measured one."""
from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from engine.block_manager import BlockManager
from engine.options import EngineOptions
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence
from planner.cost import Profile, StepModel, pool_key
from router.cache_index import Prompt
from router.dispatch import Load, SloAware
from router.dispatch import Prediction as SloPrediction
from router.placement import DECODE_POLICIES, PREFILL_POLICIES, RESERVE_RETRY_S, Replica

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


class SimEngine:
    """One replica's engine on the simulated clock: the real scheduler and block manager, the step model's time."""

    def __init__(self, options: EngineOptions, step: StepModel, num_blocks: int, service: Service,
                 slowdown: float = 1.0) -> None:
        self.options, self.step_model, self.service, self.slowdown = options, step, service, slowdown
        self.block_manager = BlockManager(num_blocks, options.block_size, options.enable_prefix_caching)
        self.scheduler = Scheduler(options, self.block_manager)
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

    def __init__(self, config, profile: Profile, service: Service | None = None) -> None:
        self.config, self.router = config, config.router
        self.service = service or Service.of(profile)
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self.prefill = [self._replica("prefill", i, config.prefill, profile, self.service)
                        for i in range(config.prefill.replicas)]
        self.decode = [self._replica("decode", i, config.decode, profile, self.service)
                       for i in range(config.decode.replicas)]
        self.dispatch = None
        if self.router.dispatch == "slo_aware":  # the router's own dispatch, on this simulation's service costs
            self.dispatch = SloAware.from_profile(replace(profile, service=asdict(self.service)), config.prefill,
                                                  config.decode, self.router.ttft_slo_s, self.router.tpot_slo_s)
        self._pick_prefill = PREFILL_POLICIES[self.router.prefill_policy]()
        self._order_decode = DECODE_POLICIES[self.router.decode_policy]()
        self.ongoing = 0
        self.queue: deque[SimRequest] = deque()
        self._parked: list[tuple[SimRequest, float]] = []  # (request, its last try) waiting for decode blocks

    @staticmethod
    def _replica(role: str, index: int, pool, profile: Profile, service: Service) -> Replica:
        try:
            step = profile.pool(pool.engine_kwargs()).step
        except ValueError as e:
            raise ValueError(f"the {role} pool: {e}") from None
        slowdown = service.slowdown.get(pool_key(pool.engine_kwargs()), 1.0)
        engine = SimEngine(EngineOptions(**pool.engine_kwargs()), step, pool.num_kv_blocks or 1024, service, slowdown)
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
            self.at(r.arrival, lambda r=r: self._arrive(r))
        self._unfinished = len(reqs)
        self._poll()
        while self._events:
            self.now, _, fn = heapq.heappop(self._events)
            fn()
        return reqs

    # the router
    def _arrive(self, r: SimRequest) -> None:
        if self.ongoing < self.router.max_ongoing_requests:
            self.ongoing += 1
            self.at(self.now + self.service.request_s, lambda: self._place(r))
        else:
            self.queue.append(r)

    def _place(self, r: SimRequest) -> None:
        threshold = self.router.local_prefill_threshold
        prompt = Prompt(r.prompt)
        if self.dispatch is not None and self.prefill:
            d = self._order_decode(self.decode, prompt)[0]
            r.prediction = self.dispatch.decide(len(r.prompt), r.output_len,
                                                Load.of(d.stats, d.block_size, d.local_tokens),
                                                min(p.queued_tokens for p in self.prefill))
            local = r.prediction.local
        else:
            local = len(r.prompt) < threshold or not self.prefill
        params = SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
        for d in self._order_decode(self.decode, prompt):
            engine: SimEngine = d.actor
            seq = Sequence(r.prompt, params, seed=0, request_id=r.rid)
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
        # every decode replica is full: the router asks again every RESERVE_RETRY_S. With the threshold, the first
        # time it can succeed is the first of those ticks after some decode replica freed blocks (_wake), so it
        # waits until then (under KV pressure, most of a run's events were such retries); slo_aware decides
        # again at each (a later decision may prefill locally, which reserves nothing)
        if self.dispatch is None:
            self._parked.append((r, self.now))
        else:
            self.at(self.now + RESERVE_RETRY_S, lambda: self._place(r))

    def _prefill_remote(self, r: SimRequest, prompt: Prompt) -> None:
        p = self._pick_prefill(self.prefill, prompt)
        r.prefill = p
        p.queued_tokens += len(r.prompt)
        engine: SimEngine = p.actor
        seq = Sequence(r.prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), seed=0,
                       request_id=r.rid)
        engine.owner[seq.seq_id] = r
        engine.scheduler.add(seq)
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
        self.at(self.now + self.service.hop_s, lambda: self._commit(r))

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

    sim = Simulator(config, profile, service)
    if warmup:
        sim.run(warmup, [0.0] * len(warmup))
    return [simulate(config, profile, reqs, rate, seed, ttft_slo, tpot_slo, sim=sim)
            for reqs, rate in zip(per_rate(requests, len(rates)), rates)]
