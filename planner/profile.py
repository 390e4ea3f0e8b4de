"""`pdserve profile`: measure what a pool configuration's engine steps cost on this hardware and fit the
step model of planner/cost.py to them.

The engine is the pool's own (LLMEngine with the pool's options: threads, TP degree, dtype, token budget),
and each measured step is a batch laid out by hand and run through its ModelRunner, so each point has
exactly the shape it names: a chunk of n prompt tokens after c cached ones, b decodes at context L, or
both in one step. The KV the steps attend over is whatever the pool's memory holds (the timing does not
depend on its values). Each point is the median of `reps` runs after one warm-up.

Points (per pool):
    dense     one chunk of T tokens from position 0, nothing sampled, T over the knots (powers of two up
              to the token budget): the weights' matmuls at each batch size
    context   chunks of 64 and of the chunk size after 256 .. thousands of cached tokens: attention's pairs
    sampled   chunks that end their prompt (one row through the LM head and the sampler)
    decode    b sequences of one token each at context L, b up to max_num_seqs, b * L within the KV cache
    mixed     decodes and one chunk in the same step, what a colocated replica runs: held out of the fit,
              they test that the terms add up
The fit is one least-squares solve over relative error (each point weighted by 1/its seconds), so a 5 ms
decode step counts as much as a 500 ms chunk."""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any

from planner.cost import PoolProfile, StepModel, knot_weights, step_features

# the engine options a profile records with each pool (its key, planner.cost.pool_key, reads the first four)
MEASURED_WITH = ("tensor_parallel_size", "num_threads", "dtype", "device", "max_num_batched_tokens",
                 "max_prefill_chunk", "max_num_seqs", "num_kv_blocks", "block_size")


@dataclass(frozen=True)
class Point:
    kind: str  # dense, context, sampled, decode, mixed
    chunks: tuple[tuple[int, int, bool], ...]  # (tokens this step, tokens before, samples) per sequence


def plan_points(budget: int, chunk: int, max_seqs: int, capacity: int, max_len: int, block_size: int,
                quick: bool = False) -> tuple[list[int], list[Point]]:
    """The knots and the steps to measure for a pool: budget (tokens per step), chunk (per sequence),
    max_seqs, capacity (KV tokens: blocks x block size), max_len (a sequence's longest)."""
    per_seq = lambda tokens: -(-tokens // block_size) * block_size  # noqa: E731 - KV tokens a sequence holds
    top = min(budget, chunk, max_len - 1, capacity - block_size)
    knots = sorted({1 << i for i in range(top.bit_length()) if 1 << i <= top} | {top})
    points = [Point("dense", ((t, 0, False),)) for t in knots]
    contexts = [c for c in (256, 1024, 2048, 4096, 8192)[: 3 if quick else 5]
                if c + top + 1 < max_len and per_seq(c + top + 1) <= capacity]
    for n in sorted({min(64, top), top}):
        points += [Point("context", ((n, c, False),)) for c in contexts]
    points += [Point("sampled", ((n, 0, True),)) for n in sorted({min(32, top), top}) if n > 1]
    batches = [b for b in knots if b <= max_seqs] + ([max_seqs] if max_seqs < top and max_seqs not in knots else [])
    for length in (16, 256, 1024) if not quick else (16, 512):
        points += [Point("decode", ((1, length - 1, True),) * b) for b in batches
                   if length < max_len and b * per_seq(length) <= capacity]
    for b in (4, 16):
        for n in (64, 256):
            if b <= max_seqs and b + n <= budget and n <= chunk and b * per_seq(256) + per_seq(n + 1) <= capacity:
                points.append(Point("mixed", ((1, 255, True),) * b + ((n, 0, False),)))
    return knots, points


def measure_step(engine, point: Point, reps: int) -> float:
    """Median seconds of the step `point` names on engine's runner (its blocks taken and given back)."""
    from engine.sampling_params import SamplingParams
    from engine.scheduler import SchedulerOutput
    from engine.sequence import Sequence

    bm, vocab = engine.block_manager, engine.config.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    seqs = []
    out = SchedulerOutput()
    try:
        for i, (n, before, sampled) in enumerate(point.chunks):
            length = before + n + (not sampled)  # a chunk that does not end its prompt has a token after it
            seq = Sequence([(7 * i + j) % vocab for j in range(length)], params, seed=0)
            bm.allocate(seq, before + n)
            seq.num_computed_tokens = before
            seqs.append(seq)
            out.seqs.append(seq)
            out.num_scheduled_tokens.append(n)
            out.num_decodes += n == 1 and sampled
        times = []
        for rep in range(reps + 1):
            t = time.perf_counter()
            engine.runner.execute(out)
            if rep:  # the first is the warm-up
                times.append(time.perf_counter() - t)
        return statistics.median(times)
    finally:
        for seq in seqs:
            bm.free(seq)


def fit(knots: list[int], points: list[Point], seconds: list[float]) -> tuple[StepModel, dict[str, Any]]:
    """The step model by least squares over relative error, fitted to every point but the mixed ones;
    and per kind of point its count and median and max |predicted / measured - 1|."""
    import torch

    most = max(step_features(pt.chunks)[1] for pt in points)
    sample_knots = [k for k in knots if k < most] + [most]  # as far as the points sample
    m, ms = len(knots), len(sample_knots)
    cols = m + ms + 2  # dense at the knots, sample at its knots, prefill_pair_s, decode_context_s

    def row(point: Point) -> list[float]:
        t, s, p, k = step_features(point.chunks)
        r = [0.0] * cols
        for i, w in knot_weights(tuple(knots), t):
            r[i] += w
        for i, w in knot_weights(tuple(sample_knots), s):
            r[m + i] += w
        r[-2:] = [p, k]
        return r

    train = [(row(pt), sec) for pt, sec in zip(points, seconds) if pt.kind != "mixed"]
    a = torch.tensor([[x / sec for x in r] for r, sec in train], dtype=torch.float64)
    b = torch.ones(len(train), 1, dtype=torch.float64)
    free = list(range(cols))
    while True:  # a term the data puts below zero (noise around a cost too small to see) is dropped
        sol = torch.linalg.lstsq(a[:, free], b, driver="gelsd").solution[:, 0].tolist()
        coef = dict(zip(free, sol))
        negative = [c for c in free[-2:] if c >= m + ms and coef[c] < 0]
        if not negative:
            break
        free.remove(negative[0])
    theta = [coef.get(c, 0.0) for c in range(cols)]
    model = StepModel(tuple(knots), tuple(theta[:m]), tuple(sample_knots), tuple(theta[m:m + ms]), *theta[m + ms:])
    errors: dict[str, list[float]] = {}
    for pt, sec in zip(points, seconds):
        errors.setdefault(pt.kind, []).append(abs(model.step_seconds(pt.chunks) / sec - 1))
    report = {kind: {"points": len(e), "median_rel_error": statistics.median(e), "max_rel_error": max(e),
                     "held_out": kind == "mixed"} for kind, e in errors.items()}
    return model, report


def profile_pool(model: str, options: dict[str, Any], reps: int = 3, quick: bool = False,
                 log=lambda msg: None) -> PoolProfile:
    """Measure one pool configuration (EngineOptions' fields) and fit its step model."""
    from engine.llm_engine import LLMEngine

    launcher = None
    if options.get("tensor_parallel_size", 1) > 1:
        from replica.ranks import start_followers

        launcher = start_followers
    engine = LLMEngine.from_model(model, load_tokenizer=False, rank_launcher=launcher, **options)
    try:
        opts = engine.config.options
        bm = engine.block_manager
        knots, points = plan_points(opts.max_num_batched_tokens, opts.chunk_size, opts.max_num_seqs,
                                    bm.num_blocks * bm.block_size, engine.config.max_model_len, bm.block_size, quick)
        seconds = []
        for i, pt in enumerate(points):
            seconds.append(measure_step(engine, pt, reps))
            t, s, p, k = step_features(pt.chunks)
            log(f"  [{i + 1}/{len(points)}] {pt.kind:8s} tokens={t:<5d} sampled={s:<4d} pairs={p:<10.0f} "
                f"decode_context={k:<6d} {1e3 * seconds[-1]:8.2f} ms")
        step, report = fit(knots, points, seconds)
        rows = [dict(zip(("tokens", "sampled", "prefill_pairs", "decode_context"), step_features(pt.chunks)),
                     kind=pt.kind, seconds=sec) for pt, sec in zip(points, seconds)]
        return PoolProfile({k: getattr(opts, k) for k in MEASURED_WITH}, step, report, rows)
    finally:
        engine.shutdown()


def host_facts() -> dict[str, Any]:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags = ""
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        flags = ""
    return {"cpu": name, "cores": os.cpu_count(), "amx": "amx_tile" in flags, "avx512": "avx512f" in flags,
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def profile_config(config, reps: int = 5, quick: bool = False, into=None, log=print):
    """A Profile of every pool configuration of `config` (pdserve.config.ClusterConfig) that `into` (a Profile
    to add to) lacks: the decode pool, and the prefill pool when it has replicas."""
    from planner.cost import Profile, pool_key

    if into is not None and into.model != config.model:
        raise ValueError(f"the profile is of model {into.model!r}, the config's is {config.model!r}: one model a file")
    pools = dict(into.pools) if into is not None else {}
    for role, pool in (("prefill", config.prefill), ("decode", config.decode)):
        key = pool_key(pool.engine_kwargs())
        if pool.replicas and key not in pools:
            log(f"{role} pool ({key}):")
            pools[key] = profile_pool(config.model, pool.engine_kwargs(), reps, quick, log)
            for kind, f in pools[key].fit.items():
                log(f"  {kind:8s} {f['points']:3d} points, |error| median {100 * f['median_rel_error']:5.1f}%, "
                    f"max {100 * f['max_rel_error']:5.1f}%{' (held out of the fit)' if f['held_out'] else ''}")
    service = dict(into.service) if into is not None else {}
    if "kv_gbs" not in service:
        service.update(kv_transfer(config.model, log))
    return Profile(config.model, host_facts(), pools, service)


def kv_transfer(model: str, log=print) -> dict[str, Any]:
    """What the service's KV transfer costs here (planner.simulate.Service's kv_gbs, kv_layer_bytes): GB/s
    each backend moved a 512-token prompt's fp32 KV at (kv_transfer.measure), and the bytes of one token's
    K and V in one layer."""
    from engine.config import ModelConfig
    from engine.loader import open_model
    from kv_transfer.measure import bandwidth

    cfg = ModelConfig.from_hf(open_model(model, False).hf_config)
    gbs = bandwidth(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    log("KV transfer: " + ", ".join(f"{name} {v:.2f} GB/s" for name, v in gbs.items()))
    return {"kv_gbs": {name: round(v, 3) for name, v in gbs.items()},
            "kv_layer_bytes": float(2 * cfg.num_key_value_heads * cfg.head_dim * 4)}
