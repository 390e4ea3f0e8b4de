"""Prefix caching across the split, measured: the multiturn and shared-doc workloads on two layouts (1 prefill +
2 decode replicas, 2 prefill + 1 decode), each with the cache off, the cache on with round-robin placement, and
the cache on with prefix-aware placement, one after the other in one run.

    python -m benchmarks.prefix_cache                        # both workloads, both layouts, the three settings
    python -m benchmarks.prefix_cache --workloads multiturn --layouts 1p2d --conversations 12 --rate 0.5

Each configuration is a `pdserve serve` process (a core's worth of torch threads per replica, the default model),
started, sent its workload through `pdserve bench`'s load generator (grpc: the multiturn turns resend the answers
as token ids), and stopped before the next. Per configuration: TTFT and TPOT p50/p99, the share of prompt tokens the
cluster took from a prefix cache (usage.cached_tokens), KV bytes written into decode pools per request (the
prefill replicas' counters, before and after), and goodput at the offered rate (requests/s that met both SLOs).
The machine's matmul peak and memory bandwidth are measured in the same run, first. Written to --out:
prefix-cache.json, prefix-cache.md and prefix-cache.png.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from benchmarks.serving_vs import ROOT, server
from pdserve.bench import run_benchmark
from pdserve.client import Client
from pdserve.workload import Workload, make_conversations, make_requests

VOCAB = 32000
LAYOUTS: dict[str, list[str]] = {
    "1p2d": ["--prefill-replicas", "1", "--decode-replicas", "2"],
    "2p1d": ["--prefill-replicas", "2", "--decode-replicas", "1"],
}
SETTINGS: dict[str, list[str]] = {
    "off": ["--no-prefill-enable-prefix-caching", "--no-decode-enable-prefix-caching",
                  "--prefill-policy", "round_robin", "--decode-policy", "round_robin"],
    "round_robin": ["--prefill-policy", "round_robin", "--decode-policy", "round_robin"],
    "prefix_aware": ["--prefill-policy", "prefix_aware", "--decode-policy", "prefix_aware"],
}
# how a setting reads in the table: the cache off, or on with a placement policy
LABELS = {"off": "cache off", "round_robin": "cache, round-robin", "prefix_aware": "cache, prefix-aware"}
COMMON = ["--prefill-num-threads", "1", "--decode-num-threads", "1", "--prefill-num-cpus", "0.5",
          "--decode-num-cpus", "0.5", "--decode-num-kv-blocks", "1024", "--prefill-num-kv-blocks", "512",
          "--decode-max-num-seqs", "64"]


def counters(address: str) -> dict[str, int]:
    """The cluster's totals so far: KV bytes the prefill replicas wrote into decode pools, and per pool the
    prompt tokens looked up in the prefix caches and found there."""
    with Client(address, timeout=30) as client:
        pools = client.status().pools
    out = {"kv_bytes_sent": sum(r.kv_bytes_sent for p in pools if p.role == "prefill" for r in p.replicas)}
    for p in pools:
        out[f"{p.role}_queries"] = sum(r.prefix_cache_queries for r in p.replicas)
        out[f"{p.role}_hits"] = sum(r.prefix_cache_hits for r in p.replicas)
    return out


def run_one(address: str, workload: str, args: argparse.Namespace) -> dict[str, Any]:
    """One workload against a running cluster; the run's stats plus KV bytes per request and goodput."""
    if workload == "multiturn":
        requests = make_conversations(Workload("multiturn"), args.conversations, args.seed, VOCAB, 8192)
        warmup = make_conversations(Workload("multiturn"), 1, args.seed + 1, VOCAB, 8192)
    else:
        requests = make_requests(Workload("shared-doc"), args.requests, args.seed, VOCAB, 8192)
        warmup = make_requests(Workload("uniform"), 2, args.seed + 1, VOCAB, 8192)  # nothing shared with the run
    warm = run_benchmark(address, warmup, None, ttft_slo=args.ttft_slo, tpot_slo=args.tpot_slo, timeout=600)
    assert warm["failed"] == 0, warm["errors"]
    before = counters(address)
    run = run_benchmark(address, requests, args.rate, ttft_slo=args.ttft_slo, tpot_slo=args.tpot_slo,
                        timeout=600, progress=True)
    after = counters(address)
    run["kv_bytes_per_request"] = (after["kv_bytes_sent"] - before["kv_bytes_sent"]) / max(1, run["num_requests"])
    for pool in ("prefill", "decode"):  # the share of the prompt tokens each pool looked up that its caches held
        queries = after.get(f"{pool}_queries", 0) - before.get(f"{pool}_queries", 0)
        hits = after.get(f"{pool}_hits", 0) - before.get(f"{pool}_hits", 0)
        run[f"{pool}_hit_ratio"] = hits / queries if queries else None
    run["goodput_rps"] = run["request_throughput"] * (run["slo"]["both"] or 0.0)
    return run


def row(workload: str, layout: str, setting: str, run: dict[str, Any]) -> list[str]:
    def ms(d: dict[str, Any], q: str) -> str:
        return f"{d[q]:.0f}" if d.get(q) is not None else "-"
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.0%}"
    return [workload, layout, LABELS[setting], f"{run['completed']}/{run['num_requests']}", ms(run["ttft_ms"], "p50"),
            ms(run["ttft_ms"], "p99"), ms(run["tpot_ms"], "p50"), ms(run["tpot_ms"], "p99"),
            pct(run["prefix_cache_hit_ratio"]), pct(run.get("decode_hit_ratio")),
            f"{run['kv_bytes_per_request'] / 2**20:.2f}", f"{run['goodput_rps']:.2f}"]


# cached: prompt tokens not computed (usage.cached_tokens); decode held: of the prompt tokens decode replicas
# looked up (a lease, or a prefill of their own), those their caches held: KV that did not move
HEAD = ["workload", "layout", "setting", "ok", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms",
        "cached", "decode held", "KV MiB/req", "goodput req/s"]


def markdown(rows: list[list[str]], machine: dict[str, Any], cpu: str, args: argparse.Namespace) -> str:
    lines = [f"Host: {cpu}; matmul peak {machine['matmul_peak_gflops']:.0f} GFLOP/s, memory read "
             f"{machine['mem_read_bw_gbs']:.1f} GB/s (measured in this run). Rate {args.rate} "
             f"(multiturn: conversations/s), SLOs TTFT {args.ttft_slo:g} s, TPOT {args.tpot_slo:g} s. cached: prompt "
             "tokens not computed (usage.cached_tokens); decode held: prompt tokens the decode replicas' caches "
             "held (KV that did not move).", "",
             "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["workload"], r["layout"]) for r in results})
    settings = list(SETTINGS)
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.5))
    panels = (("ttft_p50", "TTFT p50 (ms)", 1), ("kv", "KV MiB moved per request", 2**20),
              ("hit", "prompt tokens not computed (%)", 0.01), ("held", "held by the decode replica (%)", 0.01))
    for ax, (key, title, scale) in zip(axes, panels):
        width = 0.8 / len(settings)
        for i, setting in enumerate(settings):
            values = []
            for g in groups:
                r = next((x for x in results if (x["workload"], x["layout"]) == g and x["setting"] == setting), None)
                run = r["run"] if r else None
                v = None if run is None else {"ttft_p50": run["ttft_ms"]["p50"], "kv": run["kv_bytes_per_request"],
                                              "hit": run["prefix_cache_hit_ratio"] or 0.0,
                                              "held": run.get("decode_hit_ratio") or 0.0}[key]
                values.append(0 if v is None else v / scale)
            ax.bar([j + i * width for j in range(len(groups))], values, width, label=LABELS[setting])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{w}\n{lay}" for w, lay in groups])
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="multiturn,shared-doc")
    ap.add_argument("--layouts", default="1p2d,2p1d")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"of: {', '.join(SETTINGS)}")
    ap.add_argument("--conversations", type=int, default=12, help="multiturn: conversations (3-6 turns each)")
    ap.add_argument("--requests", type=int, default=32, help="shared-doc: requests")
    ap.add_argument("--rate", type=float, default=0.5, help="arrivals/s (multiturn: conversations/s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ttft-slo", type=float, default=2.0)
    ap.add_argument("--tpot-slo", type=float, default=0.2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/prefix-cache"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    from benchmarks.machine import cpu_name, measure_machine
    machine, cpu = measure_machine(), cpu_name()
    print(f"{cpu}: matmul peak {machine['matmul_peak_gflops']:.0f} GFLOP/s, memory read "
          f"{machine['mem_read_bw_gbs']:.1f} GB/s")
    ready = re.compile(r"ready: call it at (\S+)")
    results, rows = [], []
    for layout in args.layouts.split(","):
        for setting in args.settings.split(","):
            cmd = [str(ROOT / ".venv/bin/pdserve"), "serve", "--port", "0", "--http-port", "0", *COMMON,
                   *LAYOUTS[layout], *SETTINGS[setting]]
            label = f"{layout}-{setting}"
            with server(cmd, ready, args.out / f"{label}.log") as address:
                for workload in args.workloads.split(","):
                    print(f"== {workload}, {layout}, {LABELS[setting]}", flush=True)
                    t0 = time.monotonic()
                    run = run_one(address, workload, args)
                    print(f"   {time.monotonic() - t0:.0f} s: " + "  ".join(
                        f"{h}={v}" for h, v in zip(HEAD[3:], row(workload, layout, setting, run)[3:])), flush=True)
                    results.append(dict(workload=workload, layout=layout, setting=setting, run=run))
                    rows.append(row(workload, layout, setting, run))
    rows.sort(key=lambda r: (r[0], r[1]))
    (args.out / "prefix-cache.json").write_text(json.dumps(dict(cpu=cpu, machine=machine, args=vars(args) | {
        "out": str(args.out)}, results=results), indent=1) + "\n")
    text = markdown(rows, machine, cpu, args)
    (args.out / "prefix-cache.md").write_text(text)
    print(text)
    plot(results, args.out / "prefix-cache.png")
    print(f"wrote {args.out}/prefix-cache.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
