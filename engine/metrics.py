"""What an engine's steps cost and achieve: FLOPs and bytes per step from the model's shape,
and a rolling window of steps that gives achieved FLOP/s and memory bandwidth (MFU, MBU) and
the busy fraction; plus cumulative histograms for Prometheus. Plain Python, no locks: one
thread writes (the engine loop), readers take a snapshot through it."""
from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass

from engine.config import ModelConfig

INF = float("inf")
STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_TOKENS_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 8192)


@dataclass(frozen=True)
class ModelCost:
    """Per-token costs of a model (the whole model, every rank together)."""
    matmul_flops_per_token: float  # 2 x the weights a token multiplies (active experts only), LM head excluded
    lm_head_flops: float  # per sampled row
    attention_flops_per_context: float  # per (query token, context token) pair: QK^T and PV
    weight_bytes: float  # all weights, read once per step
    kv_bytes_per_token: float  # K and V of one token in every layer
    # steps of up to this many tokens read the weights in another layout (int8 blocks), of these bytes
    small_step_tokens: int = 0
    small_step_weight_bytes: float = 0.0

    def weight_bytes_for(self, tokens: int) -> float:
        """The weight bytes a step of this many tokens reads."""
        return self.small_step_weight_bytes if tokens <= self.small_step_tokens else self.weight_bytes

    @classmethod
    def of(cls, cfg: ModelConfig, dtype_bytes: int) -> ModelCost:
        h, d, layers = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
        q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        attn = h * (q + 2 * kv) + q * h
        if cfg.num_experts:
            active = h * cfg.num_experts + 3 * h * cfg.moe_intermediate_size * cfg.num_experts_per_tok
            stored = h * cfg.num_experts + 3 * h * cfg.moe_intermediate_size * cfg.num_experts
        else:
            active = stored = 3 * h * cfg.intermediate_size
        embed = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
        return cls(matmul_flops_per_token=2.0 * layers * (attn + active), lm_head_flops=2.0 * cfg.vocab_size * h,
                   attention_flops_per_context=4.0 * layers * q,
                   weight_bytes=float(dtype_bytes * (layers * (attn + stored) + embed)),
                   kv_bytes_per_token=float(dtype_bytes * 2 * layers * kv))

    def step(self, query_start_loc: list[int], seq_lens: list[int], num_sampled: int) -> tuple[int, float, float]:
        """(tokens, FLOPs, bytes read) of one step of the flat batch."""
        tokens = query_start_loc[-1]
        pairs = 0.0  # (query, context) pairs of causal attention
        for a, b, s in zip(query_start_loc, query_start_loc[1:], seq_lens):
            n = b - a
            pairs += n * (s - (n - 1) / 2)
        flops = self.matmul_flops_per_token * tokens + self.lm_head_flops * num_sampled \
            + self.attention_flops_per_context * pairs
        return tokens, flops, self.weight_bytes_for(tokens) + self.kv_bytes_per_token * sum(seq_lens)


class StepMetrics:
    """Written by the engine loop after every step; read as a snapshot by the worker's stats()."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._recent: deque[tuple[float, float, float, float]] = deque()  # (end, seconds, flops, bytes)
        self.steps = 0
        self.tokens = 0
        self.busy_seconds = 0.0
        # of busy_seconds, the time the stepping thread was off its core: preempted by other threads (the
        # service's, a neighbour's), or waiting for its OpenMP team or for I/O; what it lost to the host
        self.off_cpu_seconds = 0.0
        self.step_seconds_counts = [0] * (len(STEP_SECONDS_BUCKETS) + 1)  # the last is +Inf
        self.batch_tokens_counts = [0] * (len(BATCH_TOKENS_BUCKETS) + 1)

    def record(self, seconds: float, tokens: int, flops: float, bytes_read: float, cpu_seconds: float) -> None:
        """cpu_seconds: the stepping thread's own CPU time in the step."""
        end = time.monotonic()
        self._recent.append((end, seconds, flops, bytes_read))
        while self._recent and self._recent[0][0] < end - self.window_s:
            self._recent.popleft()
        self.steps += 1
        self.tokens += tokens
        self.busy_seconds += seconds
        self.off_cpu_seconds += max(0.0, seconds - cpu_seconds)
        self.step_seconds_counts[bisect_left(STEP_SECONDS_BUCKETS, seconds)] += 1
        self.batch_tokens_counts[bisect_left(BATCH_TOKENS_BUCKETS, tokens)] += 1

    def snapshot(self) -> dict:
        now = time.monotonic()
        recent = [r for r in list(self._recent) if r[0] > now - self.window_s]
        busy = sum(r[1] for r in recent)
        return dict(
            steps=self.steps, tokens=self.tokens, busy_seconds=self.busy_seconds,
            step_off_cpu_seconds=self.off_cpu_seconds,
            busy_fraction=min(1.0, busy / self.window_s),
            flops_per_s=sum(r[2] for r in recent) / busy if busy else 0.0,  # while busy
            bytes_per_s=sum(r[3] for r in recent) / busy if busy else 0.0,
            step_seconds_buckets=list(zip((*STEP_SECONDS_BUCKETS, INF), _cumulative(self.step_seconds_counts))),
            step_seconds_sum=self.busy_seconds,
            batch_tokens_buckets=list(zip((*BATCH_TOKENS_BUCKETS, INF), _cumulative(self.batch_tokens_counts))),
            batch_tokens_sum=float(self.tokens))


def _cumulative(counts: list[int]) -> list[int]:
    out, total = [], 0
    for c in counts:
        total += c
        out.append(total)
    return out  # the last entry is the +Inf bucket (count of all)


def measure_peaks(device: str = "cpu", tiles: bool = False, read_bytes: int = 0) -> dict[str, float]:
    """The denominators of MFU and MBU when none are configured, measured in this process with its
    current torch threads (engine.peaks, sized for a replica's start-up), for the path its steps take:

    peak_flops      the fp32 matmul peak; where the weights run on the AMX tile unit (tiles=True,
                    layers/qgemm.py), the unit's bf16 matmul peak over 3, since each fp32-exact
                    product is three bf16 passes: the most useful FLOP/s that path can reach
                    (SmolLM2 prefill read MFU 1.44 against the fp32 peak)
    peak_bandwidth  bytes/s read by a matrix-vector product over a buffer the size of the weights one
                    step reads (read_bytes, at least 64 MiB): the steps' own access and working set,
                    so weights that sit in the last-level cache are measured against that cache
                    (SmolLM2's decode read MBU 1.07 against a 64 MiB copy)

    A step can still read a little above the probe (its KV adds bytes, the host's load drifts between
    start-up and the step): MBU and MFU are reported as measured, not clipped."""
    import torch

    from engine import peaks

    size = peaks.replica_size(device, read_bytes)
    measured = peaks.measure(size, device)
    flops = measured["matmul_peak_gflops"]
    if tiles:
        flops = max(flops, peaks.matmul_gflops(*size.matmuls[0], device, torch.bfloat16) / 3)
    return {"peak_flops": float(round(flops * 1e9)), "peak_bandwidth": float(round(measured["mem_read_bw_gbs"] * 1e9))}


def engine_stats(engine, metrics: StepMetrics, peaks: dict[str, float]) -> dict:
    """A replica's load and utilization as plain data. Safe from another thread than the engine's:
    the scheduler's queues are copied first (list() of a list or deque holds the GIL throughout).
    peaks: the replica's peak_flops and peak_bandwidth (all its ranks together)."""
    bm, sched = engine.block_manager, engine.scheduler
    waiting, running = list(sched.waiting), list(sched.running)
    snap = metrics.snapshot()
    return dict(
        snap, running=len(running), waiting=len(waiting),
        waiting_prefill_tokens=sum(s.num_tokens - s.num_computed_tokens for s in (*waiting, *running)
                                   if s.num_computed_tokens < s.num_prompt_tokens),
        kv_blocks_used=bm.num_blocks - bm.num_free_blocks, kv_blocks_total=bm.num_blocks,
        num_preemptions=sched.num_preemptions, prefix_cache_queries=sched.prefix_cache_queries,
        prefix_cache_hits=sched.prefix_cache_hits, **peaks,
        mfu=snap["flops_per_s"] / peaks["peak_flops"] if peaks.get("peak_flops") else 0.0,
        mbu=snap["bytes_per_s"] / peaks["peak_bandwidth"] if peaks.get("peak_bandwidth") else 0.0)
