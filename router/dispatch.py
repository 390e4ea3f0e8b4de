"""Where a prompt prefills: on its decode replica (local) or on a prefill replica (disaggregated).

`threshold` (the default): a prompt under router.local_prefill_threshold tokens prefills locally.
`slo_aware`: per request, the step models of a profile (planner/cost.py) and the replicas' live load predict
the time to first token of each path and the time per output token the decode replica's running requests
would see, and the path that leaves fewer requests outside the SLOs wins. When both leave as many outside
(none, usually), the path that delays requests less in all wins: this one's first token, plus, locally, the
time each running decode waits through the prefill's steps beyond its own (request-seconds):

    local           the decode replica prefills the prompt (and the prompts queued there before it) in chunks
                    of what its token budget leaves beside its running decodes: TTFT is the sum of those mixed
                    steps; each of them is also a step the running decodes wait through, so their TPOT grows by
                    the steps' excess over a decode-only step, spread over an output of max_tokens
    disaggregated   the least-loaded prefill replica prefills the tokens queued there and the prompt in chunks
                    alone, and the first token takes a hop back; the decodes keep their decode-only steps

A rule tuned to the traffic sits under those predictions (planner.simulate.Tuner picks it every router.dispatch_retune_s
from what arrived): `threshold` T makes prompts under T tokens prefill locally and the rest remotely (a size
split: short prompts never queue behind long ones), and with `override` the predictions move a request off that
path when the other keeps more requests inside the SLOs. threshold None is the rule above (fewest outside, then
the least delay), which serves until the traffic has been seen.

Standard library and the router's own types only: the router's process loads it (no torch)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from planner.cost import StepModel

DISPATCH = ("auto", "threshold", "slo_aware")  # auto: slo_aware with a profile, else threshold
# the most steps a local prefill's prediction walks through (on the router's loop, once a request): where the
# decodes leave a chunk of a few tokens and many are queued, the chunks are widened to fit (such a wait is far past
# any TTFT target, so the prediction need not be finer)
MAX_PREDICTED_STEPS = 256


@dataclass(frozen=True)
class Load:
    """A decode replica as its last stats poll saw it."""
    running: int = 0  # sequences in its batch
    waiting_prefill_tokens: int = 0  # prompt tokens queued there, not yet prefilled
    context: int = 0  # mean tokens of KV a running sequence reads

    @classmethod
    def of(cls, stats: dict, block_size: int, sent_since: int = 0) -> Load:
        """From a replica's last stats poll, plus the prompt tokens sent to it to prefill since (a poll every
        0.25 s is stale for the requests between: without them, every one of them would see the same load)."""
        running = stats.get("running", 0)
        used = stats.get("kv_blocks_used", 0) * block_size
        return cls(running, stats.get("waiting_prefill_tokens", 0) + sent_since, used // running if running else 0)


@dataclass(frozen=True)
class Rule:
    """What decides where the predictions do not (planner.simulate.Tuner picks one per traffic)."""
    threshold: int | None = None  # prompts under this many tokens prefill locally; None: the least delay in all
    override: bool = True  # the predictions may move a request off that path to keep more inside the SLOs

    @property
    def overrides(self) -> bool:
        """Whether the SLO predictions decide where they differ (always, under the least delay)."""
        return self.override or self.threshold is None

    def __str__(self) -> str:
        if self.threshold is None:
            return "least delay"
        return f"local under {self.threshold} tokens" + (", SLO predictions override" if self.override else "")


@dataclass(frozen=True)
class Prediction:
    local: bool
    reason: str  # slo (fewer requests outside the SLOs), delay (as many: less delay in all), tuned (the rule's
    # threshold), no_prefill
    ttft_local_s: float
    ttft_remote_s: float  # inf without a prefill replica
    tpot_s: float  # the decode replica's running requests' TPOT on the path taken


@dataclass(frozen=True)
class SloAware:
    decode: StepModel
    prefill: StepModel | None
    ttft_slo_s: float
    tpot_slo_s: float
    decode_budget: int  # the decode pool's max_num_batched_tokens
    decode_chunk: int  # and its chunk size
    prefill_chunk: int
    hop_s: float = 0.0
    decode_slowdown: float = 1.0  # the profile's fitted service costs (planner.simulate.Service)
    prefill_slowdown: float = 1.0
    rule: Rule = Rule()

    def decide(self, prompt_len: int, max_tokens: int, load: Load, prefill_queued: int | None) -> Prediction:
        """prefill_queued: prompt tokens queued on the least-loaded live prefill replica (None: none is up)."""
        b, ctx = load.running, load.context
        decodes = [(1, ctx, True)] * b
        t_decode = self.decode_slowdown * self.decode.step_seconds(decodes) if b else 0.0
        ttft_local, excess, done = 0.0, 0.0, 0
        total = load.waiting_prefill_tokens + prompt_len
        chunk = max(1, min(self.decode_chunk, self.decode_budget - b), -(-total // MAX_PREDICTED_STEPS))
        while done < total:
            n = min(chunk, total - done)
            t = self.decode_slowdown * self.decode.step_seconds([*decodes, (n, done, done + n == total)])
            ttft_local += t
            excess += t - t_decode
            done += n
        ttft_local += self.hop_s
        tpot_local = t_decode + excess / max(1, max_tokens)
        if prefill_queued is None or self.prefill is None:
            return Prediction(True, "no_prefill", ttft_local, math.inf, tpot_local)
        ttft_remote = self.prefill_slowdown * self.prefill.prefill_seconds(prefill_queued + prompt_len,
                                                                            self.prefill_chunk) + 2 * self.hop_s
        outside_local = (ttft_local > self.ttft_slo_s) + b * (tpot_local > self.tpot_slo_s)
        outside_remote = int(ttft_remote > self.ttft_slo_s) + b * (t_decode > self.tpot_slo_s)
        rule = self.rule
        if outside_local != outside_remote and rule.overrides:
            local, reason = outside_local < outside_remote, "slo"
        elif rule.threshold is not None:
            local, reason = prompt_len < rule.threshold, "tuned"
        else:  # as many outside either way: the path that delays requests less, in all (request-seconds): this
            # one's first token, and locally also the steps each running decode waits through beyond its own
            local, reason = ttft_local + b * excess <= ttft_remote, "delay"
        return Prediction(local, reason, ttft_local, ttft_remote, tpot_local if local else t_decode)

    @classmethod
    def from_profile(cls, profile, prefill_pool, decode_pool, ttft_slo_s: float, tpot_slo_s: float) -> SloAware:
        """From a planner.cost.Profile and the cluster's pools (pdserve.config.PoolConfig); ValueError naming the
        pool configuration the profile lacks. A prefill pool of no replicas needs none in the profile, but where the
        profile has it, prompts go to the replicas the autoscaler or a Scale adds later."""
        from planner.cost import pool_key

        def step(pool) -> StepModel:
            try:
                return profile.pool(pool.engine_kwargs()).step
            except ValueError as e:
                raise ValueError(f"router.dispatch='slo_aware': {e}") from None

        service = profile.service
        slowdown = service.get("slowdown", {})
        try:
            prefill = step(prefill_pool)
        except ValueError:
            if prefill_pool.replicas:
                raise
            prefill = None  # no prefill replica, now or later, is predicted for: every prompt prefills locally
        return cls(step(decode_pool), prefill, ttft_slo_s, tpot_slo_s,
                   decode_pool.max_num_batched_tokens, decode_pool.chunk_size, prefill_pool.chunk_size,
                   service.get("hop_s", 0.0), slowdown.get(pool_key(decode_pool.engine_kwargs()), 1.0),
                   slowdown.get(pool_key(prefill_pool.engine_kwargs()), 1.0))
