"""Benchmark a running cluster through the SDK, the way vLLM's benchmark_serving and SGLang's bench_serving do.

    pdserve bench --workload longtail --num-requests 200 --rate 4 --json run.json
    pdserve bench --workload fixed --prompt-len 512 --output-len 64 --concurrency 8
    pdserve bench --sweep 1,2,4,8 --ttft-slo 1 --tpot-slo 0.2 --label tp1 --json tp1.json --plot tp1.png
    pdserve bench --plot-from tp1.json tp2.json --plot compare.png

Prompts are seeded random token ids, sent with ignore_eos and max_tokens = the output length, so every request
generates exactly the tokens the workload asks for. All requests run on one asyncio event loop (AsyncClient); times
are client-side, from time.perf_counter:

  TTFT  send to the first chunk that carries tokens
  ITL   each later chunk's gap to the previous one, divided over the chunk's tokens: one value per output token after
        the first (0 for the others in the first chunk), so their sum is the last chunk's time minus TTFT
  TPOT  (e2e - TTFT) / (output tokens - 1), per request
  E2E   send to the end of the stream

SLO attainment counts a request that failed as missing both targets. Goodput (sweeps) is the highest rate at which at
least 90% of the requests meet both the TTFT and the TPOT target.

From Python: make_requests(...) then run_benchmark(...) or run_sweep(...), which return the same dicts as --json.
numpy is not needed; matplotlib only for plots.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pdserve.client import AsyncClient, Client, RequestError

DEFAULT_ADDRESS = "127.0.0.1:50051"
PERCENTILES = (50, 90, 99)
SERVER_TIMINGS = ("queue_ms", "prefill_ms", "transfer_ms")
WORKLOADS = ("fixed", "uniform", "longtail")
Request = tuple[list[int], int]  # (prompt token ids, output length)


@dataclass(frozen=True)
class LongtailMix:
    """The longtail workload: mostly short chats, some long documents. Lengths in tokens, ranges inclusive."""
    document_fraction: float = 0.2
    chat_prompt: tuple[int, int] = (32, 256)
    chat_output: tuple[int, int] = (32, 128)
    document_prompt: tuple[int, int] = (1024, 3072)
    document_output: tuple[int, int] = (16, 64)


@dataclass(frozen=True)
class Workload:
    """How long each request's prompt and output are. `kind` picks which fields apply."""
    kind: str = "fixed"  # "fixed", "uniform" or "longtail"
    prompt_len: int = 256  # fixed
    output_len: int = 128  # fixed
    prompt_range: tuple[int, int] = (32, 512)  # uniform, inclusive
    output_range: tuple[int, int] = (16, 256)  # uniform, inclusive
    longtail: LongtailMix = LongtailMix()

    def __post_init__(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(f"workload {self.kind!r}; choose one of {', '.join(WORKLOADS)}")
        if min(self.prompt_len, self.output_len, *self.prompt_range, *self.output_range) < 1:
            raise ValueError("prompt and output lengths must be at least 1 token")
        for name in ("prompt_range", "output_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} ({lo}, {hi}): the minimum must not exceed the maximum")

    def draw(self, rng: random.Random) -> tuple[int, int]:
        """One (prompt_len, output_len)."""
        if self.kind == "fixed":
            return self.prompt_len, self.output_len
        if self.kind == "uniform":
            return rng.randint(*self.prompt_range), rng.randint(*self.output_range)
        mix = self.longtail
        if rng.random() < mix.document_fraction:
            return rng.randint(*mix.document_prompt), rng.randint(*mix.document_output)
        return rng.randint(*mix.chat_prompt), rng.randint(*mix.chat_output)


def make_requests(workload: Workload | str, n: int, seed: int, vocab: int, max_len: int) -> list[Request]:
    """n (prompt_ids, output_len) pairs: ids uniform in [0, vocab), prompt + output clipped to max_len (the context)
    by shortening the prompt, so the output length stays what the workload asked. Same arguments, same requests."""
    workload = Workload(workload) if isinstance(workload, str) else workload
    if max_len < 2:
        raise ValueError(f"max_len={max_len}: the context must hold at least one prompt and one output token")
    rng = random.Random(seed)
    # All lengths first, so clipping (which changes how many ids are drawn) never changes another request's lengths.
    lengths = [workload.draw(rng) for _ in range(n)]
    requests = []
    for prompt_len, output_len in lengths:
        output_len = min(output_len, max_len - 1)
        prompt_len = min(prompt_len, max_len - output_len)
        requests.append((rng.choices(range(vocab), k=prompt_len), output_len))
    return requests


def arrival_times(n: int, rate: float | None, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: a Poisson process of `rate` requests/s (exponential
    gaps), or all at 0 when rate is None or inf."""
    if rate is None or math.isinf(rate):
        return [0.0] * n
    rng = random.Random(f"arrivals-{seed}")  # its own stream: the prompts stay the same whatever the rate
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


@dataclass
class RequestResult:
    """One request as the client saw it. Times in seconds."""
    prompt_len: int
    output_len: int  # max_tokens asked for
    status: str = "OK"  # the gRPC status name, or the exception's type when the client itself failed
    error: str = ""
    send_time: float = 0.0  # from the run's start
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    server: dict[str, Any] = field(default_factory=dict)  # the last chunk's timings: *_ms and path

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.num_output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.num_output_tokens - 1)

    def meets(self, ttft_slo: float, tpot_slo: float) -> tuple[bool, bool]:
        """(TTFT met, TPOT met); a one-token output has no TPOT to miss."""
        if not self.ok:
            return False, False
        return self.ttft <= ttft_slo, self.tpot is None or self.tpot <= tpot_slo


async def send(client: AsyncClient, prompt: list[int], output_len: int, model: str = "",
               t0: float = 0.0) -> RequestResult:
    """Send one request and time its stream; never raises for a failed request."""
    result = RequestResult(len(prompt), output_len)
    start = time.perf_counter()
    result.send_time = start - t0
    last, finished = start, False
    try:
        stream = client.stream(prompt, model=model, max_tokens=output_len, ignore_eos=True, temperature=0)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                now = time.perf_counter()
                if n := len(chunk.token_ids):
                    if result.ttft is None:
                        result.ttft = now - start
                        result.itl += [0.0] * (n - 1)  # the rest of a first chunk came with the first token
                    else:
                        result.itl += [(now - last) / n] * n
                    last = now
                    result.num_output_tokens += n
                result.server = chunk.timings or result.server
                finished = chunk.finish_reason is not None
        result.e2e = time.perf_counter() - start
        if not finished or result.ttft is None:
            result.status, result.error = "INCOMPLETE", "the stream ended without tokens or a finish reason"
    except RequestError as e:
        result.status, result.error = e.code.name, e.details
    except Exception as e:  # noqa: BLE001 - a benchmark counts failures, it does not stop at the first
        result.status, result.error = type(e).__name__, str(e)
    return result


async def benchmark(address: str, requests: Sequence[Request], rate: float | None = None,
                    concurrency: int | None = None, *, seed: int = 0, warmup: Sequence[Request] = (),
                    ttft_slo: float = 1.0, tpot_slo: float = 0.2, model: str = "", timeout: float | None = None,
                    progress: Callable[[int, int, int], None] | None = None, detailed: bool = False) -> dict[str, Any]:
    """As run_benchmark, in the caller's event loop; progress(done, failed, total) is called as requests finish."""
    if rate is not None and not rate > 0 or concurrency is not None and concurrency < 1:
        raise ValueError(f"rate={rate}, concurrency={concurrency}: the rate must be positive (inf: all at once) and "
                         "the concurrency at least 1 (None: no cap)")
    sem = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()
    done, failed = 0, 0

    async def one(prompt: list[int], output_len: int, t0: float, measured: bool = True) -> RequestResult:
        nonlocal done, failed
        async with sem:
            result = await send(client, prompt, output_len, model, t0)
        if measured:
            done, failed = done + 1, failed + (not result.ok)
            if progress is not None:
                progress(done, failed, len(requests))
        return result

    async with AsyncClient(address, timeout=timeout) as client:
        if warmup:
            await asyncio.gather(*(one(p, n, 0.0, measured=False) for p, n in warmup))
        t0 = time.perf_counter()
        tasks = []
        for (prompt, output_len), at in zip(requests, arrival_times(len(requests), rate, seed)):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))  # against the start, so delays never add up
            tasks.append(asyncio.create_task(one(prompt, output_len, t0)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    run = {"rate": None if rate is None or math.isinf(rate) else rate, "concurrency": concurrency, "seed": seed,
           **summarize(results, duration, ttft_slo, tpot_slo)}
    if detailed:
        run["requests"] = [asdict(r) | {"tpot": r.tpot} for r in results]
    return run


def run_benchmark(address: str, requests: Sequence[Request], rate: float | None = None,
                  concurrency: int | None = None, **kw: Any) -> dict[str, Any]:
    """One run: send `requests` (from make_requests) at `rate` requests/s, Poisson arrivals (None or inf: all at
    once), at most `concurrency` in flight (None: no cap). Keywords: seed (arrivals), warmup (requests sent first and
    left out of the stats), ttft_slo and tpot_slo (seconds), model, timeout (per request, seconds), progress
    (a callback, or True for a line on stderr), detailed (add every request's measurements). Returns summarize's dict
    plus rate, concurrency and seed."""
    if kw.get("progress") is True:
        kw["progress"] = progress_line(f"{describe_load(rate, concurrency)}: ")
    elif not kw.get("progress"):
        kw["progress"] = None
    return asyncio.run(benchmark(address, requests, rate, concurrency, **kw))


def run_sweep(address: str, requests: Sequence[Request], rates: Sequence[float], *, label: str | None = None,
              warmup: Sequence[Request] = (), target: float = 0.9, **kw: Any) -> dict[str, Any]:
    """One run per rate, in order, the same requests each time (warmup before the first only). Keywords as
    run_benchmark's. Returns {"label", "runs", "goodput_rps", "attainment_target"}."""
    runs = [run_benchmark(address, requests, rate, warmup=warmup if i == 0 else (), **kw)
            for i, rate in enumerate(rates)]
    return {"label": label, "runs": runs, "goodput_rps": goodput(runs, target), "attainment_target": target}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile, interpolated linearly between the closest ranks (numpy's default); None when empty."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: Sequence[float], scale: float = 1e3) -> dict[str, float | None]:
    """mean and PERCENTILES of values * scale (seconds to ms by default)."""
    xs = [v * scale for v in values]
    return {"mean": sum(xs) / len(xs) if xs else None, **{f"p{q}": percentile(xs, q) for q in PERCENTILES}}


def summarize(results: Sequence[RequestResult], duration: float, ttft_slo: float, tpot_slo: float) -> dict[str, Any]:
    """Throughput, latency distributions (ms), SLO attainment, failures by status and prefill paths of one run."""
    ok = [r for r in results if r.ok]
    duration = max(duration, 1e-9)
    num_in, num_out = sum(r.prompt_len for r in ok), sum(r.num_output_tokens for r in ok)
    met = [r.meets(ttft_slo, tpot_slo) for r in results]

    def share(count: int) -> float | None:
        return count / len(results) if results else None

    return {
        "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration, "total_input_tokens": num_in, "total_output_tokens": num_out,
        "request_throughput": len(ok) / duration, "output_throughput": num_out / duration,
        "total_token_throughput": (num_in + num_out) / duration,
        "ttft_ms": distribution([r.ttft for r in ok]),
        "tpot_ms": distribution([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": distribution([gap for r in ok for gap in r.itl]),
        "e2e_ms": distribution([r.e2e for r in ok]),
        "server_ms": {k: distribution([r.server[k] for r in ok if k in r.server], scale=1) for k in SERVER_TIMINGS},
        "slo": {"ttft_s": ttft_slo, "tpot_s": tpot_slo, "ttft": share(sum(t for t, _ in met)),
                "tpot": share(sum(p for _, p in met)), "both": share(sum(t and p for t, p in met))},
        "failures": dict(Counter(r.status for r in results if not r.ok)),
        "errors": {r.status: r.error for r in reversed(results) if not r.ok},  # the first message of each status
        "paths": dict(Counter(r.server.get("path") or "unknown" for r in ok)),
    }


def goodput(runs: Sequence[dict[str, Any]], target: float = 0.9) -> float | None:
    """The highest rate among runs where at least `target` of the requests met both SLOs; None when none did."""
    passing = [run["rate"] for run in runs if run["rate"] is not None and (run["slo"]["both"] or 0) >= target]
    return max(passing, default=None)


def progress_line(prefix: str = "") -> Callable[[int, int, int], None]:
    """A progress callback that rewrites one line on stderr."""
    def show(done: int, failed: int, total: int) -> None:
        sys.stderr.write(f"\r{prefix}{done}/{total} requests done" + (f", {failed} failed" if failed else ""))
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def format_rate(rate: float | None) -> str:
    return "inf" if rate is None or math.isinf(rate) else f"{rate:g}"


def describe_load(rate: float | None, concurrency: int | None) -> str:
    return f"rate {format_rate(rate)} req/s, " + (f"concurrency {concurrency}" if concurrency else "no concurrency cap")


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def format_run(run: dict[str, Any]) -> str:
    """One run as a block of text, vLLM-style."""
    slo = run["slo"]
    lines = [(f"{describe_load(run['rate'], run['concurrency'])}: "
              f"{run['completed']}/{run['num_requests']} requests succeeded in {run['duration_s']:.2f} s"),
             (f"throughput  {run['request_throughput']:.2f} req/s, {run['output_throughput']:.1f} output tok/s, "
              f"{run['total_token_throughput']:.1f} total tok/s"),
             f"{'(ms)':<6}{'mean':>10}" + "".join(f"{'p' + str(q):>10}" for q in PERCENTILES)]
    for name in ("ttft", "tpot", "itl", "e2e"):
        d = run[f"{name}_ms"]
        lines.append(f"{name.upper():<6}" + "".join(f"{_ms(v):>10}" for v in d.values()))
    lines.append(f"SLO attainment  TTFT <= {slo['ttft_s'] * 1e3:g} ms: {_pct(slo['ttft'])}, TPOT <= "
                 f"{slo['tpot_s'] * 1e3:g} ms: {_pct(slo['tpot'])}, both: {_pct(slo['both'])}")
    lines.append("prefill paths   " + ", ".join(f"{k} {v}" for k, v in sorted(run["paths"].items())))
    if run["failures"]:
        failures = (f"{status} {n} ({run['errors'][status]})" for status, n in run["failures"].items())
        lines.append("failures        " + ", ".join(failures))
    return "\n".join(lines)


def format_sweep(sweep: dict[str, Any]) -> str:
    """A sweep as a table, one row per rate, and its goodput."""
    head = ("rate", "ok", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "SLO ttft",
            "SLO tpot", "SLO both")
    rows = [head] + [(format_rate(r["rate"]), f"{r['completed']}/{r['num_requests']}", f"{r['request_throughput']:.2f}",
                      f"{r['output_throughput']:.1f}", _ms(r["ttft_ms"]["p50"]), _ms(r["ttft_ms"]["p99"]),
                      _ms(r["tpot_ms"]["p50"]), _ms(r["tpot_ms"]["p99"]), _pct(r["slo"]["ttft"]),
                      _pct(r["slo"]["tpot"]), _pct(r["slo"]["both"])) for r in sweep["runs"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    slo, good = sweep["runs"][0]["slo"], sweep["goodput_rps"]
    lines.append(f"goodput: {'none of these rates' if good is None else f'{good:g} req/s'} (at least "
                 f"{sweep['attainment_target']:.0%} of requests within TTFT {slo['ttft_s']:g} s and TPOT "
                 f"{slo['tpot_s']:g} s)")
    return "\n".join(lines)


def plot_sweeps(sweeps: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Two charts side by side: TTFT and TPOT p50/p99 against rate (log scale, SLO targets dotted), and the share of
    requests meeting both SLOs against rate. One colour per sweep, so several configurations overlay."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(13, 5), layout="constrained")
    latency, attainment = fig.subplots(1, 2)
    styles = {("ttft_ms", "p50"): ("-", "o"), ("ttft_ms", "p99"): ("--", "o"),
              ("tpot_ms", "p50"): ("-", "s"), ("tpot_ms", "p99"): ("--", "s")}
    for i, sweep in enumerate(sweeps):
        runs = sorted((r for r in sweep["runs"] if r["rate"] is not None), key=lambda r: r["rate"])
        rates, color = [r["rate"] for r in runs], f"C{i}"
        for (metric, q), (line, marker) in styles.items():
            ys = [math.nan if r[metric][q] is None else r[metric][q] for r in runs]
            latency.plot(rates, ys, linestyle=line, marker=marker, color=color)
        good = sweep.get("goodput_rps")
        name = f"{sweep.get('label') or f'sweep {i + 1}'} (goodput {'none' if good is None else f'{good:g} req/s'})"
        attainment.plot(rates, [100 * (r["slo"]["both"] or 0) for r in runs], "-o", color=color, label=name)
    slo = sweeps[0]["runs"][0]["slo"]
    for name in ("ttft", "tpot"):
        latency.axhline(slo[f"{name}_s"] * 1e3, color="gray", linestyle=":")
        latency.text(0.01, slo[f"{name}_s"] * 1e3, f"{name.upper()} SLO", color="gray", va="bottom",
                     fontsize="small", transform=latency.get_yaxis_transform())  # x in axes, y in data
    keys = [Line2D([], [], color="black", linestyle=line, marker=marker, label=f"{metric[:4].upper()} {q}")
            for (metric, q), (line, marker) in styles.items()]
    latency.legend(handles=keys, fontsize="small")
    latency.set(yscale="log", xlabel="request rate (req/s)", ylabel="latency (ms)", title="Latency against rate")
    target = 100 * sweeps[0].get("attainment_target", 0.9)
    attainment.axhline(target, color="gray", linestyle=":", label=f"{target:g}% target")
    attainment.set(ylim=(-3, 103), xlabel="request rate (req/s)", ylabel="requests meeting TTFT and TPOT SLOs (%)",
                   title=f"SLO attainment (TTFT <= {slo['ttft_s']:g} s, TPOT <= {slo['tpot_s']:g} s)")
    attainment.legend(fontsize="small")
    for ax in (latency, attainment):
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


def load_sweep(path: str | Path) -> dict[str, Any]:
    """A sweep JSON written by --sweep --json; its label defaults to the file's name."""
    with open(path) as f:
        sweep = json.load(f)
    if not isinstance(sweep, dict) or not sweep.get("runs"):
        raise ValueError(f"{path} is not a sweep: write one with `pdserve bench --sweep r1,r2,... --json FILE`")
    return sweep | {"label": sweep.get("label") or Path(path).stem}


def _rate(text: str) -> float:
    rate = float(text)
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"rate {text}: must be positive (inf sends all at once)")
    return rate


def _rates(text: str) -> list[float]:
    rates = [_rate(r) for r in text.split(",") if r.strip()]
    if not rates or any(math.isinf(r) for r in rates):
        raise argparse.ArgumentTypeError(f"--sweep {text}: give finite rates, like 1,2,4,8")
    return rates


def _positive(text: str) -> int:
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d, mix = Workload(), LongtailMix()
    p = argparse.ArgumentParser(prog="pdserve bench", description="Benchmark a running pdserve cluster: throughput, "
                                "TTFT/TPOT/ITL/E2E latency and SLO attainment, at a request rate or a concurrency.")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help=f"router address (default {DEFAULT_ADDRESS})")
    p.add_argument("--model", default="", help="model name (default: the cluster's first)")
    w = p.add_argument_group("workload (prompts are seeded random token ids, outputs exactly output-len tokens)")
    w.add_argument("--workload", choices=WORKLOADS, default=d.kind,
                   help=f"fixed: --prompt-len/--output-len; uniform: lengths uniform in --min/--max-*-len; longtail: "
                        f"{100 - 100 * mix.document_fraction:g}%% chats (prompt {mix.chat_prompt[0]}-{mix.chat_prompt[1]}, "
                        f"output {mix.chat_output[0]}-{mix.chat_output[1]}) and {100 * mix.document_fraction:g}%% documents "
                        f"(prompt {mix.document_prompt[0]}-{mix.document_prompt[1]}, output "
                        f"{mix.document_output[0]}-{mix.document_output[1]}). Default %(default)s")
    w.add_argument("--prompt-len", type=_positive, default=d.prompt_len, help="fixed (default %(default)s)")
    w.add_argument("--output-len", type=_positive, default=d.output_len, help="fixed (default %(default)s)")
    w.add_argument("--min-prompt-len", type=_positive, default=d.prompt_range[0], help="uniform (default %(default)s)")
    w.add_argument("--max-prompt-len", type=_positive, default=d.prompt_range[1], help="uniform (default %(default)s)")
    w.add_argument("--min-output-len", type=_positive, default=d.output_range[0], help="uniform (default %(default)s)")
    w.add_argument("--max-output-len", type=_positive, default=d.output_range[1], help="uniform (default %(default)s)")
    w.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times (default 0)")
    w.add_argument("--num-requests", type=_positive, default=100, help="measured requests per run (default 100)")
    w.add_argument("--warmup", type=int, default=0, help="requests sent first, all at once, left out of the stats")
    load = p.add_argument_group("load")
    load.add_argument("--rate", type=_rate, help="open loop: Poisson arrivals at this many requests/s (default inf: "
                      "all at once)")
    load.add_argument("--concurrency", type=_positive, help="closed loop: at most this many requests in flight "
                      "(with --rate or --sweep: a cap on top of the arrivals)")
    load.add_argument("--sweep", type=_rates, help="comma-separated rates, one run each, e.g. 1,2,4,8; reports goodput")
    load.add_argument("--timeout", type=float, help="deadline of each request in seconds (default none)")
    slo = p.add_argument_group("SLOs (the router's defaults: router.ttft_slo_s, router.tpot_slo_s)")
    slo.add_argument("--ttft-slo", type=float, default=1.0, help="TTFT target in seconds (default %(default)s)")
    slo.add_argument("--tpot-slo", type=float, default=0.2, help="TPOT target in seconds (default %(default)s)")
    slo.add_argument("--attainment", type=float, default=0.9,
                     help="goodput: share of requests that must meet both targets (default %(default)s)")
    out = p.add_argument_group("output")
    out.add_argument("--label", help="name of this configuration, stored in the JSON and shown in plots")
    out.add_argument("--json", help="write the run (or the sweep: {label, runs, goodput_rps}) here")
    out.add_argument("--detailed", action="store_true", help="keep every request's measurements in the JSON")
    out.add_argument("--plot", help="PNG of the sweep: latency percentiles and SLO attainment against rate")
    out.add_argument("--plot-from", nargs="+", metavar="JSON",
                     help="plot these sweep JSONs on one chart (each with its label) into --plot; runs nothing")
    out.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    args = p.parse_args(argv)
    if args.plot_from and not args.plot:
        p.error("--plot-from needs --plot FILE.png")
    if args.plot and not (args.sweep or args.plot_from):
        p.error("--plot draws a sweep: add --sweep r1,r2,... (or --plot-from sweep JSONs)")
    if args.rate is not None and args.sweep:
        p.error("give --rate or --sweep, not both")
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_from:
        plot_sweeps([load_sweep(path) for path in args.plot_from], args.plot)
        print(f"wrote {args.plot}")
        return 0
    workload = Workload(args.workload, args.prompt_len, args.output_len, (args.min_prompt_len, args.max_prompt_len),
                        (args.min_output_len, args.max_output_len))
    try:
        with Client(args.address, timeout=10) as client:
            models = client.list_models()
    except RequestError as e:
        print(f"pdserve bench: no cluster answers at {args.address} ({e}); start one with `pdserve serve`",
              file=sys.stderr)
        return 1
    info = next((m for m in models if m.name == args.model), None) if args.model else models[0]
    if info is None:
        print(f"pdserve bench: the cluster has no model {args.model!r}; it serves {[m.name for m in models]}",
              file=sys.stderr)
        return 1
    requests = make_requests(workload, args.num_requests, args.seed, info.vocab_size, info.max_model_len)
    # Another seed for the warmup, so the measured prompts are the same with or without it.
    warmup = make_requests(workload, args.warmup, args.seed + 1, info.vocab_size, info.max_model_len)
    meta = {"label": args.label, "model": info.name, "address": args.address, "workload": asdict(workload),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    kw = {"concurrency": args.concurrency, "seed": args.seed, "warmup": warmup, "ttft_slo": args.ttft_slo,
          "tpot_slo": args.tpot_slo, "model": info.name, "timeout": args.timeout, "progress": not args.quiet,
          "detailed": args.detailed}
    if args.sweep:
        result = run_sweep(args.address, requests, args.sweep, label=args.label, target=args.attainment, **kw)
        result = meta | result | {"runs": [run | meta for run in result["runs"]]}
        print(format_sweep(result))
    else:
        result = run_benchmark(args.address, requests, args.rate, **kw) | meta
        print(format_run(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot_sweeps([result], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
