"""A benchmark run or sweep shown to a person: as text (vLLM-style) and as charts. Reads the plain dicts that
run_benchmark and run_sweep return and --json writes, so a sweep can be drawn again from its file (load_sweep)."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pdserve.bench_stats import PERCENTILES


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
    if run.get("prefix_cache_hit_ratio") is not None:
        lines.append(f"prefix cache    {_pct(run['prefix_cache_hit_ratio'])} of the prompt tokens were cached")
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
