"""Disaggregated against colocated on this machine, the same cores and the same long-tail workload:
a rate sweep for each (latency percentiles, SLO attainment, goodput) and one chart with all; then
the cluster's end-to-end throughput against the offline engine on the same requests.

    python -m benchmarks.serving --out bench-serving [--requests 24] [--rates 0.25,0.5,1,1.5] [--only LABELS]
    python -m benchmarks.serving --burst [--only colocated]   # only the all-at-once throughput, beside offline

disaggregated: 1 prefill + 1 decode replica, one core and one torch thread each, every prompt
prefilled on the prefill replica; conditional: the same pools, but prompts under 300 tokens (the
chats) are prefilled on the decode replica and only the documents go to the prefill replica;
colocated: one replica with both cores that prefills (chunked, 512-token budget) and decodes.
The workload is the long-tail mix scaled to a 2-core CPU: 80% chats (prompt 32-256, output
32-128 tokens), 20% documents (prompt 512-1536, output 16-64)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pdserve.bench import run_benchmark, run_sweep
from pdserve.bench_report import format_sweep, plot_sweeps
from pdserve.config import ClusterConfig, PoolConfig, RouterConfig
from pdserve.launch import start_cluster
from pdserve.workload import LongtailMix, Workload, make_requests

WORKLOAD = Workload("longtail", longtail=LongtailMix(document_prompt=(512, 1536)))
TTFT_SLO, TPOT_SLO = 4.0, 0.25


def configs() -> dict[str, ClusterConfig]:
    router = RouterConfig(port=0, metrics_port=None, http_port=None, local_prefill_threshold=0,
                          max_ongoing_requests=64)
    split = dict(prefill=PoolConfig(num_cpus=1, num_threads=1, max_num_batched_tokens=512, num_kv_blocks=256),
                 decode=PoolConfig(num_cpus=1, num_threads=1, max_num_batched_tokens=512, num_kv_blocks=1024))
    return {
        "disaggregated": ClusterConfig(name="bench-disagg", router=router, **split),
        "conditional": ClusterConfig(name="bench-cond", router=RouterConfig(
            port=0, metrics_port=None, http_port=None, local_prefill_threshold=300, max_ongoing_requests=64),
            **split),
        "colocated": ClusterConfig(
            name="bench-coloc", router=router, prefill=PoolConfig(replicas=0),
            decode=PoolConfig(num_cpus=2, num_threads=2, max_num_batched_tokens=512, num_kv_blocks=1024)),
    }


def offline_throughput(requests: list[tuple[list[int], int]]) -> dict[str, float]:
    """The same requests through one offline engine with both cores, all at once."""
    from engine import LLM, SamplingParams

    llm = LLM("default", num_kv_blocks=1024, max_num_batched_tokens=512, num_threads=2)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    start = time.perf_counter()
    outs = llm.generate([p for p, _ in requests], params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return {"seconds": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
            "requests_per_s": len(requests) / elapsed}


def burst_only(args) -> int:
    """Each chosen configuration's output tok/s on the requests sent at once (after a warm-up), over
    the offline engine's on the same requests: what the service layer costs."""
    requests = make_requests(WORKLOAD, args.requests, seed=0, vocab=49152, max_len=8192)
    warmup = make_requests(WORKLOAD, 2, seed=1, vocab=49152, max_len=8192)
    chosen = args.only.split(",") if args.only else list(configs())
    offline = offline_throughput(requests)["output_tokens_per_s"]
    print(f"offline engine: {offline:.1f} output tok/s", flush=True)
    for label, config in configs().items():
        if label in chosen:
            with start_cluster(config, progress=None) as cluster:
                run_benchmark(cluster.address, warmup, None)
                got = run_benchmark(cluster.address, requests, None)["output_throughput"]
            print(f"{label}: {got:.1f} output tok/s, {got / offline:.3f} of offline", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-serving")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--rates", default="0.25,0.5,1,1.5")
    ap.add_argument("--only", help="comma-separated configurations to run (default: all); the chart and the "
                                   "summary take every <config>.json already in --out")
    ap.add_argument("--burst", action="store_true", help="only send the requests all at once to each "
                                                          "configuration and compare with the offline engine")
    args = ap.parse_args(argv)
    if args.burst:
        return burst_only(args)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    rates = [float(r) for r in args.rates.split(",")]
    requests = make_requests(WORKLOAD, args.requests, seed=0, vocab=49152, max_len=8192)
    warmup = make_requests(WORKLOAD, 2, seed=1, vocab=49152, max_len=8192)
    burst = {}
    chosen = args.only.split(",") if args.only else list(configs())
    for label, config in configs().items():
        if label not in chosen:
            continue
        with start_cluster(config) as cluster:
            sweep = run_sweep(cluster.address, requests, rates, label=label, warmup=warmup, ttft_slo=TTFT_SLO,
                              tpot_slo=TPOT_SLO, progress=True)
            burst[label] = run_benchmark(cluster.address, requests, None, ttft_slo=TTFT_SLO, tpot_slo=TPOT_SLO)
        (out / f"{label}.json").write_text(json.dumps(sweep, indent=2))
        print(format_sweep(sweep), flush=True)
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    sweeps = [json.loads((out / f"{label}.json").read_text())
              for label in configs() if (out / f"{label}.json").exists()]
    plot_sweeps(sweeps, out / "serving.png")
    offline = offline_throughput(requests) if not args.only or "offline_engine" not in previous else \
        previous["offline_engine"]
    summary = {"workload": str(WORKLOAD), "ttft_slo_s": TTFT_SLO, "tpot_slo_s": TPOT_SLO,
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
