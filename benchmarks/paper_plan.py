"""Planning past this machine, on paper: Llama-3.1-8B and 70B on H100 and H200 (planner/roofline.py's step
models, their efficiencies fitted to TensorRT-LLM's published figures), chat and long-document work, 8 and 64
GPUs; where disaggregation starts to win goodput per GPU as the TPOT target tightens.

    python -m benchmarks.paper_plan [--json docs/paper-plan.json] [--quick]

1. The calibration: every published row beside the fitted roofline's prediction, and each row predicted by a
   fit to all the others (leave one out).
2. Per (model, GPU, workload): the simulator (planner/simulate.py: the real scheduler, block manager and
   placement over those step models) finds the goodput of one instance of each kind and TP degree, as DistServe
   sizes its instances: a prefill replica against the TTFT target alone (its decode pool ample), a decode
   replica against both (its prefill pool ample: the TTFT it adds is the wait for a decode slot and KV room, a
   queue that would otherwise hide any overload), a colocated replica against both.
3. N GPUs: colocated, N / TP replicas of the best TP; disaggregated, the counts and TP degrees of both pools
   within N that maximize min(prefill pool's goodput, decode pool's) (each pool scales by replicas).
4. Checked: the best 8-GPU layouts of each kind simulated whole, against their composed goodput."""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from dataclasses import asdict

from pdserve.config import ClusterConfig
from pdserve.workload import Workload, arrival_times, make_requests, steady_count
from planner.plan import kv_sized
from planner.roofline import (
    GPUS,
    LLAMA31_8B,
    LLAMA31_70B,
    ROWS,
    calibrate,
    gpu_config,
    held_out_errors,
    paper_profile,
    predictions,
)
from planner.simulate import Simulator, results

WORKLOADS = {  # lengths in tokens; SLOs: TTFT seconds, then the TPOT targets swept (seconds)
    "chat": (Workload("uniform", prompt_range=(128, 1024), output_range=(64, 512)), 0.5),
    "long-document": (Workload("uniform", prompt_range=(4096, 7680), output_range=(128, 512)), 2.0),
}
TPOT_SLOS = (0.025, 0.05, 0.1)
ATTAINMENT = 0.9
CHECK_TPOT = 0.05  # the TPOT target whose 8-GPU layouts are simulated whole
TPS = {LLAMA31_8B.name: (1, 2, 4), LLAMA31_70B.name: (2, 4, 8)}
LOOSE = 1e9  # an SLO that never binds
SECONDS = 20.0  # of arrivals at each rate tried (a decode lives several seconds: shorter runs read high)
MIN_REQUESTS, MAX_REQUESTS = 100, 20000
GPU_COUNTS = (8, 64)


def arrivals(rate: float, seconds: float) -> int:
    """Requests a run at `rate` sends: `seconds` of arrivals (a steady state, not one burst), within bounds."""
    return steady_count(rate, seconds, MIN_REQUESTS, MAX_REQUESTS)


class Goodputs:
    """One cluster configuration's goodput at several TPOT targets (one TTFT target), its simulated runs shared
    between them: the SLOs decide nothing in the simulation, only what counts as met. Per target: the rate
    doubled from 1 req/s until fewer than ATTAINMENT of the requests meet both, then `steps` bisections."""

    def __init__(self, config, profile, workload: Workload, vocab: int, seconds: float, short: bool = False):
        self.config, self.profile, self.workload, self.vocab = config, profile, workload, vocab
        self.seconds, self.short = seconds, short
        self._runs: dict[float, list] = {}

    def results(self, rate: float) -> list:
        if rate not in self._runs:
            reqs = make_requests(self.workload, arrivals(rate, self.seconds), 0, self.vocab, 8192)
            if self.short:  # a prefill replica's work: the prompt and its first token
                reqs = [(ids, 2) for ids, _ in reqs]
            sim = Simulator(self.config, self.profile)
            self._runs[rate] = results(sim.run(reqs, arrival_times(len(reqs), rate, 0)))
        return self._runs[rate]

    def meets(self, rate: float, ttft: float, tpot: float) -> bool:
        res = self.results(rate)
        return sum(all(r.meets(ttft, tpot)) for r in res) >= ATTAINMENT * len(res)

    def goodput(self, ttft: float, tpot: float, steps: int = 4) -> float:
        lo, hi = 0.0, 1.0
        while self.meets(hi, ttft, tpot) and hi < 1e5:
            lo, hi = hi, 2 * hi
        for _ in range(steps):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.meets(mid, ttft, tpot) else (lo, mid)
        return lo


def shaped(base, profile, prefill: tuple[int, int], decode: tuple[int, int]):
    config = base.replace(**{"prefill.replicas": prefill[0], "prefill.tensor_parallel_size": prefill[1],
                             "decode.replicas": decode[0], "decode.tensor_parallel_size": decode[1]})
    return kv_sized(config, profile)


def instance_goodputs(model, gpu, eff, workload: Workload, ttft: float, tpot_slos, seconds: float) -> dict:
    """{kind: {tp: goodput or {tpot: goodput}}} of one replica of each kind and TP degree."""
    profile = paper_profile(model, GPUS[gpu], TPS[model.name], eff=eff)
    tps = [tp for tp in TPS[model.name] if f"tp{tp}-threads1-bfloat16-cuda" in profile.pools]
    base = gpu_config(ClusterConfig(), profile)
    big = max(tps)

    def of(prefill, decode, short=False) -> Goodputs:
        return Goodputs(shaped(base, profile, prefill, decode), profile, workload, model.vocab, seconds, short)
    out = {"prefill": {tp: of((1, tp), (1, big), short=True).goodput(ttft, LOOSE) for tp in tps},
           "decode": {}, "colocated": {}}
    for tp in tps:
        decode, colocated = of((2, big), (1, tp)), of((0, tp), (1, tp))
        out["decode"][tp] = {s: decode.goodput(ttft, s) for s in tpot_slos}
        out["colocated"][tp] = {s: colocated.goodput(ttft, s) for s in tpot_slos}
    return out


def compose(g: dict, tpot: float, gpus: int) -> dict:
    """The best colocated and disaggregated layouts of `gpus` GPUs from the instances' goodputs."""
    colocated = max(((gpus // tp) * by[tpot], f"{gpus // tp} x TP{tp}", gpus // tp * tp)
                    for tp, by in g["colocated"].items())
    best = (0.0, "-", 0)
    for tp_p, gp in g["prefill"].items():
        for tp_d, by in g["decode"].items():
            gd = by[tpot]
            for n_p in range(1, gpus // tp_p + 1):
                n_d = (gpus - n_p * tp_p) // tp_d
                if n_d >= 1:
                    best = max(best, (min(n_p * gp, n_d * gd), f"{n_p}P x TP{tp_p} + {n_d}D x TP{tp_d}",
                                      n_p * tp_p + n_d * tp_d))
    return {"colocated": {"goodput": colocated[0], "layout": colocated[1], "gpus": colocated[2]},
            "disaggregated": {"goodput": best[0], "layout": best[1], "gpus": best[2]}}


def crossover(rows: list[dict]) -> str:
    """Which layout wins goodput per GPU at each TPOT target (within 3%: a tie)."""
    def winner(r: dict) -> str:
        ratio = r["disaggregated"]["goodput"] / max(r["colocated"]["goodput"], 1e-9)
        return "disaggregated" if ratio > 1.03 else "colocated" if ratio < 1 / 1.03 else "tie"
    return ", ".join(f"TPOT {r['tpot_slo_s'] * 1e3:g} ms: {winner(r)}" for r in rows)


def whole(model, gpu, eff, workload: Workload, ttft: float, tpot: float, layout: str, rate: float,
          seconds: float) -> list[float]:
    """The share of requests within both SLOs at `rate` and 15% past it, of an 8-GPU layout ('4 x TP2' or
    '3P x TP1 + 5D x TP1') simulated as one cluster."""
    profile = paper_profile(model, GPUS[gpu], TPS[model.name], eff=eff)
    shapes = [tuple(int(x) for x in m) for m in re.findall(r"(\d+)[PD]? x TP(\d+)", layout)]
    prefill, decode = shapes if len(shapes) == 2 else ((0, 1), shapes[0])
    g = Goodputs(shaped(gpu_config(ClusterConfig(), profile), profile, prefill, decode), profile, workload,
                 model.vocab, seconds)
    return [sum(all(r.meets(ttft, tpot)) for r in g.results(x)) / len(g.results(x)) for x in (rate, rate * 1.15)]


def table(paths: list[str]) -> str:
    """The README's table from written JSONs: per case and TPOT target, the best of each kind at 8 and 64 GPUs."""
    lines = ["| model, GPU, workload (TTFT) | TPOT | 8 GPUs: colocated | disaggregated | D/C | 64 GPUs: colocated | "
             "disaggregated | D/C |", "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        with open(path) as f:
            for case in json.load(f)["cases"]:
                for i, tpot in enumerate(r["tpot_slo_s"] for r in case["plans"]["8"]["rows"]):
                    cells = []
                    for n in ("8", "64"):
                        r = case["plans"][n]["rows"][i]
                        c, d = r["colocated"], r["disaggregated"]
                        ratio = f"{d['goodput'] / c['goodput']:.2f}" if c["goodput"] else "-"
                        cells += [f"{c['layout']}: {c['goodput']:g}", f"{d['layout']}: {d['goodput']:g}", ratio]
                    name = (f"{case['model']}, {case['gpu'].upper()}, {case['workload']} ({case['ttft_slo_s']:g} s)"
                            if i == 0 else "")
                    lines.append(f"| {name} | {tpot * 1e3:g} ms | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", nargs="+", metavar="JSON", help="print the README's table from written JSONs, and stop")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--quick", action="store_true", help="Llama-3.1-8B on H100, chat, one TPOT target")
    p.add_argument("--gpus", default="h100,h200", help="comma-separated: h100, h200 (default both)")
    p.add_argument("--seconds", type=float, default=SECONDS, help="simulated seconds of arrivals per rate tried")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    t0 = time.monotonic()
    eff = calibrate()
    rows = predictions(eff)
    loo = held_out_errors()
    print(f"calibration ({ROWS} published rows, TensorRT-LLM docs/source/performance.md): {asdict(eff)}")
    for r, held in zip(rows, loo):
        print(f"  {r['what']:64s} published {r['published']:8.1f} predicted {r['predicted']:8.1f} "
              f"({r['predicted'] / r['published'] - 1:+.0%}; left out {held:.0%})")
    fit = [abs(r["predicted"] / r["published"] - 1) for r in rows]
    print(f"  |error| median {statistics.median(fit):.0%} max {max(fit):.0%}; each row left out of the fit: "
          f"median {statistics.median(loo):.0%} max {max(loo):.0%}")
    cases = [(LLAMA31_8B, "h100", "chat")] if args.quick else \
        [(m, g, w) for g in args.gpus.split(",") for m in (LLAMA31_8B, LLAMA31_70B) for w in WORKLOADS]
    slos = TPOT_SLOS[1:2] if args.quick else TPOT_SLOS
    out = {"efficiency": asdict(eff), "calibration": [r | {"left_out_error": e} for r, e in zip(rows, loo)],
           "cases": []}
    for model, gpu, name in cases:
        workload, ttft = WORKLOADS[name]
        g = instance_goodputs(model, gpu, eff, workload, ttft, slos, args.seconds)
        print(f"\n{model.name} on {gpu.upper()}, {name} (TTFT <= {ttft:g} s): one replica's goodput, req/s")
        print("  prefill (TTFT only): " + ", ".join(f"TP{tp} {v:.2f}" for tp, v in g["prefill"].items()))
        for kind in ("decode", "colocated"):
            for tp, by in g[kind].items():
                print(f"  {kind} TP{tp}: " + ", ".join(f"TPOT {s * 1e3:g} ms {v:.2f}" for s, v in by.items()))
        case = {"model": model.name, "gpu": gpu, "workload": name, "workload_spec": asdict(workload),
                "ttft_slo_s": ttft, "instances": g, "plans": {}}
        for n in GPU_COUNTS:
            rows_n = [{"tpot_slo_s": s, **compose(g, s, n)} for s in slos]
            case["plans"][n] = {"rows": rows_n, "crossover": crossover(rows_n)}
            print(f"  {n} GPUs:")
            for r in rows_n:
                c, d = r["colocated"], r["disaggregated"]
                print(f"    TPOT {r['tpot_slo_s'] * 1e3:4g} ms: colocated {c['layout']:10s} {c['goodput']:8.1f} req/s "
                      f"({c['goodput'] / n:6.2f}/GPU); disaggregated {d['layout']:22s} {d['goodput']:8.1f} req/s "
                      f"({d['goodput'] / n:6.2f}/GPU)  {d['goodput'] / max(c['goodput'], 1e-9):5.2f}x")
            print(f"    -> {case['plans'][n]['crossover']}")
        checks = []
        for r in case["plans"][8]["rows"]:
            if r["tpot_slo_s"] != CHECK_TPOT:
                continue
            for kind in ("colocated", "disaggregated"):
                if r[kind]["goodput"] > 0:
                    met = whole(model, gpu, eff, workload, ttft, r["tpot_slo_s"], r[kind]["layout"], r[kind]["goodput"],
                                args.seconds)
                    checks.append({"tpot_slo_s": r["tpot_slo_s"], "layout": r[kind]["layout"],
                                   "composed_goodput": r[kind]["goodput"], "met_at_goodput": met[0],
                                   "met_15pct_past": met[1]})
                    print(f"  check, 8 GPUs, TPOT {r['tpot_slo_s'] * 1e3:g} ms, {r[kind]['layout']} simulated whole: "
                          f"{met[0]:.0%} within both SLOs at its composed goodput {r[kind]['goodput']:.1f} req/s, "
                          f"{met[1]:.0%} 15% past it")
        case["checks"] = checks
        out["cases"].append(case)
        print(f"  ({time.monotonic() - t0:.0f} s so far)", flush=True)
        if args.json:  # after each case: a long run keeps what it has
            with open(args.json, "w") as f:
                f.write(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
