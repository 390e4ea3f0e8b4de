"""The simulator against measurement: calibrate its service costs on one workload's measured runs, then
predict another workload's runs it never saw, and print predicted beside measured.

    python -m benchmarks.planner --profile profile.json --calibrate-on bench-vs --validate-on bench-serving

--calibrate-on and --validate-on: each the output folder of `python -m benchmarks.serving_vs` (its
pdserve-<layout>.json sweeps of the fixed 256/128 workload and workload.json) or of
`python -m benchmarks.serving` (the long-tail sweeps of its disaggregated, conditional and colocated
configurations); swap them to validate the other way. The profile must hold every pool
configuration those layouts use (`pdserve profile`, once per layout with --merge). The fitted service costs
are written into the profile. Per run: TTFT and TPOT p50 and p90, measured / simulated, and the share of
requests within both SLOs; then the goodput each way.

    python -m benchmarks.planner --profile profile.json --dispatch-table

prints the simulated goodput of the 1P1D dispatches (disaggregated, conditional, slo_aware) and colocated on
long-tail, chat-only and document-heavy work."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from benchmarks import serving, serving_vs
from pdserve.bench_stats import goodput
from pdserve.cli import _cluster_config, build_parser
from pdserve.workload import Workload, fresh_requests, make_requests, steady_count
from planner.calibrate import METRICS, Case, calibrate, compared, format_errors
from planner.cost import Profile
from planner.plan import search
from planner.simulate import Service, simulate_sweep


def layout_config(layout: str):
    """The ClusterConfig `pdserve serve` builds from serving_vs's flags for `layout`."""
    args = build_parser().parse_args(["serve", *serving_vs.LAYOUTS[layout], *serving_vs.COMMON])
    return _cluster_config(args)


def cases_in(folder: Path, profile: str | None = None) -> tuple[list[Case], tuple[float, float]]:
    """The measured sweeps of a benchmarks.serving_vs folder (it has workload.json) or of a benchmarks.serving one,
    each with the configuration, requests and warm-up it ran with; and that benchmark's SLOs."""
    if (folder / "workload.json").exists():
        spec = json.loads((folder / "workload.json").read_text())
        workload = Workload("fixed", spec["prompt_len"], spec["output_len"])
        requests = make_requests(workload, len(spec["prompts"]), spec["seed"], serving_vs.VOCAB, 8192)
        assert [p for p, _ in requests] == spec["prompts"], "the workload differs from the one measured"
        if spec.get("fresh_prompts"):  # each rate sent its own
            requests = fresh_requests(workload, len(requests), spec["fresh_seed"], len(spec["arrivals"]),
                                      serving_vs.VOCAB, 8192)
        warmup = make_requests(workload, 4, 1, serving_vs.VOCAB, 8192)  # as serving_vs sends before the first rate
        return [Case(layout_config(layout), requests, json.loads((folder / f"pdserve-{layout}.json").read_text()),
                     warmup=warmup)
                for layout in serving_vs.LAYOUTS if (folder / f"pdserve-{layout}.json").exists()], (1.0, 0.1)
    cases = []
    for label, config in serving.configs(profile).items():
        if (path := folder / f"{label}.json").exists():
            sweep = json.loads(path.read_text())
            n, workload = sweep["runs"][0]["num_requests"], serving.WORKLOADS[sweep.get("workload_name", "long-tail")]
            requests = make_requests(workload, n, 0, 49152, 8192)
            if (fresh := sweep.get("fresh_seed")) is not None:  # each rate sent its own
                requests = fresh_requests(workload, n, fresh, len(sweep["runs"]), 49152, 8192)
            warmup = make_requests(workload, 2, 1, 49152, 8192)  # as benchmarks.serving sends first
            cases.append(Case(config, requests, sweep, warmup=warmup))
    return cases, (serving.TTFT_SLO, serving.TPOT_SLO)


def report(profile: Profile, service: Service, case: Case, slos: tuple[float, float]
           ) -> tuple[str, list[dict], float, float]:
    """A table of measured against simulated runs, its rows, and both goodputs (at the SLOs the runs were
    measured at). One simulation of the case serves the table, the rows and the goodput."""
    slo = case.runs[0].get("slo", {})
    slos = (slo.get("ttft_s", slos[0]), slo.get("tpot_s", slos[1]))
    sims = simulate_sweep(case.config, profile, case.requests, [run["rate"] for run in case.runs], 0, *slos,
                          service, case.warmup)
    rows = compared(case, sims)
    lines = format_errors(rows).splitlines()
    lines[0] += "   both SLOs meas/sim"
    for i, (run, sim) in enumerate(zip(case.runs, sims)):
        lines[i + 1] += f"   {100 * run['slo']['both']:5.1f}%/{100 * sim['slo']['both']:5.1f}%"
    return "\n".join(lines), rows, goodput(case.runs), goodput(sims)


def summary_errors(rows: list[dict]) -> dict[str, float]:
    out = {}
    for m, q in METRICS:
        errs = sorted(abs(r[f"{m}.{q}"][1] / r[f"{m}.{q}"][0] - 1) for r in rows if r[f"{m}.{q}"][0])
        out[f"{m}.{q}"] = errs[len(errs) // 2] if errs else float("nan")
    return out


def dispatch_table(profile_path: str, requests_per_rate: int = 100, seconds: float = 0.0) -> str:
    """Simulated goodput of the 1P1D dispatches (disaggregated, conditional, slo_aware) and colocated, on
    benchmarks.serving's pools, for long-tail, chat-only and document-heavy work at two pairs of SLOs. Each rate
    sends requests_per_rate requests, or `seconds` of arrivals where that is more (a steady state)."""
    profile = Profile.load(profile_path)
    c = serving.configs()
    lines = ["| SLOs TTFT / TPOT | workload | 1P1D disaggregated | 1P1D conditional < 300 | 1P1D slo_aware | "
             "colocated |", "|---|---|---|---|---|---|"]
    for ttft, tpot in ((4.0, 0.25), (2.0, 0.1)):
        slo_aware = c["disaggregated"].replace(**{"router.dispatch": "slo_aware", "router.profile": profile_path,
                                                  "router.ttft_slo_s": ttft, "router.tpot_slo_s": tpot})
        layouts = [c["disaggregated"], c["conditional"], slo_aware, c["colocated"]]
        for name, workload in serving.WORKLOADS.items():
            def requests(rate: float, workload=workload) -> list:
                return make_requests(workload, steady_count(rate, seconds, requests_per_rate, 10_000), 0, 49152, 8192)

            cells = " | ".join(f"{search(cfg, profile, requests, ttft, tpot)[0]:.2f}" for cfg in layouts)
            lines.append(f"| {ttft:g} s / {1e3 * tpot:g} ms | {name} | {cells} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.planner", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--calibrate-on", help="a benchmarks.serving_vs or benchmarks.serving output folder (none: the "
                                           "profile's own service costs)")
    ap.add_argument("--validate-on", help="another")
    ap.add_argument("--json", help="write every run's measured and simulated figures here")
    ap.add_argument("--dispatch-table", action="store_true",
                    help="instead: the simulated goodput of each 1P1D dispatch and colocated, on the profile")
    ap.add_argument("--seconds", type=float, default=0.0,
                    help="--dispatch-table: at least this many seconds of arrivals a rate (default: 100 requests)")
    args = ap.parse_args(argv)
    if args.dispatch_table:
        dispatch_table(args.profile, seconds=args.seconds)
        return 0
    if not args.validate_on:
        ap.error("give --validate-on (and --calibrate-on, or the profile's own service costs are used), or "
                 "--dispatch-table")
    profile = Profile.load(args.profile)
    held_cases, held_slos = cases_in(Path(args.validate_on), args.profile)
    parts = [("held_out", held_cases, held_slos)]
    if args.calibrate_on:
        fit_cases, fit_slos = cases_in(Path(args.calibrate_on), args.profile)
        service, _ = calibrate(profile, fit_cases)
        print(f"calibrated on {args.calibrate_on}: {dataclasses.asdict(service)}")
        parts.insert(0, ("calibration", fit_cases, fit_slos))
    else:
        service = Service.of(profile)
        print(f"the profile's service costs: {dataclasses.asdict(service)}")
    out: dict[str, Any] = {"service": dataclasses.asdict(service), "calibration": {}, "held_out": {}}
    for part, cases, slos in parts:
        rows = []
        for case in cases:
            table, case_rows, measured, simulated = report(profile, service, case, slos)
            rows += case_rows
            out[part][case.measured["label"]] = {"rows": case_rows, "goodput": [measured, simulated]}
            print(f"--- {case.measured['label']} ({part.replace('_', ' ')})\n{table}\n"
                  f"goodput measured {measured} req/s, simulated {simulated} req/s")
        medians = summary_errors(rows)
        out[part]["median_abs_error"] = medians
        print(f"median |simulated / measured - 1|, {part.replace('_', ' ')}: "
              + ", ".join(f"{k} {100 * v:.0f}%" for k, v in medians.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.calibrate_on:
        fitted = {**profile.service, **dataclasses.asdict(service)}  # what it was measured from stays beside it
        Path(args.profile).write_text(dataclasses.replace(profile, service=fitted).to_json())
        print(f"wrote the service costs into {args.profile}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
