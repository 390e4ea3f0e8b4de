"""Where our engine's step time goes: simple timers wrapped around the engine's parts."""
from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from benchmarks.engine_runners import OurEngine
from benchmarks.engine_workloads import wait_quiet

if TYPE_CHECKING:
    from engine import LLM


class StepProfiler:
    """Times the parts of our engine's steps by wrapping them in timers, as instance attributes only
    (no engine file is touched; close() puts everything back). A step whose every sequence runs one
    token counts as 'decode', any other as 'prefill'. Parts: schedule, prepare (the runner's batch
    and metadata building), decoder_c (the whole decoder stack where it runs as one C call,
    models/native_decoder.py; the next three parts are then 0), linear (every
    Column/RowParallelLinear), attention (the backend, KV writes included), norm (RMSNorm, residual
    add included), forward_other (the rest of the model's forward: embedding, rotary, activations,
    views), logits (lm_head on the sampled rows), sample,
    engine_other (the rest of LLMEngine.step: bookkeeping, stop checks, outputs)."""

    PARTS = ("schedule", "prepare", "decoder_c", "linear", "attention", "norm", "forward_other", "logits", "sample",
             "engine_other")

    def __init__(self, llm: LLM) -> None:
        from engine.layers.linear import ColumnParallelLinear, RowParallelLinear
        from engine.layers.norm import RMSNorm

        self.llm = llm
        self.acc: dict[str, float] = defaultdict(float)
        self.rows: dict[str, dict[str, float]] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self._kind = "decode"
        self._saved: list[tuple[Any, str, bool, Any]] = []
        eng = llm.engine
        runner = eng.runner
        model = runner.model

        def timed(fn, part: str):
            def call(*a, **k):
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    self.acc[part] += time.perf_counter() - t
            return call

        def schedule_and_classify(fn):
            def call():
                out = fn()
                n = out.num_scheduled_tokens
                self._kind = "decode" if n and all(x == 1 for x in n) else "prefill"
                return out
            return call

        self._patch(eng.scheduler, "schedule", lambda fn: schedule_and_classify(timed(fn, "schedule")))
        self._patch(runner, "_plan", lambda fn: timed(fn, "prepare"))
        self._patch(runner, "_tensors", lambda fn: timed(fn, "prepare"))
        self._patch(runner, "sampler", lambda fn: timed(fn, "sample"))
        self._patch(model, "forward", lambda fn: timed(fn, "forward"))
        self._patch(model, "compute_logits", lambda fn: timed(fn, "logits"))
        backends = {id(layer.self_attn.backend): layer.self_attn.backend for layer in model.model.layers}
        for backend in backends.values():
            self._patch(backend, "forward", lambda fn: timed(fn, "attention"))
        if model.model.native is not None:  # the decoder stack as one C call: its parts are not seen apart
            self._patch(model.model.native, "_fn", lambda fn: timed(fn, "decoder_c"))
        for m in model.modules():
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
                self._patch(m, "forward", lambda fn: timed(fn, "linear"))
            elif isinstance(m, RMSNorm):
                self._patch(m, "forward", lambda fn: timed(fn, "norm"))
        self._patch(eng, "step", self._timed_step)

    def _patch(self, obj, attr: str, make) -> None:
        own = attr in vars(obj)
        original = getattr(obj, attr)
        self._saved.append((obj, attr, own, vars(obj).get(attr)))
        setattr(obj, attr, make(original))

    def _timed_step(self, step):
        def call():
            self.acc.clear()
            t = time.perf_counter()
            out = step()
            total = time.perf_counter() - t
            a = self.acc
            row = self.rows.setdefault(self._kind, defaultdict(float))
            for p in ("schedule", "prepare", "decoder_c", "linear", "attention", "norm", "logits", "sample"):
                row[p] += a[p]
            row["forward_other"] += a["forward"] - a["decoder_c"] - a["linear"] - a["attention"] - a["norm"]
            row["engine_other"] += total - a["forward"] - a["schedule"] - a["prepare"] - a["logits"] - a["sample"]
            row["total"] += total
            self.counts[self._kind] += 1
            return out
        return call

    def close(self) -> None:
        for obj, attr, own, value in reversed(self._saved):
            if own:
                setattr(obj, attr, value)
            else:
                delattr(obj, attr)
        self._saved.clear()

    def report(self) -> dict[str, Any]:
        out = {}
        for kind, row in self.rows.items():
            n = self.counts[kind]
            out[kind] = {"steps": n, **{f"{p}_ms": round(row[p] / n * 1e3, 3) for p in (*self.PARTS, "total")}}
        return out


def run_profile(ours: OurEngine, workloads: dict[str, tuple[list[list[int]], int]],
                quiet_wait: float = 0.0) -> dict[str, Any]:
    """ms per step of each part, per workload name and step kind; workloads: name -> (prompts, new tokens)."""
    result = {}
    for name, (prompts, n) in workloads.items():
        wait_quiet(quiet_wait)
        prof = StepProfiler(ours.llm)
        try:
            wall = ours.generate(prompts, n)["wall"]
        finally:
            prof.close()
        result[name] = {"wall_s": round(wall, 3), **prof.report()}
    return result
