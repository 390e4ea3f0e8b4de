"""One scheduling rule: each step, sequences catch num_computed_tokens up to num_tokens
inside a token budget. Chunked prefill and iteration-level continuous batching both
fall out of it: a long prompt takes several steps, a decoding sequence takes one token."""
from __future__ import annotations

import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.options import EngineOptions
from engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """The scheduler-to-runner contract for one step."""
    seqs: list[Sequence] = field(default_factory=list)  # scheduler: what runs this step, oldest first
    num_scheduled_tokens: list[int] = field(default_factory=list)  # scheduler: tokens per seq this step
    preempted: list[Sequence] = field(default_factory=list)  # scheduler: sent back to waiting this step
    num_decodes: int = 0  # scheduler: of seqs, those computing one token that completes them (decoding)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class StepCosts:
    """What a step costs, learnt from the steps run (moving averages): a decode-only step's seconds,
    and the seconds each prefill token adds to a step. Sizes prefill chunks for
    EngineOptions.step_time_target_s."""
    SMOOTHING = 0.2  # weight of the newest step
    MIN_PREFILL = 16  # tokens a step may always prefill, so prompts progress whatever the decodes cost

    def __init__(self) -> None:
        self.decode_step_s = 0.0  # 0: no decode-only step seen yet
        self.prefill_token_s = 0.0  # 0: not measured yet

    def record(self, out: SchedulerOutput, seconds: float) -> None:
        prefill = out.total_num_scheduled_tokens - out.num_decodes
        a = self.SMOOTHING
        if not prefill:
            self.decode_step_s = seconds if not self.decode_step_s else (1 - a) * self.decode_step_s + a * seconds
        elif prefill >= self.MIN_PREFILL:
            per = max(seconds - (self.decode_step_s if out.num_decodes else 0.0), 0.0) / prefill
            self.prefill_token_s = per if not self.prefill_token_s else (1 - a) * self.prefill_token_s + a * per

    def prefill_allowance(self, target_s: float, budget: int) -> int:
        """Prefill tokens a step can take beside its decodes and still end within target_s."""
        if not self.prefill_token_s:
            return budget
        fits = int((target_s - self.decode_step_s) / self.prefill_token_s)
        return max(self.MIN_PREFILL, min(budget, fits))


FIRST = float("-inf")  # the order key of a sequence that goes ahead of every other waiting one

# EngineOptions.scheduling_policy -> the key waiting sequences start in (smallest first; equal keys by arrival), from
# the sequence and the most tokens it will generate; fcfs keeps arrival order
POLICIES = {
    "fcfs": None,
    "lof": lambda seq, output_tokens: -output_tokens,  # longest output first
    "spf": lambda seq, output_tokens: seq.num_tokens - seq.num_computed_tokens,  # shortest prompt (left) first
}


def _order(seq: Sequence) -> float:
    return seq.order


class Scheduler:
    def __init__(self, config: EngineOptions, block_manager: BlockManager,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """clock: seconds, for max_queue_wait_s (a simulator passes its own)."""
        self.config = config
        self._clock = clock
        self.block_manager = block_manager
        self.costs = StepCosts()
        self.waiting: deque[Sequence] = deque()  # the order they start in; fcfs: arrival, a preempted one first
        self._key = POLICIES[config.scheduling_policy]
        self._arrivals: deque[Sequence] = deque()  # policies but fcfs: sequences added, oldest first (some started)
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # tokens of the sequences admitted with a prefix-cache lookup
        self.prefix_cache_hits = 0  # of those, tokens found in the cache

    def add(self, seq: Sequence, output_tokens: int | None = None) -> None:
        """Queue seq to start. output_tokens: the most it will generate, where its own max_tokens is not that (a
        prefill replica's sequence stops at the first token); the policies but fcfs order by it or its prompt."""
        if self._key is None:
            self.waiting.append(seq)
            return
        seq.order = self._key(seq, seq.params.max_tokens if output_tokens is None else output_tokens)
        seq.arrival = self._clock()
        self.waiting.insert(bisect_right(self.waiting, seq.order, key=_order), seq)
        self._arrivals.append(seq)

    def _age(self) -> None:
        """Every waiting sequence that has waited max_queue_wait_s goes ahead of those not yet that old, oldest
        first (behind preempted ones): a policy reorders only arrivals close in time."""
        arrivals, waiting = self._arrivals, self.waiting
        overdue = self._clock() - self.config.max_queue_wait_s
        while arrivals:
            seq = arrivals[0]
            if seq.status is SequenceStatus.WAITING and seq.order != FIRST:  # else started, finished or first
                if seq.arrival >= overdue:
                    return
                waiting.remove(seq)
                seq.order = FIRST
                waiting.insert(bisect_right(waiting, FIRST, key=_order), seq)
            arrivals.popleft()

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chunk = self.config.chunk_size
        bm = self.block_manager

        running = self.running
        target = self.config.step_time_target_s
        prefill = budget if target is None else self.costs.prefill_allowance(target, budget)  # prefill tokens left
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            left = seq.num_tokens - seq.num_computed_tokens
            if left == 1:
                n = 1
            else:
                # decode first: the decodes behind this chunk keep their token out of the budget, so a
                # long prompt never stalls them (counted only here: a decode-only step pays nothing)
                decodes = sum(1 for j in range(i + 1, len(running))
                              if running[j].num_tokens - running[j].num_computed_tokens == 1)
                if (n := min(left, chunk, budget - decodes, prefill)) < 1:
                    i += 1  # no budget for its chunk this step
                    continue
                prefill -= n
            while not bm.can_allocate(seq, seq.num_computed_tokens + n):
                victim = running.pop()  # the newest
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                bm.allocate(seq, seq.num_computed_tokens + n)
                out.seqs.append(seq)
                out.num_scheduled_tokens.append(n)
                out.num_decodes += left == 1
                budget -= n
                i += 1
                continue
            break

        if self._arrivals:
            self._age()
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            # a new or preempted sequence starts past its longest cached prefix
            lookup = bm.enable_caching and not seq.num_computed_tokens
            prefix = bm.match_prefix(seq) if lookup else []
            computed = seq.num_computed_tokens + len(prefix) * bm.block_size
            left = seq.num_tokens - computed
            n = 1 if left == 1 else min(left, chunk, budget, prefill)
            if n < 1 or not bm.can_allocate(seq, computed + n, prefix):
                break
            if left == 1:
                out.num_decodes += 1
            else:
                prefill -= n
            self.waiting.popleft()
            bm.allocate(seq, computed + n, prefix)
            if lookup:
                seq.num_computed_tokens = computed
                if not seq.num_preemptions:
                    seq.num_cached_tokens = computed
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += computed
            self._start(seq, n, out)
            budget -= n
        if not out.seqs and not self.running and self.waiting:
            self._admit_holders(out, budget)
        return out

    def _admit_holders(self, out: SchedulerOutput, budget: int) -> None:
        """Nothing runs and the head of waiting cannot get its blocks, so no step would ever free any: the
        sequences whose prompt is computed (prefilled elsewhere, its KV landed in blocks reserved for it) and
        whose next token fits in the free blocks (most need none, one at a block boundary needs one) run ahead
        of the head rather than the replica wait forever; where none fits, one of them gives its blocks up."""
        bm = self.block_manager
        for seq in list(self.waiting):
            if budget < 1 or len(self.running) >= self.config.max_num_seqs:
                return
            if seq.num_computed_tokens != seq.num_tokens - 1 or not bm.can_allocate(seq, seq.num_tokens):
                continue
            self.waiting.remove(seq)
            bm.allocate(seq, seq.num_tokens)
            self._start(seq, 1, out)
            out.num_decodes += 1
            budget -= 1
        if not out.seqs:
            # the holders have every block and each needs one more (a prompt that fills its last block): the
            # newest gives its KV up, to be recomputed here later (from what of it the prefix cache still
            # holds then), so that the others can go; a step at a time, until one fits
            victim = next((seq for seq in reversed(self.waiting) if seq.num_computed_tokens), None)
            if victim is not None:
                self._drop_kv(victim, out)  # it keeps its place in waiting

    def _start(self, seq: Sequence, n: int, out: SchedulerOutput) -> None:
        """A waiting sequence joins the running batch with n tokens this step."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        out.seqs.append(seq)
        out.num_scheduled_tokens.append(n)

    def advance(self, out: SchedulerOutput) -> None:
        """The step ran: each scheduled sequence's KV now covers its scheduled tokens, and each block
        it filled joins the prefix cache (a check per sequence; the hashing once a block fills)."""
        bm = self.block_manager
        caching, bs = bm.enable_caching, bm.block_size
        for seq, n in zip(out.seqs, out.num_scheduled_tokens):
            seq.num_computed_tokens += n
            if caching and seq.num_computed_tokens >= (seq.num_cached_blocks + 1) * bs:
                bm.cache_full_blocks(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Preempt by recompute: drop the KV, prefill prompt + output again later (from the blocks
        of it the prefix cache still holds then)."""
        self._drop_kv(seq, out)
        seq.status = SequenceStatus.WAITING
        seq.order = FIRST
        self.waiting.appendleft(seq)

    def _drop_kv(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End seq (finished or aborted) wherever it is and return its blocks."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
