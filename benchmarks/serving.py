"""Disaggregated against colocated on this machine, the same cores and the same long-tail workload:
a rate sweep for each (latency percentiles, SLO attainment, goodput) and one chart with all; then
the cluster's end-to-end throughput against the offline engine on the same requests.

    python -m benchmarks.serving --out bench-serving [--requests 24] [--rates 0.25,0.5,1,1.5] [--only LABELS]
        [--profile profile.json]   # also the slo_aware layout (1P1D, router.dispatch slo_aware)
        [--fresh-prompts]          # new prompts at each rate (else each rate re-sends the same ones)
    python -m benchmarks.serving --burst [--only colocated] [--pairs 5]   # only the all-at-once throughput, beside
        # offline (--pairs: rounds of both in turn on new requests, the median ratio)
        [--policies fcfs,lof,spf]  # the pool that prefills under each scheduling policy in turn
    python -m benchmarks.serving --front-doors [--only colocated] [--requests 24] [--rate 1] [--repeats 2]

disaggregated: 1 prefill + 1 decode replica, one core and one torch thread each, every prompt
prefilled on the prefill replica; disaggregated-pinned: the same with the prefill engine's thread alone on
core 0 and everything else (the decode engine, the router, Ray, the replicas' other threads) on core 1;
conditional: the same pools, but prompts under 300 tokens (the chats) are prefilled on the decode
replica and only the documents go to the prefill replica;
colocated: one replica with both cores that prefills (chunked, 512-token budget) and decodes.
The workload is the long-tail mix scaled to a 2-core CPU: 80% chats (prompt 32-256, output
32-128 tokens), 20% documents (prompt 512-1536, output 16-64).

--front-doors starts one cluster (disaggregated unless --only names another) and sends the same
Poisson workload (same prompts, same arrival seed) through its gRPC front door and through its
OpenAI-compatible HTTP front door (`pdserve bench --backend openai`), alternating grpc, http,
http, grpc, ... so that the host's drift falls on both alike, from a client process of its own;
per front door it prints TTFT and TPOT p50/p99 and output tok/s over all its runs, and HTTP's
output tok/s over gRPC's."""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from pdserve.bench import run_benchmark, run_sweep
from pdserve.bench_report import format_sweep, plot_sweeps
from pdserve.bench_stats import summarize
from pdserve.config import ClusterConfig, PoolConfig, RouterConfig
from pdserve.launch import start_cluster
from pdserve.request_result import RequestResult
from pdserve.workload import LongtailMix, Workload, fresh_requests, make_requests

WORKLOADS = {  # --workload: the long-tail mix (the default), and its two ends
    "long-tail": Workload("longtail", longtail=LongtailMix(document_prompt=(512, 1536))),
    "chat-only": Workload("longtail", longtail=LongtailMix(document_fraction=0.0)),
    "document-heavy": Workload("longtail", longtail=LongtailMix(document_fraction=0.8, document_prompt=(512, 1536))),
}
WORKLOAD = WORKLOADS["long-tail"]
TTFT_SLO, TPOT_SLO = 4.0, 0.25
FRESH_SEED = 100  # --fresh-prompts: the prompts of the i-th rate have seed FRESH_SEED + i


def configs(profile: str | None = None) -> dict[str, ClusterConfig]:
    """The layouts compared; with a `pdserve profile` JSON, also "slo_aware": the 1P1D pools with
    router.dispatch slo_aware at this benchmark's SLOs (local_prefill_threshold 0: every prompt as it decides)."""
    router = RouterConfig(port=0, metrics_port=None, http_port=None, local_prefill_threshold=0,
                          max_ongoing_requests=64)
    split = dict(prefill=PoolConfig(num_cpus=1, num_threads=1, max_num_batched_tokens=512, num_kv_blocks=256),
                 decode=PoolConfig(num_cpus=1, num_threads=1, max_num_batched_tokens=512, num_kv_blocks=1024))
    return {
        "disaggregated": ClusterConfig(name="bench-disagg", router=router, **split),
        # the same, the prefill engine alone on core 0; the decode engine, the router, Ray and the replicas' other
        # threads on core 1 (the decode replica has time to spare in a prefill-bound burst)
        "disaggregated-pinned": ClusterConfig(
            name="bench-disagg-pin", router=router, service_cpus="1",
            prefill=dataclasses.replace(split["prefill"], cpus="0"),
            decode=dataclasses.replace(split["decode"], cpus="1")),
        "conditional": ClusterConfig(name="bench-cond", router=RouterConfig(
            port=0, metrics_port=None, http_port=None, local_prefill_threshold=300, max_ongoing_requests=64),
            **split),
        "colocated": ClusterConfig(
            name="bench-coloc", router=router, prefill=PoolConfig(replicas=0),
            decode=PoolConfig(num_cpus=2, num_threads=2, max_num_batched_tokens=512, num_kv_blocks=1024)),
    } | ({"slo_aware": ClusterConfig(name="bench-slo", router=dataclasses.replace(
        router, dispatch="slo_aware", profile=profile, ttft_slo_s=TTFT_SLO, tpot_slo_s=TPOT_SLO), **split)}
        if profile else {})


def offline_engine(num_threads: int = 2, **kw: Any):
    """The offline engine the cluster is held against: one LLM on `num_threads` cores, the pools' options."""
    from engine import LLM

    return LLM("default", num_kv_blocks=1024, max_num_batched_tokens=512, num_threads=num_threads, **kw)


def offline_throughput(requests: list[tuple[list[int], int]], llm: Any = None) -> dict[str, float]:
    """The same requests through one offline engine with both cores (`llm`, else a new one), all at once."""
    from engine import SamplingParams

    llm = llm or offline_engine()
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    start = time.perf_counter()
    outs = llm.generate([p for p, _ in requests], params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return {"seconds": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
            "requests_per_s": len(requests) / elapsed}


def offline_pipeline(requests: list[tuple[list[int], int]], llm: Any = None) -> dict[str, float]:
    """What two one-thread offline engines deliver on the requests as a perfect pipeline (one only
    prefills, the other only decodes, each on its core): output tokens / max(prefill, decode), where
    prefill is one one-thread engine's wall time on every prompt with one new token, and decode that
    engine's wall time on the whole requests less prefill. An upper bound for the disaggregated
    layout: no pipeline fill or drain, and each part measured with the other core idle."""
    from engine import SamplingParams

    # without a prefix cache, else the second pass finds the prompts cached
    llm = llm or offline_engine(num_threads=1, enable_prefix_caching=False)
    prompts = [p for p, _ in requests]
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests])
    decode = time.perf_counter() - start - prefill
    tokens = sum(len(o.token_ids) for o in outs)
    return {"prefill_s": prefill, "decode_s": decode, "output_tokens": tokens,
            "output_tokens_per_s": tokens / max(prefill, decode)}


def with_policy(config: ClusterConfig, policy: str) -> ClusterConfig:
    """config with scheduling_policy on the pool that prefills: the prefill pool, or a colocated one's only pool."""
    pool = "prefill" if config.prefill.replicas else "decode"
    return dataclasses.replace(config, **{pool: dataclasses.replace(getattr(config, pool), scheduling_policy=policy)})


_offline: Any = None  # in an OfflineEngine's process: its LLM


def _offline_start(num_threads: int, kw: dict[str, Any], warmup: list[tuple[list[int], int]]) -> None:
    global _offline
    # every core, whatever the process that started it had then (a cluster's service_cpus pin the driver)
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    _offline = offline_engine(num_threads, **kw)
    offline_throughput(warmup, _offline)  # a process's first pass runs slower


def _offline_run(requests: list[tuple[list[int], int]], pipeline: bool) -> dict[str, float]:
    return (offline_pipeline if pipeline else offline_throughput)(requests, _offline)


class OfflineEngine:
    """An offline engine (offline_engine's) in a process of its own, kept between runs: not in the
    process that hosts the router, whose threads would share its interpreter."""

    def __init__(self, warmup: list[tuple[list[int], int]], num_threads: int = 2, **kw: Any) -> None:
        self.pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_offline_start,
                                        initargs=(num_threads, kw, warmup))

    def run(self, requests: list[tuple[list[int], int]], pipeline: bool = False) -> dict[str, float]:
        """offline_throughput (or offline_pipeline) of the requests."""
        return self.pool.submit(_offline_run, requests, pipeline).result()

    def close(self) -> None:
        self.pool.shutdown()


def _stepping(cluster) -> dict[str, tuple[float, float]]:
    """Each pool's first replica: (seconds stepping, of them off the engine thread's core) so far."""
    import ray

    actors = {pool: getattr(cluster, pool)[0] for pool in ("prefill", "decode") if getattr(cluster, pool)}
    stats = dict(zip(actors, ray.get([a.stats.remote() for a in actors.values()])))
    return {pool: (s["busy_seconds"], s["step_off_cpu_seconds"]) for pool, s in stats.items()}


def where_it_went(run: dict[str, Any], before: dict, after: dict, pipe: dict[str, float] | None) -> str:
    """One line: each replica's stepping time in the run (and its time off its core), the offline prefill's
    beside the prefill replica's, and the tail: how long the run went on after the last first token."""
    parts = []
    for pool, (busy, off) in after.items():
        b, o = busy - before[pool][0], off - before[pool][1]
        parts.append(f"{pool} replica stepping {b:.2f} s ({o:.2f} s of it off its core)"
                     + (f" against {pipe['prefill_s']:.2f} s offline" if pool == "prefill" and pipe else ""))
    last_first = max(r["send_time"] + r["ttft"] for r in run["requests"] if r["ttft"] is not None)
    return "; ".join(parts) + f"; {run['duration_s'] - last_first:.2f} s after the last first token"


def burst_only(args) -> int:
    """Each chosen configuration's output tok/s on the requests sent at once (after a warm-up), over
    the offline engine's on the same requests (both cores, one engine): what the service layer costs;
    the disaggregated and conditional layouts also over offline_pipeline's bound, their two one-core
    engines offline. With --policies, each configuration once per scheduling policy of the pool that
    prefills, in turn. With --pairs N, N rounds on one cluster and one offline engine (a process of its
    own, idle while the cluster runs and the other way round), each round new requests (seed = round)
    through the offline engine and then the cluster, so that the host's drift over minutes falls on
    both alike; the median of the rounds' ratios closes."""
    warmup = make_requests(WORKLOAD, 2, seed=1000, vocab=49152, max_len=8192)
    chosen = args.only.split(",") if args.only else list(configs())
    policies = args.policies.split(",") if args.policies else [None]
    rounds = [make_requests(WORKLOAD, args.requests, seed=i, vocab=49152, max_len=8192) for i in range(args.pairs)]
    offline = OfflineEngine(warmup)
    pipeline = OfflineEngine(warmup, num_threads=1, enable_prefix_caching=False) \
        if set(chosen) - {"colocated"} else None  # without a prefix cache, else its second pass finds the prompts
    try:
        for label, config in configs().items():
            for policy in policies if label in chosen else ():
                name = f"{label}{f' ({policy})' if policy else ''}"
                ratios, split = [], []
                with start_cluster(with_policy(config, policy) if policy else config, progress=None) as cluster:
                    run_benchmark(cluster.address, warmup, None)
                    for i, requests in enumerate(rounds):
                        alone = offline.run(requests)["output_tokens_per_s"]
                        pipe = pipeline.run(requests, pipeline=True) if pipeline and label != "colocated" else None
                        before = _stepping(cluster)
                        run = run_benchmark(cluster.address, requests, None, detailed=True)
                        went = where_it_went(run, before, _stepping(cluster), pipe)
                        got = run["output_throughput"]
                        ratios.append(got / alone)
                        line = f"{name}, round {i}: offline engine {alone:.1f} output tok/s, cluster {got:.1f}: " \
                               f"{got / alone:.3f} of offline"
                        if pipe:
                            split.append(got / pipe["output_tokens_per_s"])
                            line += f", {split[-1]:.3f} of two one-thread engines offline as a perfect pipeline " \
                                    f"({pipe['output_tokens_per_s']:.1f} tok/s: prefill {pipe['prefill_s']:.2f} s, " \
                                    f"decode {pipe['decode_s']:.2f} s)"
                        print(f"{line}; TTFT mean {run['ttft_ms']['mean'] / 1000:.2f} s, last request done at "
                              f"{run['duration_s']:.2f} s\n  {went}", flush=True)
                print(f"{name}: median {statistics.median(ratios):.3f} of offline over {len(ratios)} rounds"
                      + (f", {statistics.median(split):.3f} of the pipeline" if split else ""), flush=True)
    finally:
        for engine in filter(None, (offline, pipeline)):
            engine.close()
    return 0


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One front door's runs (detailed) as one: the statistics over all their requests and durations."""
    names = [f.name for f in dataclasses.fields(RequestResult)]
    results = [RequestResult(**{k: r[k] for k in names}) for run in runs for r in run["requests"]]
    return summarize(results, sum(run["duration_s"] for run in runs), TTFT_SLO, TPOT_SLO)


def client_run(*args: Any, **kw: Any) -> dict[str, Any]:
    """run_benchmark in the client's process, with the CPU seconds that process spent on it."""
    cpu = time.process_time()
    run = run_benchmark(*args, **kw)
    return run | {"client_cpu_s": time.process_time() - cpu}


def front_doors(args) -> int:
    """The same Poisson workload through one cluster's gRPC and HTTP front doors (see the module's docstring)."""
    from benchmarks.machine import cpu_name

    label = args.only or "disaggregated"
    if label not in configs() or args.repeats < 1:
        raise SystemExit(f"--front-doors runs one configuration ({', '.join(configs())}; --only {label!r}) at least "
                         f"once (--repeats {args.repeats})")
    base = configs()[label]
    config = dataclasses.replace(base, router=dataclasses.replace(base.router, http_port=0))
    requests = make_requests(WORKLOAD, args.requests, seed=0, vocab=49152, max_len=8192)
    warmup = make_requests(WORKLOAD, 2, seed=1, vocab=49152, max_len=8192)
    order = [door for i in range(args.repeats) for door in (("grpc", "openai") if i % 2 == 0 else ("openai", "grpc"))]
    runs: dict[str, list[dict[str, Any]]] = {"grpc": [], "openai": []}
    # The load generator in a process of its own, as `pdserve bench` beside `pdserve serve`: the router is a thread
    # of this process, and a client here would take its GIL (the HTTP client more than the gRPC one).
    with start_cluster(config) as cluster, ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as client:
        targets = {"grpc": cluster.address, "openai": f"http://{cluster.http_address}/v1"}
        for door in order:
            cpu = time.process_time()  # this process's: the router's (its thread), the Ray driver's
            run = client.submit(client_run, targets[door], requests, args.rate, backend=door, seed=0,
                                warmup=warmup if not runs[door] else (), ttft_slo=TTFT_SLO, tpot_slo=TPOT_SLO,
                                progress=True, detailed=True).result()
            runs[door].append(run | {"router_cpu_s": time.process_time() - cpu})
    doors = {door: pooled(door_runs) for door, door_runs in runs.items()}
    ratio = doors["openai"]["output_throughput"] / doors["grpc"]["output_throughput"]
    print(f"front doors on {cpu_name()}, {label} cluster, {args.requests} long-tail requests at {args.rate:g} req/s, "
          f"order {', '.join('http' if d == 'openai' else d for d in order)}")
    metrics = [("ttft_ms", "p50"), ("ttft_ms", "p99"), ("tpot_ms", "p50"), ("tpot_ms", "p99")]
    print(f"{'':<6}{'runs':>5}{'failed':>7}{'out tok/s':>11}" + "".join(
        f"{m[:4].upper() + ' ' + q + ' ms':>14}" for m, q in metrics) + f"{'router CPU':>12}{'client CPU':>12}")
    for door, run in doors.items():
        latencies = "".join("-".rjust(14) if run[m][q] is None else f"{run[m][q]:>14.0f}" for m, q in metrics)
        cpu = {k: sum(r[k] for r in runs[door]) for k in ("router_cpu_s", "client_cpu_s")}
        print(f"{'http' if door == 'openai' else door:<6}{len(runs[door]):>5}{run['failed']:>7}"
              f"{run['output_throughput']:>11.1f}{latencies}{cpu['router_cpu_s']:>11.2f}s{cpu['client_cpu_s']:>11.2f}s")
    per_run = [h["output_throughput"] / g["output_throughput"] for g, h in zip(runs["grpc"], runs["openai"])]
    print(f"HTTP/gRPC output tok/s: {ratio:.3f} (pairs: {', '.join(f'{r:.3f}' for r in per_run)}); within 5%: "
          f"{'yes' if ratio >= 0.95 else 'no'}")
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    summary = {"cpu": cpu_name(), "configuration": label, "workload": str(WORKLOAD), "requests": args.requests,
               "rate": args.rate, "order": order, "http_over_grpc_output_throughput": ratio, "pooled": doors,
               "runs": {door: [{k: v for k, v in run.items() if k != "requests"} for run in door_runs]
                        for door, door_runs in runs.items()}}
    (out / "front-doors.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'front-doors.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-serving")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--rates", default="0.25,0.5,1,1.5")
    ap.add_argument("--fresh-prompts", action="store_true", help="new prompts at each rate (by default every rate "
                    "sends the same ones, which a layout whose prefix caches hold them then serves from cache)")
    ap.add_argument("--profile", help="a `pdserve profile` JSON of these pools: adds the slo_aware configuration")
    ap.add_argument("--workload", choices=tuple(WORKLOADS), default="long-tail",
                    help="the sweep's mix (default %(default)s; chat-only: no documents; document-heavy: 80%% of them)")
    ap.add_argument("--only", help="comma-separated configurations to run (default: all); the chart and the "
                                   "summary take every <config>.json already in --out")
    ap.add_argument("--burst", action="store_true", help="only send the requests all at once to each "
                                                          "configuration and compare with the offline engine")
    ap.add_argument("--policies", help="--burst: comma-separated scheduling policies (fcfs, lof, spf) of "
                                       "the pool that prefills, each configuration run once per policy in turn")
    ap.add_argument("--pairs", type=int, default=1, help="--burst: rounds of offline engine then cluster, each on "
                                                         "new requests; the median ratio (default %(default)s)")
    ap.add_argument("--front-doors", action="store_true", help="one cluster: the same Poisson workload through "
                                                                "its gRPC and its HTTP front door, HTTP over gRPC")
    ap.add_argument("--rate", type=float, default=1.0, help="--front-doors: requests/s (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="--front-doors: runs per front door, alternating "
                                                           "which goes first (default %(default)s)")
    args = ap.parse_args(argv)
    if args.burst:
        return burst_only(args)
    if args.front_doors:
        return front_doors(args)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    rates = [float(r) for r in args.rates.split(",")]
    workload = WORKLOADS[args.workload]
    requests = make_requests(workload, args.requests, seed=0, vocab=49152, max_len=8192)
    warmup = make_requests(workload, 2, seed=1, vocab=49152, max_len=8192)
    burst = {}
    chosen = args.only.split(",") if args.only else list(configs(args.profile))
    for label, config in configs(args.profile).items():
        if label not in chosen:
            continue
        with start_cluster(config) as cluster:
            sent = fresh_requests(workload, args.requests, FRESH_SEED, len(rates), 49152, 8192) \
                if args.fresh_prompts else requests
            sweep = run_sweep(cluster.address, sent, rates, label=label, warmup=warmup, ttft_slo=TTFT_SLO,
                              tpot_slo=TPOT_SLO, progress=True)
            sweep["workload_name"] = args.workload
            if args.fresh_prompts:
                sweep["fresh_seed"] = FRESH_SEED
            burst[label] = run_benchmark(cluster.address, requests, None, ttft_slo=TTFT_SLO, tpot_slo=TPOT_SLO)
        (out / f"{label}.json").write_text(json.dumps(sweep, indent=2))
        print(format_sweep(sweep), flush=True)
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    sweeps = [json.loads((out / f"{label}.json").read_text())
              for label in configs(args.profile) if (out / f"{label}.json").exists()]
    plot_sweeps(sweeps, out / "serving.png")
    offline = offline_throughput(requests) if not args.only or "offline_engine" not in previous else \
        previous["offline_engine"]
    summary = {"workload": str(workload), "ttft_slo_s": TTFT_SLO, "tpot_slo_s": TPOT_SLO,
               "goodput_rps": {s["label"]: s["goodput_rps"] for s in sweeps},
               "tpot_p99_ms": {s["label"]: [r["tpot_ms"]["p99"] for r in s["runs"]] for s in sweeps},
               "ttft_p99_ms": {s["label"]: [r["ttft_ms"]["p99"] for r in s["runs"]] for s in sweeps},
               "all_at_once_output_tokens_per_s": {
                   **previous.get("all_at_once_output_tokens_per_s", {}),
                   **{k: v["output_throughput"] for k, v in burst.items()}},
               "offline_engine": offline}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
