"""What one engine step of a pool costs, as a function of the batch the scheduler hands it: the model
`pdserve profile` fits to measured steps and the simulator, the planner and the slo_aware policy read.
Standard library only, so the router's process can load it.

A step's seconds are

    dense(T) + sample(S) + prefill_pair_s * P + decode_context_s * K

    T  tokens in the step (the flat batch: every sequence's scheduled tokens)
    S  rows sampled (sequences whose step ends at their last token: the LM head and the sampler)
    P  (query, context) pairs of attention of the rows that prefill (more than one token this step):
       a chunk of n tokens after c cached ones has n * (c + (n + 1) / 2)
    K  context tokens the decode rows (one token this step) read from the KV cache

dense(T) and sample(S) are piecewise linear over measured counts (the knots), linear past the last: the
weights' matmuls (the LM head's, for sample) are bandwidth-bound at a few rows and compute-bound at many,
and a CPU's kernels change path between (an int8 kernel up to 8 rows, panels, tiles), so no one line fits.
Every term is linear in the fitted parameters, which makes the fit one least-squares solve
(planner/profile.py)."""
from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

PROFILE_VERSION = 1


def step_features(chunks: Iterable[tuple[int, int, bool]]) -> tuple[int, int, float, int]:
    """(T, S, P, K) of one step; chunks: (tokens this step, tokens computed before it, samples) per sequence."""
    t = s = k = 0
    p = 0.0
    for n, before, sampled in chunks:
        t += n
        s += sampled
        if n == 1:
            k += before + 1
        else:
            p += n * (before + (n + 1) / 2)
    return t, s, p, k


def knot_weights(knots: tuple[int, ...], tokens: float) -> list[tuple[int, float]]:
    """A piecewise-linear function of tokens as a weighted sum of its values at the knots: [(knot index,
    weight)]. Between two knots, linear; below the first, proportional to it; past the last, the last
    segment's line."""
    if tokens <= 0:
        return []
    if tokens <= knots[0]:
        return [(0, tokens / knots[0])]
    i = min(bisect_right(knots, tokens), len(knots) - 1)  # the segment [knots[i-1], knots[i]]
    u = (tokens - knots[i - 1]) / (knots[i] - knots[i - 1])
    return [(i - 1, 1 - u), (i, u)]


def pool_key(options: dict[str, Any]) -> str:
    """What a pool's step times depend on, as a profile names it: 'tp2-threads1-float32-cpu'."""
    return (f"tp{options.get('tensor_parallel_size', 1)}-threads{options.get('num_threads')}-"
            f"{options.get('dtype', 'float32')}-{options.get('device', 'cpu')}")


@dataclass(frozen=True)
class StepModel:
    """One pool's step time (see the module's docstring); seconds."""
    knots: tuple[int, ...]  # token counts, increasing, the first >= 1
    dense_s: tuple[float, ...]  # seconds of a step of knots[i] tokens with no attention and nothing sampled
    sample_knots: tuple[int, ...]  # sampled-row counts, increasing, the first >= 1
    sample_s: tuple[float, ...]  # seconds sample_knots[i] sampled rows add (LM head, sampler)
    prefill_pair_s: float = 0.0
    decode_context_s: float = 0.0

    def __post_init__(self) -> None:
        for knots, values in ((self.knots, self.dense_s), (self.sample_knots, self.sample_s)):
            if len(knots) != len(values) or len(knots) < 2:
                raise ValueError("a step model needs at least two knots, each with its seconds")
            if any(b <= a for a, b in zip(knots, knots[1:])) or knots[0] < 1:
                raise ValueError(f"knots {knots} must increase from at least 1")

    def dense(self, tokens: float) -> float:
        return sum(self.dense_s[i] * w for i, w in knot_weights(self.knots, tokens))

    def sample(self, rows: float) -> float:
        return sum(self.sample_s[i] * w for i, w in knot_weights(self.sample_knots, rows))

    def seconds(self, tokens: int, sampled: int, prefill_pairs: float, decode_context: int) -> float:
        if not tokens:
            return 0.0
        return (self.dense(tokens) + self.sample(sampled) + self.prefill_pair_s * prefill_pairs
                + self.decode_context_s * decode_context)

    def step_seconds(self, chunks: Iterable[tuple[int, int, bool]]) -> float:
        return self.seconds(*step_features(chunks))

    def prefill_seconds(self, prompt: int, chunk: int) -> float:
        """A prompt prefilled alone in chunks of at most `chunk` tokens, its first token sampled."""
        total, done = 0.0, 0
        while done < prompt:
            n = min(chunk, prompt - done)
            total += self.step_seconds([(n, done, done + n == prompt)])
            done += n
        return total


@dataclass(frozen=True)
class PoolProfile:
    """A pool configuration's measured step model, with how well it fits what was measured."""
    options: dict[str, Any]  # the engine options it was measured with (tensor_parallel_size, num_threads, ...)
    step: StepModel
    fit: dict[str, Any] = field(default_factory=dict)  # per kind of step: points, median and max |relative error|
    points: list[dict[str, float]] = field(default_factory=list)  # every measured step (features and seconds)


@dataclass(frozen=True)
class Profile:
    """What `pdserve profile` writes: one step model per pool, and the service's own costs."""
    model: str
    host: dict[str, Any]  # CPU model, cores, and the probe's peaks measured in the same run
    pools: dict[str, PoolProfile]  # "prefill", "decode" (and any other pool configuration profiled)
    # seconds the service adds: per request placed (router, RPCs, KV commit), per streamed token, and per
    # KV byte moved after the last layer (what the layer-by-layer push could not hide), by backend
    service: dict[str, float] = field(default_factory=dict)
    version: int = PROFILE_VERSION

    def pool(self, options: dict[str, Any]) -> PoolProfile:
        """The pool profile measured with these engine options' pool key; ValueError naming what it holds."""
        key = pool_key(options)
        found = next((p for p in self.pools.values() if pool_key(p.options) == key), None)
        if found is None:
            raise ValueError(f"the profile has no step model for the pool configuration {key}; it has "
                             f"{sorted(pool_key(p.options) for p in self.pools.values())}: measure it with "
                             "`pdserve profile`")
        return found

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        if d.get("version") != PROFILE_VERSION:
            raise ValueError(f"profile version {d.get('version')!r}; this pdserve reads version {PROFILE_VERSION}: "
                             "measure it again with `pdserve profile`")
        pools = {name: PoolProfile(p["options"], StepModel(**{k: tuple(v) if isinstance(v, list) else v
                                                              for k, v in p["step"].items()}),
                                   p.get("fit", {}), p.get("points", []))
                 for name, p in d["pools"].items()}
        return cls(d["model"], d["host"], pools, d.get("service", {}), d["version"])

    @classmethod
    def load(cls, path: str) -> Profile:
        with open(path) as f:
            try:
                return cls.from_dict(json.load(f))
            except (KeyError, TypeError) as e:
                raise ValueError(f"{path} is not a pdserve profile ({type(e).__name__}: {e})") from None
