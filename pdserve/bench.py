"""Benchmark a running cluster, or any OpenAI-compatible server, the way vLLM's benchmark_serving and SGLang's
bench_serving do.

    pdserve bench --workload longtail --num-requests 200 --rate 4 --json run.json
    pdserve bench --backend openai --base-url http://127.0.0.1:8000/v1 --workload longtail --num-requests 200 --rate 4
    pdserve bench --workload fixed --prompt-len 512 --output-len 64 --concurrency 8
    pdserve bench --sweep 1,2,4,8 --ttft-slo 1 --tpot-slo 0.2 --label tp1 --json tp1.json --plot tp1.png
    pdserve bench --plot-from tp1.json tp2.json --plot compare.png

Prompts are seeded random token ids (below --vocab-size), sent greedy with ignore_eos and max_tokens = the output
length, so every request generates exactly the tokens the workload asks for; the same flags give the same prompts and
arrival times whichever backend sends them. One load generator, two senders (pdserve.request_result.BACKENDS):
grpc, the router's gRPC front door through the SDK's AsyncClient, and openai, POST {--base-url}/completions streamed
as server-sent events (pdserve's HTTP front door, vllm serve, or any other OpenAI-compatible server). All requests run
on one asyncio event loop; times are client-side, from time.perf_counter:

  TTFT  send to the first chunk that carries tokens
  ITL   each later chunk's gap to the previous one, divided over the chunk's tokens: one value per output token after
        the first (0 for the others in the first chunk), so their sum is the last chunk's time minus TTFT
  TPOT  (e2e - TTFT) / (output tokens - 1), per request
  E2E   send to the end of the stream

With openai, a chunk does not say how many tokens it holds: the usage chunk's completion_tokens is the output token
count (so TPOT and throughput mean what they do over gRPC), and each chunk with a choice counts as one arrival for TTFT
and ITL, as in vLLM's benchmark (a bare end marker, a finish_reason without text, does not). vLLM streams a chunk per
engine step, normally one token. pdserve's HTTP front door streams one chunk per router message, like its gRPC stream;
a message holds several tokens when they came faster than the router sent them: gRPC then splits the chunk's gap over
its tokens, openai keeps one (larger) gap for the chunk, so the ITL distributions may differ where TTFT, TPOT, E2E and
throughput do not. pdserve's HTTP chunks carry no server timings (prefill paths show as unknown).

SLO attainment counts a request that failed as missing both targets. Goodput (sweeps) is the highest rate at which at
least 90% of the requests meet both the TTFT and the TPOT target.

From Python: make_requests(...) then run_benchmark(...) or run_sweep(...), which return the same dicts as --json.
numpy is not needed; matplotlib only for plots, httpx only for the openai backend.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pdserve.bench_report import describe_load, format_rate, format_run, format_sweep, load_sweep, plot_sweeps
from pdserve.bench_stats import PERCENTILES, SERVER_TIMINGS, distribution, goodput, percentile, summarize
from pdserve.client import Client, RequestError
from pdserve.request_result import BACKENDS, RequestResult, openai_models, send
from pdserve.workload import (
    WORKLOADS,
    Conversation,
    LongtailMix,
    Request,
    Workload,
    arrival_times,
    make_conversations,
    make_requests,
    per_rate,
)

# This module once held the workloads, the measurements and the report too; what it defined stays importable from
# here, since scripts (and the README's "From Python") import it from pdserve.bench.
__all__ = ["BACKENDS", "DEFAULT_ADDRESS", "DEFAULT_VOCAB_SIZE", "PERCENTILES", "SERVER_TIMINGS", "WORKLOADS",
           "LongtailMix", "Request", "RequestResult", "Workload", "arrival_times", "benchmark", "describe_load",
           "distribution", "format_rate", "format_run", "format_sweep", "goodput", "load_sweep", "main",
           "make_requests", "parse_args", "percentile", "plot_sweeps", "progress_line", "run_benchmark", "run_sweep",
           "send", "served_model", "summarize"]

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Prompt ids are drawn below this (and below the model's vocabulary when the backend tells it), so that every backend
# sends the same prompts: the OpenAI API does not say a model's vocabulary, and nearly every model has at least 32000.
DEFAULT_VOCAB_SIZE = 32000


async def benchmark(address: str, requests: Sequence[Request], rate: float | None = None,
                    concurrency: int | None = None, *, backend: str = "grpc", api_key: str | None = None,
                    seed: int = 0, warmup: Sequence[Request] = (), ttft_slo: float = 1.0, tpot_slo: float = 0.2,
                    model: str = "", timeout: float | None = None,
                    progress: Callable[[int, int, int], None] | None = None, detailed: bool = False,
                    tls: bool = False, tls_ca: str | None = None) -> dict[str, Any]:
    """As run_benchmark, in the caller's event loop; progress(done, failed, total) is called as requests finish."""
    def job(prompt: list[int], output_len: int):
        async def run(send: Send) -> list[RequestResult]:
            return [await send(prompt, output_len)]
        return run
    return await _drive(address, [job(*r) for r in requests], len(requests), rate, concurrency, backend=backend,
                        api_key=api_key, seed=seed, warmup=[job(*r) for r in warmup], ttft_slo=ttft_slo,
                        tpot_slo=tpot_slo, model=model, timeout=timeout, progress=progress, detailed=detailed,
                        tls=tls, tls_ca=tls_ca)


async def benchmark_conversations(address: str, conversations: Sequence[Conversation], rate: float | None = None,
                                  concurrency: int | None = None, *, warmup: Sequence[Conversation] = (),
                                  **kw: Any) -> dict[str, Any]:
    """The multiturn workload (make_conversations): each conversation starts at its Poisson arrival time (`rate`
    conversations/s; None: all at once), at most `concurrency` at once, and sends its turns one after the other;
    a turn's prompt is the system prompt, every earlier user message and the answer the server gave it, and the new
    user message. The answers come back as token ids over grpc only. A conversation whose turn fails ends there.
    Keywords as benchmark's (warmup: conversations); every turn is one request in the stats."""
    if kw.get("backend", "grpc") != "grpc":
        raise ValueError("the multiturn workload resends the server's answers as token ids: use the grpc backend")

    def job(conv: Conversation):
        async def run(send: Send) -> list[RequestResult]:
            history, results = list(conv.system), []
            for user, output_len in conv.turns:
                results.append(result := await send(history + user, output_len))
                if not result.ok:
                    break
                history += user + result.token_ids
            return results
        return run
    total = sum(len(c.turns) for c in conversations)
    return await _drive(address, [job(c) for c in conversations], total, rate, concurrency,
                        warmup=[job(c) for c in warmup], **kw)


Send = Callable[[list[int], int], Any]  # send(prompt, output_len) -> awaitable RequestResult


async def _drive(address: str, jobs: Sequence[Callable[[Send], Any]], total: int, rate: float | None,
                 concurrency: int | None, *, backend: str = "grpc", api_key: str | None = None, seed: int = 0,
                 warmup: Sequence[Callable[[Send], Any]] = (), ttft_slo: float = 1.0, tpot_slo: float = 0.2,
                 model: str = "", timeout: float | None = None, progress: Callable[[int, int, int], None] | None = None,
                 detailed: bool = False, tls: bool = False, tls_ca: str | None = None) -> dict[str, Any]:
    """Start each job at its Poisson arrival time (at most `concurrency` at once): job(send) sends its requests
    (`total` in all) and returns their results. Warmup jobs run first, left out of the stats."""
    if rate is not None and not rate > 0 or concurrency is not None and concurrency < 1:
        raise ValueError(f"rate={rate}, concurrency={concurrency}: the rate must be positive (inf: all at once) and "
                         "the concurrency at least 1 (None: no cap)")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    sem = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()
    done, failed = 0, 0

    async def one(job: Callable[[Send], Any], t0: float, measured: bool = True) -> list[RequestResult]:
        async def send(prompt: list[int], output_len: int) -> RequestResult:
            nonlocal done, failed
            result = await sender.send(prompt, output_len, t0)
            if measured:
                done, failed = done + 1, failed + (not result.ok)
                if progress is not None:
                    progress(done, failed, total)
            return result
        async with sem:
            return await job(send)

    in_flight = concurrency or max(len(jobs), len(warmup), 1)
    async with BACKENDS[backend](address, model=model, timeout=timeout, api_key=api_key,
                                 max_connections=in_flight, tls=tls, tls_ca=tls_ca) as sender:
        if warmup:
            await asyncio.gather(*(one(job, 0.0, measured=False) for job in warmup))
        t0 = time.perf_counter()
        tasks = []
        for job, at in zip(jobs, arrival_times(len(jobs), rate, seed)):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))  # against the start, so delays never add up
            tasks.append(asyncio.create_task(one(job, t0)))
        results = [r for rs in await asyncio.gather(*tasks) for r in rs]
        duration = time.perf_counter() - t0
    run = {"rate": None if rate is None or math.isinf(rate) else rate, "concurrency": concurrency, "seed": seed,
           "backend": backend, **summarize(results, duration, ttft_slo, tpot_slo)}
    if detailed:
        run["requests"] = [{k: v for k, v in asdict(r).items() if k != "token_ids"} | {"tpot": r.tpot} for r in results]
    return run


def run_benchmark(address: str, requests: Sequence[Request], rate: float | None = None,
                  concurrency: int | None = None, **kw: Any) -> dict[str, Any]:
    """One run: send `requests` (from make_requests) at `rate` requests/s, Poisson arrivals (None or inf: all at
    once), at most `concurrency` in flight (None: no cap), to `address`: the router's host:port with backend "grpc"
    (the default), the API's base URL (http://host:port/v1) with backend "openai". Keywords: backend, api_key (sent as
    `Bearer KEY`; grpc without it: $PDSERVE_API_KEY), seed (arrivals), warmup (requests sent first and left out of the
    stats), ttft_slo and tpot_slo (seconds), model ("": the server's first), timeout (per request, seconds), progress
    (a callback, or True for a line on stderr), detailed (add every request's measurements), tls (grpc over TLS; an
    https:// URL is TLS already) and tls_ca (a PEM file of the roots to trust, for either; implies tls). Returns
    summarize's dict plus rate, concurrency, seed and backend. Conversations (make_conversations) in place of
    requests run the multiturn workload (benchmark_conversations: the rate counts conversations)."""
    if kw.get("progress") is True:
        kw["progress"] = progress_line(f"{describe_load(rate, concurrency)}: ")
    elif not kw.get("progress"):
        kw["progress"] = None
    if requests and isinstance(requests[0], Conversation):  # the multiturn workload: rate counts conversations
        return asyncio.run(benchmark_conversations(address, requests, rate, concurrency, **kw))
    return asyncio.run(benchmark(address, requests, rate, concurrency, **kw))


def run_sweep(address: str, requests: Sequence[Request], rates: Sequence[float], *, label: str | None = None,
              warmup: Sequence[Request] = (), target: float = 0.9, **kw: Any) -> dict[str, Any]:
    """One run per rate, in order, the same requests each time or, given one list of them per rate, each rate its
    own (workload.fresh_requests); warmup before the first only. Keywords as run_benchmark's. Returns
    {"label", "runs", "goodput_rps", "attainment_target"}."""
    runs = [run_benchmark(address, reqs, rate, warmup=warmup if i == 0 else (), **kw)
            for i, (reqs, rate) in enumerate(zip(per_rate(requests, len(rates)), rates))]
    return {"label": label, "runs": runs, "goodput_rps": goodput(runs, target), "attainment_target": target}


def progress_line(prefix: str = "") -> Callable[[int, int, int], None]:
    """A progress callback that rewrites one line on stderr."""
    def show(done: int, failed: int, total: int) -> None:
        sys.stderr.write(f"\r{prefix}{done}/{total} requests done" + (f", {failed} failed" if failed else ""))
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


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


def add_workload_flags(p: argparse.ArgumentParser) -> None:
    """The workload's flags, shared by `pdserve bench` and `pdserve simulate` (workload_of reads them)."""
    d, mix = Workload(), LongtailMix()
    sd, ch = d.shared_doc, d.multiturn
    w = p.add_argument_group("workload (prompts are seeded random token ids, outputs exactly output-len tokens)")
    w.add_argument("--workload", choices=WORKLOADS, default=d.kind,
                   help=f"fixed: --prompt-len/--output-len; uniform: lengths uniform in --min/--max-*-len; longtail: "
                        f"{100 - 100 * mix.document_fraction:g}%% chats (prompt "
                        f"{mix.chat_prompt[0]}-{mix.chat_prompt[1]}, output {mix.chat_output[0]}-{mix.chat_output[1]}) "
                        f"and {100 * mix.document_fraction:g}%% documents (prompt "
                        f"{mix.document_prompt[0]}-{mix.document_prompt[1]}, output "
                        f"{mix.document_output[0]}-{mix.document_output[1]}); shared-doc: {sd.num_documents} documents "
                        f"of {sd.document_len}, each prompt one of them and a question of {sd.question[0]}-"
                        f"{sd.question[1]}, output {sd.output[0]}-{sd.output[1]}; multiturn (grpc only): "
                        f"--num-requests conversations (and --rate conversations/s) sharing a {ch.system_len}-token "
                        f"system prompt, {ch.turns[0]}-{ch.turns[1]} turns each, every turn the whole history and a "
                        f"new message of {ch.user[0]}-{ch.user[1]}, answers of {ch.output[0]}-{ch.output[1]}. "
                        "Default %(default)s")
    w.add_argument("--prompt-len", type=_positive, default=d.prompt_len, help="fixed (default %(default)s)")
    w.add_argument("--output-len", type=_positive, default=d.output_len, help="fixed (default %(default)s)")
    w.add_argument("--min-prompt-len", type=_positive, default=d.prompt_range[0], help="uniform (default %(default)s)")
    w.add_argument("--max-prompt-len", type=_positive, default=d.prompt_range[1], help="uniform (default %(default)s)")
    w.add_argument("--min-output-len", type=_positive, default=d.output_range[0], help="uniform (default %(default)s)")
    w.add_argument("--max-output-len", type=_positive, default=d.output_range[1], help="uniform (default %(default)s)")
    w.add_argument("--vocab-size", type=_positive, default=DEFAULT_VOCAB_SIZE,
                   help="prompt ids are drawn below this, and below the model's vocabulary over grpc (default "
                        "%(default)s: the same prompts through either backend)")
    w.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times (default 0)")
    w.add_argument("--num-requests", type=_positive, default=100, help="measured requests per run (default 100)")
    w.add_argument("--warmup", type=int, default=0, help="requests sent first, all at once, left out of the stats")


def workload_of(args: argparse.Namespace) -> Workload:
    return Workload(args.workload, args.prompt_len, args.output_len, (args.min_prompt_len, args.max_prompt_len),
                    (args.min_output_len, args.max_output_len))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pdserve bench", description="Benchmark a running pdserve cluster, or any "
                                "OpenAI-compatible server (--backend openai): throughput, TTFT/TPOT/ITL/E2E latency "
                                "and SLO attainment, at a request rate or a concurrency.")
    p.add_argument("--backend", choices=BACKENDS, default="grpc",
                   help="grpc: the router's gRPC front door (--address); openai: POST {--base-url}/completions on any "
                        "OpenAI-compatible server, e.g. pdserve's HTTP front door or vllm serve (default %(default)s)")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help=f"grpc: router address (default {DEFAULT_ADDRESS})")
    p.add_argument("--base-url", help="openai: the API's base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", help="sent as `Authorization: Bearer KEY` (default $PDSERVE_API_KEY, then, for "
                                     "openai, $OPENAI_API_KEY)")
    p.add_argument("--model", default="", help="model name (default: the server's first)")
    p.add_argument("--tls", action="store_true", help="grpc: connect with TLS (the system's root certificates; "
                                                      "openai: an https:// --base-url is TLS)")
    p.add_argument("--tls-ca", help="PEM root certificate(s) to check the server's certificate against (grpc: implies "
                                    "--tls)")
    add_workload_flags(p)
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
    if not args.plot_from and args.backend == "openai" and not args.base_url:
        p.error("--backend openai sends to --base-url: give the API's base URL, e.g. http://127.0.0.1:8000/v1")
    if args.base_url and args.backend != "openai":
        p.error("--base-url is where --backend openai sends: add --backend openai (grpc sends to --address)")
    if args.base_url and not args.base_url.startswith(("http://", "https://")):
        p.error(f"--base-url {args.base_url}: give a URL that starts with http:// or https://, e.g. "
                "http://127.0.0.1:8000/v1")
    if args.api_key is None:
        openai_key = os.environ.get("OPENAI_API_KEY") if args.backend == "openai" else None
        args.api_key = os.environ.get("PDSERVE_API_KEY") or openai_key or None
    return args


def served_model(args: argparse.Namespace) -> tuple[str, str, int, int]:
    """(where to send, model name, max_model_len, vocabulary for the prompts) from the server args points at;
    LookupError with a message for the user when it does not answer or lacks the model."""
    if args.backend == "openai":
        try:
            models = openai_models(args.base_url, args.api_key, tls_ca=args.tls_ca)
        except ImportError as e:
            raise LookupError(str(e)) from e
        except Exception as e:  # noqa: BLE001 - any failure means the same to the user
            raise LookupError(f"no OpenAI-compatible API answers at {args.base_url} ({e}); check --base-url (it ends "
                              "in /v1) and --api-key") from e
        names = [m["id"] for m in models]
        entry = next((m for m in models if m["id"] == args.model), None) if args.model else next(iter(models), None)
        if entry is None:
            raise LookupError(f"the server has no model {args.model!r}; it serves {names}")
        # The OpenAI API tells no vocabulary; without max_model_len the prompts are not clipped.
        return args.base_url, entry["id"], entry.get("max_model_len") or sys.maxsize, args.vocab_size
    try:
        kw = {"api_key": args.api_key} if args.api_key else {}  # an older SDK takes no key
        if args.tls or args.tls_ca:
            kw |= {"tls": True, "root_certificates": args.tls_ca}
        with Client(args.address, timeout=10, **kw) as client:
            models = client.list_models()
    except RequestError as e:
        raise LookupError(f"no cluster answers at {args.address} ({e}); start one with `pdserve serve`") from e
    info = next((m for m in models if m.name == args.model), None) if args.model else models[0]
    if info is None:
        raise LookupError(f"the cluster has no model {args.model!r}; it serves {[m.name for m in models]}")
    return args.address, info.name, info.max_model_len, min(args.vocab_size, info.vocab_size)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_from:
        plot_sweeps([load_sweep(path) for path in args.plot_from], args.plot)
        print(f"wrote {args.plot}")
        return 0
    workload = workload_of(args)
    try:
        address, model, max_len, vocab = served_model(args)
    except LookupError as e:
        print(f"pdserve bench: {e}", file=sys.stderr)
        return 1
    # Another seed for the warmup, so the measured prompts are the same with or without it.
    if workload.kind == "multiturn":
        if args.backend != "grpc":
            print("pdserve bench: the multiturn workload resends the server's answers as token ids, which only the "
                  "grpc backend returns", file=sys.stderr)
            return 1
        requests = make_conversations(workload, args.num_requests, args.seed, vocab, max_len)
        warmup = make_conversations(workload, args.warmup, args.seed + 1, vocab, max_len)
    else:
        requests = make_requests(workload, args.num_requests, args.seed, vocab, max_len)
        warmup = make_requests(workload, args.warmup, args.seed + 1, vocab, max_len)
    meta = {"label": args.label, "model": model, "backend": args.backend, "address": address, "vocab_size": vocab,
            "workload": asdict(workload), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    kw = {"concurrency": args.concurrency, "backend": args.backend, "api_key": args.api_key, "seed": args.seed,
          "warmup": warmup, "ttft_slo": args.ttft_slo, "tpot_slo": args.tpot_slo, "model": model,
          "timeout": args.timeout, "progress": not args.quiet, "detailed": args.detailed, "tls": args.tls,
          "tls_ca": args.tls_ca}
    if args.sweep:
        result = run_sweep(address, requests, args.sweep, label=args.label, target=args.attainment, **kw)
        result = meta | result | {"runs": [run | meta for run in result["runs"]]}
        print(format_sweep(result))
    else:
        result = run_benchmark(address, requests, args.rate, **kw) | meta
        print(format_run(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot_sweeps([result], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
