"""Planning past this machine, on paper: Llama-3.1-8B and 70B on H100 and H200 (planner/roofline.py's step
models, their efficiencies fitted to TensorRT-LLM's published figures), chat and long-document work, 8 and 64
GPUs; where disaggregation starts to win goodput per GPU as the TPOT target tightens.

    python -m benchmarks.paper_plan [--json docs/paper-plan.json] [--quick]

1. The calibration: every published row beside the fitted roofline's prediction, and each row predicted by a
   fit to all the others (leave one out).
2. Per (model, GPU, workload): the simulator (planner/simulate.py: the real scheduler, block manager and
   placement over those step models) finds the goodput of one instance of each kind and TP degree, as DistServe
   sizes its instances: a prefill replica against the TTFT target alone (its decode pool ample), a decode
   replica against the TPOT target alone (its prefill pool ample), a colocated replica against both.
3. N GPUs: colocated, N / TP replicas of the best TP; disaggregated, the counts and TP degrees of both pools
   within N that maximize min(prefill pool's goodput, decode pool's) (each pool scales by replicas).
4. Checked: the best 8-GPU layouts of each kind simulated whole, against their composed goodput."""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict

from pdserve.config import ClusterConfig
from pdserve.workload import Workload, make_requests
from planner.plan import kv_sized, search
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

WORKLOADS = {  # lengths in tokens; SLOs: TTFT seconds, then the TPOT targets swept (seconds)
    "chat": (Workload("uniform", prompt_range=(128, 1024), output_range=(64, 512)), 0.5),
    "long-document": (Workload("uniform", prompt_range=(4096, 7680), output_range=(128, 512)), 2.0),
}
TPOT_SLOS = (0.025, 0.05, 0.1)
TPS = {LLAMA31_8B.name: (1, 2, 4), LLAMA31_70B.name: (2, 4, 8)}
LOOSE = 1e9  # an SLO that never binds
REQUESTS = 300
GPU_COUNTS = (8, 64)


def instance_goodputs(model, gpu, eff, workload: Workload, ttft: float, tpot_slos, requests: int) -> dict:
    """{kind: {tp: goodput or {tpot: goodput}}} of one replica of each kind and TP degree."""
    profile = paper_profile(model, GPUS[gpu], TPS[model.name], eff=eff)
    tps = [tp for tp in TPS[model.name] if f"tp{tp}-threads1-bfloat16-cuda" in profile.pools]
    base = gpu_config(ClusterConfig(), profile)
    reqs = make_requests(workload, requests, 0, model.vocab, 8192)
    big = max(tps)

    def goodput(prefill: tuple[int, int], decode: tuple[int, int], ttft_slo: float, tpot_slo: float,
                reqs=reqs) -> float:
        config = base.replace(**{"prefill.replicas": prefill[0], "prefill.tensor_parallel_size": prefill[1],
                                 "decode.replicas": decode[0], "decode.tensor_parallel_size": decode[1]})
        return search(kv_sized(config, profile), profile, reqs, ttft_slo, tpot_slo, steps=5)[0]

    short = [(ids, 2) for ids, _ in reqs]  # a prefill replica's work: the prompt and its first token
    out = {"prefill": {tp: goodput((1, tp), (1, big), ttft, LOOSE, short) for tp in tps},
           "decode": {tp: {s: goodput((2, big), (1, tp), LOOSE, s) for s in tpot_slos} for tp in tps},
           "colocated": {tp: {s: goodput((0, tp), (1, tp), ttft, s) for s in tpot_slos} for tp in tps}}
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
    """The loosest TPOT target at which disaggregation wins goodput per GPU (it wins at every tighter one)."""
    wins = [r["tpot_slo_s"] for r in rows if r["disaggregated"]["goodput"] > r["colocated"]["goodput"]]
    if not wins:
        return "colocated at every TPOT target tried"
    loosest = max(wins)
    if all(r["disaggregated"]["goodput"] > r["colocated"]["goodput"] for r in rows if r["tpot_slo_s"] <= loosest):
        return f"disaggregation wins at TPOT <= {loosest * 1e3:g} ms"
    return "mixed: " + ", ".join(f"{r['tpot_slo_s'] * 1e3:g} ms {'D' if r['tpot_slo_s'] in wins else 'C'}"
                                 for r in rows)


def whole(model, gpu, eff, workload: Workload, ttft: float, tpot: float, layout: str, requests: int) -> float:
    """Goodput of an 8-GPU layout ('4 x TP2' or '3P x TP1 + 5D x TP1') simulated as one cluster."""
    profile = paper_profile(model, GPUS[gpu], TPS[model.name], eff=eff)
    base = gpu_config(ClusterConfig(), profile)
    parts = [p.strip() for p in layout.split("+")]

    def shape(part: str) -> tuple[int, int]:
        n, tp = part.replace("P", "").replace("D", "").split(" x TP")
        return int(n), int(tp)
    if len(parts) == 1:
        (n, tp), (pn, ptp) = shape(parts[0]), (0, 1)
    else:
        (pn, ptp), (n, tp) = shape(parts[0]), shape(parts[1])
    config = base.replace(**{"prefill.replicas": pn, "prefill.tensor_parallel_size": ptp, "decode.replicas": n,
                             "decode.tensor_parallel_size": tp})
    reqs = make_requests(workload, requests, 0, model.vocab, 8192)
    return search(kv_sized(config, profile), profile, reqs, ttft, tpot, steps=5)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--quick", action="store_true", help="Llama-3.1-8B on H100, chat, one TPOT target")
    p.add_argument("--requests", type=int, default=REQUESTS, help="simulated requests per rate tried")
    args = p.parse_args(argv)
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
        [(m, g, w) for m in (LLAMA31_8B, LLAMA31_70B) for g in ("h100", "h200") for w in WORKLOADS]
    slos = TPOT_SLOS[1:2] if args.quick else TPOT_SLOS
    out = {"efficiency": asdict(eff), "calibration": [r | {"left_out_error": e} for r, e in zip(rows, loo)],
           "cases": []}
    for model, gpu, name in cases:
        workload, ttft = WORKLOADS[name]
        g = instance_goodputs(model, gpu, eff, workload, ttft, slos, args.requests)
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
            for kind in ("colocated", "disaggregated"):
                if r[kind]["goodput"] > 0:
                    sim = whole(model, gpu, eff, workload, ttft, r["tpot_slo_s"], r[kind]["layout"],
                                args.requests * 4)
                    checks.append({"tpot_slo_s": r["tpot_slo_s"], "layout": r[kind]["layout"],
                                   "composed": r[kind]["goodput"], "whole": sim})
                    print(f"  check, 8 GPUs at TPOT {r['tpot_slo_s'] * 1e3:g} ms: {r[kind]['layout']} simulated whole "
                          f"{sim:.1f} req/s against {r[kind]['goodput']:.1f} composed")
        case["checks"] = checks
        out["cases"].append(case)
        print(f"  ({time.monotonic() - t0:.0f} s so far)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(out, indent=1, default=lambda x: x if not isinstance(x, float) or math.isfinite(x)
                               else None) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
