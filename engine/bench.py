"""Benchmark the engine against transformers and against this machine's own limits, in one run.

    python -m engine.bench --json bench.json [--quick] [--skip-hf] [--profile]
                           [--wait-quiet S --retries N]   (on a machine shared with other jobs)

Default model (SmolLM2-135M-Instruct, GGUF dequantized to fp32), 2 torch threads for every part.
Three workloads, each warmed up once (short) before it is timed, each run on both engines:

  single   one chat prompt ("What is the capital of France?", chat template), 128 new tokens
  batch32  32 prompts of 128 seeded random token ids, 128 new tokens each
  prefill  8 prompts of 512 seeded random token ids, 1 new token each

Always greedy with ignore_eos. Decode rates exclude the prefill, the same way for both engines,
inside one generate call: T is its wall time, T_first the moment every prompt has its first new
token (ours: after the engine step that gives the last one; transformers: its streamer's first
put of new tokens), K the new tokens that exist at T_first (the first token of each prompt, plus
any that chunked prefill let earlier prompts decode meanwhile), N all new tokens:

    decode tok/s = (N - K) / (T - T_first)

The end-to-end rate N / T is reported beside it. Each workload takes the best of its reps.

Machine limits: fp32 matmul peak = best GFLOP/s of torch.mm on 2048^2 and 3072^2 matrices; memory
read bandwidth = the best of three ways of streaming 1 GiB (sum, matrix-vector product, copy;
each best of several), since a GEMV is what a batch-1 decode step does with its weights.
They are measured in a child process (so their 1 GB buffers do not count in
peak RSS), before and after the workloads; the better of the two is used. A short probe before
each workload records how far the host drifts during the run (machine.spread). transformers runs in
another child process, so each engine's peak RSS is its own and the two never run at once;
within each workload the engines take turns run by run (ours, transformers, ours, ...), so that a
noisy neighbour or a drifting host hurts both alike.
`cpu_util` is process CPU time / (wall time * threads) over the timed calls: well under 1.0
means another process took the cores and the figures are pessimistic.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
import traceback
from collections import defaultdict
from typing import Any

import torch

THREADS = 2
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
SEED = 0


# ---------------------------------------------------------------------------------------------
# the machine's limits


def _best(fn, reps: int) -> float:
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_machine(quick: bool = False) -> dict[str, Any]:
    """fp32 matmul peak and memory read bandwidth with THREADS torch threads, best of several."""
    torch.set_num_threads(THREADS)
    out: dict[str, Any] = {}
    peak = 0.0
    for n, reps in ((2048, 4 if quick else 8), (3072, 2 if quick else 4)):
        a, b = torch.randn(n, n), torch.randn(n, n)
        c = torch.empty(n, n)
        torch.mm(a, b, out=c)  # warm-up
        t = _best(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), reps)
        out[f"matmul_{n}_gflops"] = round(2 * n ** 3 / t / 1e9, 1)
        peak = max(peak, 2 * n ** 3 / t / 1e9)
    out["matmul_peak_gflops"] = round(peak, 1)

    numel = (1 << 30) // 4  # 1 GiB of fp32
    x = torch.empty(numel).fill_(1.0)  # first touch outside the timing
    y = torch.empty(numel).fill_(0.0)
    reps = 3 if quick else 5
    x.sum()
    t = _best(lambda: x.sum(), reps)
    out["mem_read_sum_gbs"] = round(numel * 4 / t / 1e9, 2)
    w = x.view(16384, 16384)
    v = torch.randn(16384)
    torch.mv(w, v)
    t = _best(lambda: torch.mv(w, v), reps)
    out["mem_read_matvec_gbs"] = round(numel * 4 / t / 1e9, 2)  # what a GEMV kernel streams
    y.copy_(x)
    t = _best(lambda: y.copy_(x), reps)
    out["mem_copy_read_gbs"] = round(numel * 4 / t / 1e9, 2)  # bytes read (as many again are written)
    out["mem_read_bw_gbs"] = max(out["mem_read_sum_gbs"], out["mem_read_matvec_gbs"], out["mem_copy_read_gbs"])
    return out


def probe_machine() -> dict[str, float]:
    """A short check of the same two limits (about 2 s), taken between workloads: on a shared host
    they drift, and the spread tells how far apart in time figures may be compared."""
    torch.set_num_threads(THREADS)
    n = 2048
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    t = _best(lambda: torch.mm(a, b, out=c), 4)
    w = torch.empty(8192, 8192).fill_(1.0)  # 256 MiB, far beyond the caches
    v = torch.randn(8192)
    torch.mv(w, v)
    tv = _best(lambda: torch.mv(w, v), 4)
    return {"matmul_gflops": round(2 * n ** 3 / t / 1e9, 1), "matvec_gbs": round(w.numel() * 4 / tv / 1e9, 2)}


def _machine_child(quick: bool, conn) -> None:
    while True:
        cmd = conn.recv()
        if cmd == "quit":
            return
        try:
            conn.send(("ok", measure_machine(quick) if cmd == "full" else probe_machine()))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class MachineProbe:
    """The machine measurements, in a child process of their own (their buffers stay out of our RSS)."""

    def __init__(self, quick: bool) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_machine_child, args=(quick, child), daemon=True)
        self.proc.start()
        self.probes: list[dict[str, Any]] = []

    def _ask(self, cmd: str) -> dict[str, Any]:
        self.conn.send(cmd)
        status, result = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"machine measurement failed:\n{result}")
        return result

    def full(self) -> dict[str, Any]:
        return self._ask("full")

    def probe(self, when: str) -> None:
        self.probes.append({"when": when, **self._ask("probe")})

    def close(self) -> None:
        self.conn.send("quit")
        self.proc.join(timeout=30)


# ---------------------------------------------------------------------------------------------
# the two engines behind one interface: generate(prompts, n) -> (new token ids per prompt, stats)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _Timed:
    """Wall and process-CPU time of one call."""

    def __enter__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


class OurEngine:
    name = "pdserve"

    def __init__(self) -> None:
        from engine import LLM

        torch.set_num_threads(THREADS)
        t = time.perf_counter()
        self.llm = LLM("default", dtype="float32", num_threads=THREADS)
        self.load_s = time.perf_counter() - t

    def chat_ids(self) -> list[int]:
        return self.llm.apply_chat_template(CHAT)

    def generate(self, prompts: list[list[int]], n: int) -> dict[str, Any]:
        """LLM.generate's own loop (add every request, step until all finish), timed per step."""
        from engine import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        engine = self.llm.engine
        first = None
        with torch.inference_mode(), _Timed() as tm:
            seqs = [engine.add_request(p, params) for p in prompts]
            done: dict[str, Any] = {}
            while len(done) < len(seqs):
                for out in engine.step():
                    done[out.request_id] = out
                if first is None and all(s.num_output_tokens for s in seqs):
                    first = (time.perf_counter() - tm.wall, sum(s.num_output_tokens for s in seqs))
        return {"tokens": [done[s.request_id].token_ids for s in seqs], "wall": tm.wall, "cpu": tm.cpu,
                "t_first": first[0], "tokens_at_first": first[1]}


class _FirstTokenTimer:
    """A transformers streamer that notes when the first new tokens arrive (its first put is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.t_first: float | None = None
        self.tokens_at_first = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.t_first = time.perf_counter()
            self.tokens_at_first = value.numel()

    def end(self) -> None:
        pass


class HFEngine:
    name = "transformers"

    def __init__(self, path: str) -> None:
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(THREADS)
        t = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
        self.load_s = time.perf_counter() - t
        gc = self.model.generation_config
        self.pad_id = gc.pad_token_id if gc.pad_token_id is not None else 0
        gc.eos_token_id = None  # ignore_eos: generate fills unset values from here, so unset it here
        self.attn_impl = self.model.config._attn_implementation

    def generate(self, prompts: list[list[int]], n: int) -> dict[str, Any]:
        width = max(map(len, prompts))  # left padding + attention mask
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        timer = _FirstTokenTimer()
        with torch.inference_mode(), _Timed() as tm:
            start = time.perf_counter()
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=0,
                                      do_sample=False, pad_token_id=self.pad_id, streamer=timer)
        new = out[:, width:].tolist()
        if any(len(t) != n for t in new):
            raise RuntimeError(f"transformers stopped early: {[len(t) for t in new]} tokens, wanted {n}")
        return {"tokens": new, "wall": tm.wall, "cpu": tm.cpu, "t_first": timer.t_first - start,
                "tokens_at_first": timer.tokens_at_first}


def _hf_child(path: str, conn) -> None:
    try:
        engine = HFEngine(path)
        conn.send(("ok", {"load_s": engine.load_s, "attn_impl": engine.attn_impl}))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        cmd, args = conn.recv()
        if cmd == "quit":
            conn.send(("ok", {"peak_rss_mb": _maxrss_mb()}))
            return
        try:
            conn.send(("ok", engine.generate(*args)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class RemoteHF:
    """transformers in a child process, driven over a pipe."""
    name = "transformers"

    def __init__(self, path: str) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_hf_child, args=(path, child), daemon=True)
        self.proc.start()
        self.info: dict[str, Any] | None = None

    def wait_loaded(self) -> dict[str, Any]:
        if self.info is None:
            self.info = self._recv()
        return self.info

    def _recv(self):
        status, result = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"transformers child failed:\n{result}")
        return result

    def generate(self, prompts, n):
        self.wait_loaded()
        self.conn.send(("generate", (prompts, n)))
        return self._recv()

    def close(self) -> float:
        self.wait_loaded()
        self.conn.send(("quit", None))
        rss = self._recv()["peak_rss_mb"]
        self.proc.join(timeout=30)
        return rss


# ---------------------------------------------------------------------------------------------
# the workloads


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num, length), generator=g).tolist()


def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return sum(vals), vals[3] + vals[4]  # total, idle + iowait


def wait_quiet(max_wait: float) -> float:
    """Wait (at most max_wait s) until the other processes leave the cpus idle for two seconds in a row:
    with one core taken, every OpenMP barrier of a 2-thread torch op waits a scheduler slice.
    Called between our runs, when nothing of ours is working. Returns the seconds waited."""
    if max_wait <= 0 or not os.path.exists("/proc/stat"):
        return 0.0
    start, quiet = time.perf_counter(), 0
    while time.perf_counter() - start < max_wait and quiet < 2:
        t0, i0 = _cpu_jiffies()
        time.sleep(1.0)
        t1, i1 = _cpu_jiffies()
        busy = 1 - (i1 - i0) / max(1, t1 - t0)
        quiet = quiet + 1 if busy < 0.1 else 0
    return time.perf_counter() - start


class Runs:
    """Timed generate calls on one engine: the best run by `key` (a rate), and CPU utilisation."""

    MIN_UTIL = 0.85  # below this, another process had the cores during the run

    def __init__(self, engine, key) -> None:
        self.engine, self.key = engine, key
        self.best: dict[str, Any] | None = None
        self.wall = self.cpu = self.waited = 0.0
        self.utils: list[float] = []
        self.good = 0

    def run(self, prompts, n: int, quiet_wait: float) -> None:
        self.waited += wait_quiet(quiet_wait)
        r = self.engine.generate(prompts, n)
        self.wall += r["wall"]
        self.cpu += r["cpu"]
        util = r["cpu"] / (r["wall"] * THREADS)
        self.utils.append(round(util, 3))
        self.good += util >= self.MIN_UTIL
        if self.best is None or self.key(r) > self.key(self.best):
            self.best = r

    def stats(self) -> dict[str, Any]:
        util = round(self.cpu / (self.wall * THREADS), 3) if self.wall else None
        return {"cpu_util": util, "run_cpu_utils": self.utils, "waited_quiet_s": round(self.waited, 1),
                "tokens": self.best["tokens"]}


def alternate(engines, prompts, n: int, warm_prompts, warm_n: int, key, reps: int, quiet_wait: float = 0.0,
              retries: int = 0) -> dict[str, Runs]:
    """Warm every engine up once, then time them in turns (ours, transformers, ours, ...) so that a host
    that drifts during the workload hurts both alike. A run with CPU utilisation below Runs.MIN_UTIL does
    not count towards reps; up to `retries` extra rounds are run for it. Each engine keeps its best run."""
    runs = {e.name: Runs(e, key) for e in engines}
    for e in engines:
        e.generate(warm_prompts, warm_n)
    for _ in range(reps + retries):
        if all(r.good >= reps for r in runs.values()):
            break
        for r in runs.values():
            if r.good < reps:
                r.run(prompts, n, quiet_wait)
    return runs


def _match_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _decode_rate(r: dict[str, Any]) -> float:
    total = sum(map(len, r["tokens"]))
    return (total - r["tokens_at_first"]) / (r["wall"] - r["t_first"])


def decode_workload(engines, prompts, n: int, warm_prompts, reps: int, **opts) -> dict[str, dict[str, Any]]:
    out = {}
    for name, runs in alternate(engines, prompts, n, warm_prompts, 4, _decode_rate, reps, **opts).items():
        r = runs.best
        total = sum(map(len, r["tokens"]))
        out[name] = {"t_first_s": round(r["t_first"], 4), "t_total_s": round(r["wall"], 3),
                     "tokens_at_first": r["tokens_at_first"], "new_tokens": total,
                     "decode_tok_s": round(_decode_rate(r), 2), "e2e_tok_s": round(total / r["wall"], 2),
                     **runs.stats()}
    return out


def prefill_workload(engines, prompts, warm_prompts, reps: int, **opts) -> dict[str, dict[str, Any]]:
    out = {}
    for name, runs in alternate(engines, prompts, 1, warm_prompts, 1, lambda r: -r["wall"], reps, **opts).items():
        r = runs.best
        out[name] = {"t_s": round(r["wall"], 3), "tok_s": round(sum(map(len, prompts)) / r["wall"], 1),
                     **runs.stats()}
    return out


# ---------------------------------------------------------------------------------------------
# FLOPs and bytes of the model


def model_counts(llm) -> dict[str, int]:
    """Parameter counts from the model's config (a dense Llama-family model): the useful work,
    whatever layout the engine keeps its weights in."""
    cfg = llm.engine.config.model_config
    h, d, heads, kv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    per_layer = h * (heads + 2 * kv) * d + heads * d * h + 3 * h * cfg.intermediate_size  # qkv, o, gate|up, down
    linear = cfg.num_hidden_layers * per_layer
    embedding = cfg.vocab_size * h
    total = (linear + cfg.num_hidden_layers * 2 * h + h + embedding  # + norms (+ an untied lm_head)
             + (0 if cfg.tie_word_embeddings else embedding))
    return {"params": total, "weight_bytes": total * llm.engine.config.dtype.itemsize,
            "linear_params": linear,  # the decoder layers' matmul weights (embedding and lm_head excluded)
            "lm_head_params": embedding, "layers": cfg.num_hidden_layers,
            "heads": heads, "kv_heads": kv, "head_dim": d, "hidden": h, "vocab": cfg.vocab_size}


FLOPS_FORMULA = ("prefill FLOPs = 2*linear_params*tokens (q,k,v,o,gate,up,down of every layer) "
                 "+ 4*layers*heads*head_dim*n*(n+1)/2 per prompt of n tokens (QK^T and PV, causal: query i "
                 "sees i keys) + 2*vocab*hidden per sampled row (lm_head on the last token only); "
                 "norms, rotary, softmax and activations not counted. The same useful-work count is used "
                 "for both engines.")
DECODE_METHOD = ("decode tok/s = (N - K) / (T - T_first) within one generate call: T its wall time, T_first when "
                 "every prompt has its first new token, K the new tokens existing then, N all new tokens; "
                 "e2e tok/s = N / T; best of the reps")
ROOFLINE_FORMULA = ("decode step of B sequences: bytes = weight_bytes (fp32 parameters, tied embedding "
                    "counted once); FLOPs = 2*(linear_params + lm_head_params)*B + 4*layers*heads*head_dim*ctx*B "
                    "with ctx = prompt_len + new_tokens/2 the average context; roofline tok/s = "
                    "B / max(bytes / mem_read_bw, FLOPs / matmul_peak). The _with_kv variant adds the KV-cache "
                    "bytes read per step (B*ctx*layers*2*kv_heads*head_dim*4).")


def prefill_flops(c: dict[str, int], num: int, n: int) -> float:
    attn = 4 * c["layers"] * c["heads"] * c["head_dim"] * n * (n + 1) / 2
    return num * (2 * c["linear_params"] * n + attn + 2 * c["lm_head_params"])


def decode_roofline(c: dict[str, int], batch: int, ctx: float, bw: float, peak: float) -> dict[str, float]:
    flops = (2 * (c["linear_params"] + c["lm_head_params"]) * batch
             + 4 * c["layers"] * c["heads"] * c["head_dim"] * ctx * batch)
    t_mem = c["weight_bytes"] / (bw * 1e9)
    kv = batch * ctx * c["layers"] * 2 * c["kv_heads"] * c["head_dim"] * 4
    t_flop = flops / (peak * 1e9)
    return {"step_flops": flops, "t_mem_ms": t_mem * 1e3, "t_flops_ms": t_flop * 1e3,
            "tok_s": batch / max(t_mem, t_flop), "tok_s_with_kv": batch / max(t_mem + kv / (bw * 1e9), t_flop)}


# ---------------------------------------------------------------------------------------------
# profile: where our engine's step time goes (simple timers around the engine's parts)


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

    def __init__(self, llm) -> None:
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


# ---------------------------------------------------------------------------------------------
# the run


def _strip_tokens(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "tokens"}


def _ratio(a, b, digits: int = 3):
    return round(a / b, digits) if a is not None and b else None


def run(args) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    quick = args.quick
    cfg = {
        "single_new_tokens": 64 if quick else 128, "single_reps": 1 if quick else 3,
        "batch": 32, "batch_prompt_len": 128, "batch_new_tokens": 32 if quick else 128, "batch_reps": 1 if quick else 2,
        "prefill_prompts": 8, "prefill_len": 512, "prefill_reps": 1 if quick else 3,
    }
    opts = {"quiet_wait": args.wait_quiet, "retries": args.retries}
    load_before = os.getloadavg()
    if load_before[0] > 0.5 * THREADS:
        print(f"warning: load average {load_before[0]:.2f} on {os.cpu_count()} cpus: other processes are "
              f"running and will slow every figure here", flush=True)
    print(f"measuring the machine ({THREADS} threads) ...", flush=True)
    wait_quiet(args.wait_quiet)
    machine = MachineProbe(quick)
    machine_before = machine.full()

    from engine.loader.gguf import default_model_path

    path = default_model_path()
    hf = None if args.skip_hf else RemoteHF(path)  # loads in its own process while ours loads here
    print("loading the engines ...", flush=True)
    ours = OurEngine()
    hf_info = hf.wait_loaded() if hf else None
    counts = model_counts(ours.llm)
    vocab = counts["vocab"]
    engines = [ours] + ([hf] if hf else [])

    chat = ours.chat_ids()
    batch_prompts = random_prompts(cfg["batch"], cfg["batch_prompt_len"], vocab, SEED)
    prefill_prompts = random_prompts(cfg["prefill_prompts"], cfg["prefill_len"], vocab, SEED + 1)
    res: dict[str, dict[str, Any]] = {}
    wait_quiet(args.wait_quiet)
    machine.probe("before single")
    names = " and ".join(e.name for e in engines)
    print(f"single decode: {names} ...", flush=True)
    res["single"] = decode_workload(engines, [chat], cfg["single_new_tokens"], [chat], cfg["single_reps"], **opts)
    warm = random_prompts(cfg["batch"], 16, vocab, SEED + 2)
    wait_quiet(args.wait_quiet)
    machine.probe("before batch32")
    print(f"batch32 decode: {names} ...", flush=True)
    res["batch32"] = decode_workload(engines, batch_prompts, cfg["batch_new_tokens"], warm, cfg["batch_reps"],
                                     **opts)
    warm = random_prompts(1, cfg["prefill_len"], vocab, SEED + 3)
    wait_quiet(args.wait_quiet)
    machine.probe("before prefill")
    print(f"prefill: {names} ...", flush=True)
    res["prefill"] = prefill_workload(engines, prefill_prompts, warm, cfg["prefill_reps"], **opts)
    peak_rss = _maxrss_mb()

    profile = None
    if args.profile:
        print("profiling our engine ...", flush=True)
        profile = run_profile(ours, {
            "single": ([chat], 64),
            "batch32": (batch_prompts, 32),
            "prefill": (prefill_prompts, 1),
        }, args.wait_quiet)
    hf_rss = hf.close() if hf else None
    print("measuring the machine again ...", flush=True)
    wait_quiet(args.wait_quiet)
    machine_after = machine.full()
    machine.close()
    load_after = os.getloadavg()

    mm = [machine_before["matmul_2048_gflops"], machine_after["matmul_2048_gflops"]]
    mm += [p["matmul_gflops"] for p in machine.probes]
    mv = [machine_before["mem_read_matvec_gbs"], machine_after["mem_read_matvec_gbs"]]
    mv += [p["matvec_gbs"] for p in machine.probes]
    # the limits: the best seen in the run, full measurements and probes alike
    peak = max(machine_before["matmul_peak_gflops"], machine_after["matmul_peak_gflops"], *mm)
    bw = max(machine_before["mem_read_bw_gbs"], machine_after["mem_read_bw_gbs"], *mv)

    def get(w, e, k):
        return res[w].get(e, {}).get(k)

    s_ours, s_hf = get("single", "pdserve", "decode_tok_s"), get("single", "transformers", "decode_tok_s")
    b_ours, b_hf = get("batch32", "pdserve", "decode_tok_s"), get("batch32", "transformers", "decode_tok_s")
    p_ours, p_hf = get("prefill", "pdserve", "tok_s"), get("prefill", "transformers", "tok_s")
    ctx = cfg["batch_prompt_len"] + cfg["batch_new_tokens"] / 2
    roof32 = decode_roofline(counts, cfg["batch"], ctx, bw, peak)
    # the same roofline from the two short probes that bracket the batch32 workload: the host's
    # speed around it, where the headline above takes the best moment of the whole run
    around = [p for p in machine.probes if p["when"] in ("before batch32", "before prefill")]
    roof32_around = (decode_roofline(counts, cfg["batch"], ctx, max(p["matvec_gbs"] for p in around),
                                     max(p["matmul_gflops"] for p in around)) if len(around) == 2 else None)
    roof1 = decode_roofline(counts, 1, len(chat) + cfg["single_new_tokens"] / 2, bw, peak)
    pf = prefill_flops(counts, cfg["prefill_prompts"], cfg["prefill_len"])
    p_tokens = cfg["prefill_prompts"] * cfg["prefill_len"]
    prefill_gflops = pf / (p_tokens / p_ours) / 1e9
    prefill_hf_gflops = pf / (p_tokens / p_hf) / 1e9 if p_hf else None

    match_single = match_batch = None
    if hf:
        match_single = _match_prefix(res["single"]["pdserve"]["tokens"][0], res["single"]["transformers"]["tokens"][0])
        pairs = zip(res["batch32"]["pdserve"]["tokens"], res["batch32"]["transformers"]["tokens"])
        match_batch = [_match_prefix(a, b) for a, b in pairs]

    out = {
        "model": os.path.basename(path), "dtype": "float32", "quick": quick, "config": cfg,
        "wait_quiet_s": args.wait_quiet, "retries": args.retries,
        "machine": {
            "torch": torch.__version__, "threads": THREADS, "python": platform.python_version(),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
            "before": machine_before, "after": machine_after, "probes": machine.probes,
            "spread": {"matmul_2048_gflops": [min(mm), max(mm)], "matvec_gbs": [min(mv), max(mv)]},
        },
        "matmul_peak_gflops": peak, "mem_read_bw_gbs": bw,
        "model_counts": counts,
        "engine_commit": _git_commit(),
        "attention_backend": type(ours.llm.engine.runner.model.model.layers[0].self_attn.backend).__name__,
        "decoder_stack": ("one C call" if ours.llm.engine.runner.native_unsupported is None
                          else f"Python ({ours.llm.engine.runner.native_unsupported})"),
        "load_s": {"pdserve": round(ours.load_s, 1), "transformers": round(hf_info["load_s"], 1) if hf_info else None},
        "hf_attn_implementation": hf_info["attn_impl"] if hf_info else None,
        "decode_method": DECODE_METHOD,
        "single_decode_tok_s": s_ours,
        "single_decode_hf_tok_s": s_hf,
        "single_decode_vs_hf": _ratio(s_ours, s_hf),
        "single_decode_roofline_tok_s": round(roof1["tok_s"], 1),
        "single_decode_frac_of_roofline": _ratio(s_ours, roof1["tok_s"]),
        "single_ttft_s": get("single", "pdserve", "t_first_s"),
        "single_ttft_hf_s": get("single", "transformers", "t_first_s"),
        "single_greedy_match_prefix": match_single,
        "batch32_decode_tok_s": b_ours,
        "batch32_hf_tok_s": b_hf,
        "batch32_e2e_tok_s": get("batch32", "pdserve", "e2e_tok_s"),
        "batch32_hf_e2e_tok_s": get("batch32", "transformers", "e2e_tok_s"),
        "batch32_roofline_tok_s": round(roof32["tok_s"], 1),
        "batch32_roofline_with_kv_tok_s": round(roof32["tok_s_with_kv"], 1),
        "batch32_roofline_detail": {k: round(v, 3) for k, v in roof32.items()},
        "batch32_frac_of_roofline": _ratio(b_ours, roof32["tok_s"]),
        "batch32_hf_frac_of_roofline": _ratio(b_hf, roof32["tok_s"]),
        "batch32_roofline_around_tok_s": round(roof32_around["tok_s"], 1) if roof32_around else None,
        "batch32_frac_of_roofline_around": _ratio(b_ours, roof32_around["tok_s"]) if roof32_around else None,
        "batch32_hf_frac_of_roofline_around": _ratio(b_hf, roof32_around["tok_s"]) if roof32_around else None,
        "batch32_vs_hf": _ratio(b_ours, b_hf),
        "batch32_greedy_match_prefix_min": min(match_batch) if match_batch else None,
        "batch32_greedy_match_prefix_mean": round(sum(match_batch) / len(match_batch), 1) if match_batch else None,
        "prefill_tok_s": p_ours,
        "prefill_hf_tok_s": p_hf,
        "prefill_vs_hf": _ratio(p_ours, p_hf),
        "prefill_gflops": round(prefill_gflops, 1),
        "prefill_hf_gflops": round(prefill_hf_gflops, 1) if prefill_hf_gflops else None,
        "prefill_flops_frac": _ratio(prefill_gflops, peak),
        "prefill_hf_flops_frac": _ratio(prefill_hf_gflops, peak),
        "prefill_flops_per_run": pf,
        "flops_formula": FLOPS_FORMULA,
        "roofline_formula": ROOFLINE_FORMULA,
        "peak_rss_mb": round(peak_rss, 1),
        "peak_rss_hf_mb": round(hf_rss, 1) if hf_rss else None,
        "kv_cache_mb": round(ours.llm.engine.runner.kv_cache.numel() * 4 / 2 ** 20, 1),
        "workloads": {w: {e: _strip_tokens(r) for e, r in d.items()} for w, d in res.items()},
        "targets": {
            "single_decode_vs_hf >= 1.3": _ge(_ratio(s_ours, s_hf), 1.3),
            "batch32_frac_of_roofline >= 0.6": _ge(_ratio(b_ours, roof32["tok_s"]), 0.6),
            "prefill_flops_frac >= 0.8": _ge(_ratio(prefill_gflops, peak), 0.8),
            "prefill_vs_hf > 1": _ge(_ratio(p_ours, p_hf), 1.0 + 1e-9),
        },
        "profile": profile,
        "bench_wall_s": round(time.perf_counter() - started, 1),
    }
    return out


def _ge(x, y):
    return None if x is None else bool(x >= y)


def _git_commit() -> str | None:
    import subprocess

    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "engine"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(r: dict[str, Any]) -> None:
    m = r["machine"]
    print()
    print(f"machine: {m['cpu']}, {m['cpu_count']} cpus, torch {m['torch']}, {m['threads']} threads, "
          f"load avg {m['loadavg_before'][0]} -> {m['loadavg_after'][0]}")
    print(f"  fp32 matmul peak {r['matmul_peak_gflops']:.1f} GFLOP/s   memory read {r['mem_read_bw_gbs']:.1f} GB/s   "
          f"(before {m['before']['matmul_peak_gflops']}/{m['before']['mem_read_bw_gbs']}, "
          f"after {m['after']['matmul_peak_gflops']}/{m['after']['mem_read_bw_gbs']})")
    sp = m["spread"]
    print(f"  drift during the run: matmul(2048) {sp['matmul_2048_gflops'][0]}-{sp['matmul_2048_gflops'][1]} "
          f"GFLOP/s, matvec {sp['matvec_gbs'][0]}-{sp['matvec_gbs'][1]} GB/s "
          "(compare engines within a workload, not across runs)")
    w = r["workloads"]

    def util(work, eng):
        return _fmt(w[work].get(eng, {}).get("cpu_util"), ".2f")
    rows = [
        ("single decode tok/s", r["single_decode_tok_s"], r["single_decode_hf_tok_s"],
         f"roofline {r['single_decode_roofline_tok_s']:.1f}", r["single_decode_vs_hf"],
         util("single", "pdserve"), util("single", "transformers")),
        ("  time to first token s", r["single_ttft_s"], r["single_ttft_hf_s"], "", None, "", ""),
        ("batch32 decode tok/s", r["batch32_decode_tok_s"], r["batch32_hf_tok_s"],
         f"roofline {r['batch32_roofline_tok_s']:.1f}", r["batch32_vs_hf"],
         util("batch32", "pdserve"), util("batch32", "transformers")),
        ("  end-to-end new tok/s", r["batch32_e2e_tok_s"], r["batch32_hf_e2e_tok_s"], "", None, "", ""),
        ("prefill tok/s", r["prefill_tok_s"], r["prefill_hf_tok_s"], "", r["prefill_vs_hf"],
         util("prefill", "pdserve"), util("prefill", "transformers")),
        ("  prefill GFLOP/s", r["prefill_gflops"], r["prefill_hf_gflops"],
         f"peak {r['matmul_peak_gflops']:.1f}", None, "", ""),
    ]
    print()
    print(f"{'workload':<26}{'pdserve':>10}{'transformers':>14}{'limit':>18}{'ours/hf':>9}{'cpu util':>13}")
    for name, a, b, lim, ratio, ua, ub in rows:
        ut = f"{ua}/{ub}" if ua else ""
        print(f"{name:<26}{_fmt(a, '.2f'):>10}{_fmt(b, '.2f'):>14}{lim:>18}{_fmt(ratio, '.2f'):>9}{ut:>13}")
    print()
    print(f"fractions: batch32 of roofline ours {_fmt(r['batch32_frac_of_roofline'], '.3f')} "
          f"hf {_fmt(r['batch32_hf_frac_of_roofline'], '.3f')} (roofline with KV reads "
          f"{r['batch32_roofline_with_kv_tok_s']:.1f});  prefill of matmul peak ours "
          f"{_fmt(r['prefill_flops_frac'], '.3f')} hf {_fmt(r['prefill_hf_flops_frac'], '.3f')}")
    if r.get("batch32_frac_of_roofline_around") is not None:
        print(f"  batch32 against the probes around it (roofline {r['batch32_roofline_around_tok_s']:.1f}): ours "
              f"{r['batch32_frac_of_roofline_around']:.3f} hf {_fmt(r['batch32_hf_frac_of_roofline_around'], '.3f')}")
    print(f"greedy agreement with transformers: single {r['single_greedy_match_prefix']} leading tokens; "
          f"batch32 min {r['batch32_greedy_match_prefix_min']} mean {r['batch32_greedy_match_prefix_mean']}")
    print(f"engine {r['engine_commit']}, attention backend {r['attention_backend']}, "
          f"decoder stack {r.get('decoder_stack')}")
    print(f"peak RSS: pdserve {r['peak_rss_mb']:.0f} MB (KV cache {r['kv_cache_mb']:.0f} MB), "
          f"transformers {_fmt(r['peak_rss_hf_mb'], '.0f')} MB;  load s: {r['load_s']}")
    print("targets: " + ", ".join(f"{k}: {v}" for k, v in r["targets"].items()))
    if r.get("profile"):
        print()
        print("profile of our engine, ms per step:")
        parts = (*StepProfiler.PARTS, "total")
        print(f"{'workload':<18}{'steps':>6}" + "".join(f"{p[:10]:>11}" for p in parts))
        for work, d in r["profile"].items():
            for kind in ("prefill", "decode"):
                if kind in d:
                    row = d[kind]
                    print(f"{work + ' ' + kind:<18}{row['steps']:>6}"
                          + "".join(f"{row[p + '_ms']:>11.2f}" for p in parts))
    print(f"\nbench wall time {r['bench_wall_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="FILE", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="fewer new tokens and repetitions")
    ap.add_argument("--skip-hf", action="store_true", help="do not run the transformers reference")
    ap.add_argument("--profile", action="store_true", help="also time the parts of our engine's steps")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each timed run, wait up to S seconds for other processes to leave the cpus idle")
    ap.add_argument("--retries", type=int, default=0,
                    help="extra runs allowed per workload when a run was slowed by other processes (cpu util < 0.85)")
    args = ap.parse_args(argv)
    result = run(args)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
