"""One scheduling rule: each step, sequences catch num_computed_tokens up to num_tokens
inside a token budget. Chunked prefill and iteration-level continuous batching both
fall out of it: a long prompt takes several steps, a decoding sequence takes one token."""
from __future__ import annotations

from collections import deque
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

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, config: EngineOptions, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # tokens of the sequences admitted with a prefix-cache lookup
        self.prefix_cache_hits = 0  # of those, tokens found in the cache

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chunk = self.config.chunk_size
        bm = self.block_manager

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, chunk, budget)
            while not bm.can_allocate(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()  # the newest
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                bm.allocate(seq, seq.num_computed_tokens + n)
                out.seqs.append(seq)
                out.num_scheduled_tokens.append(n)
                budget -= n
                i += 1
                continue
            break

        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            # a new or preempted sequence starts past its longest cached prefix; the prefill side of a
            # disaggregated pair (kv_target) sends each token's KV as it computes it, so it computes all
            lookup = bm.enable_caching and not seq.num_computed_tokens and seq.kv_target is None
            prefix = bm.match_prefix(seq) if lookup else []
            computed = seq.num_computed_tokens + len(prefix) * bm.block_size
            n = min(seq.num_tokens - computed, chunk, budget)
            if not bm.can_allocate(seq, computed + n, prefix):
                break
            self.waiting.popleft()
            bm.allocate(seq, computed + n, prefix)
            if lookup:
                seq.num_computed_tokens = computed
                if not seq.num_preemptions:
                    seq.num_cached_tokens = computed
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += computed
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_scheduled_tokens.append(n)
            budget -= n
        return out

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
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
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
