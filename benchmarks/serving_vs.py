"""pdserve against another OpenAI-compatible server (`vllm serve`), side by side on one host: one load generator,
one workload file, the same prompts (token ids) and arrival times for every server.

    python -m benchmarks.serving_vs --vllm                       # pdserve colocated and 1P1D, and vllm serve
    python -m benchmarks.serving_vs --rates 1,1.5,2,3 --portable # also pdserve without its AMX kernels
    python -m benchmarks.serving_vs --server other=http://127.0.0.1:9000/v1 --layouts colocated

Each target is started in its own process (`pdserve serve` with the layout's flags; `bash scripts/vllm_serve.sh`),
swept over the rates one after the other (fixed prompt and output lengths, ignore_eos, greedy), and stopped before
the next starts; nothing else runs meanwhile. Before the servers, an offline engine in a child process measures what
the machine can do for this workload on both cores: matmul peak and memory bandwidth, prefill tok/s on the prompts,
decode tok/s of a batch, and from those the limit in requests/s (prompt/prefill + output/decode seconds of the
whole machine per request). Written to --out: workload.json (the prompts and each rate's arrival times), one sweep
JSON per target (as `pdserve bench --json`), summary.json, and serving-vs.png.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pdserve.bench import run_sweep
from pdserve.bench_report import format_sweep, plot_sweeps
from pdserve.workload import Workload, arrival_times, fresh_requests, make_requests

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 32000  # the prompts' ids are drawn below it: a valid prompt for nearly any model
FRESH_SEED = 100  # --fresh-prompts: the prompts of the i-th rate have seed FRESH_SEED + i
# pdserve's layouts on a 2-core host, as `pdserve serve` flags
LAYOUTS: dict[str, list[str]] = {
    # one replica with both cores: chunked prefill and decode in the same steps
    "colocated": ["--prefill-replicas", "0", "--decode-replicas", "1", "--decode-num-cpus", "2",
                  "--decode-num-threads", "2"],
    # colocated, with prefill chunks cut so a step stays near 80 ms (EngineOptions.step_time_target_s): ITL for TTFT
    "colocated-paced": ["--prefill-replicas", "0", "--decode-replicas", "1", "--decode-num-cpus", "2",
                        "--decode-num-threads", "2", "--decode-step-time-target-s", "0.08"],
    # two replicas, a core each, each prefilling and decoding its own requests
    "colocated-2x1": ["--prefill-replicas", "0", "--decode-replicas", "2", "--decode-num-cpus", "1",
                      "--decode-num-threads", "1"],
    # one prefill and one decode replica, a core each: every prompt prefills on the prefill replica
    "1p1d": ["--prefill-replicas", "1", "--decode-replicas", "1", "--prefill-num-threads", "1",
             "--decode-num-threads", "1", "--local-prefill-threshold", "0"],
    # the same, the decode engine's thread alone on core 1 and everything else (the prefill engine, the router, Ray,
    # the replicas' other threads) on core 0: no service thread stops a decode step
    "1p1d-pinned": ["--prefill-replicas", "1", "--decode-replicas", "1", "--prefill-num-threads", "1",
                    "--decode-num-threads", "1", "--local-prefill-threshold", "0", "--prefill-cpus", "0",
                    "--decode-cpus", "1", "--service-cpus", "0"],
}
# the decode pool's KV space is vllm serve's here (VLLM_CPU_KVCACHE_SPACE=4: 4 GiB; the default model's K and V take
# 46,080 bytes a token, 16 tokens a block): with 1024 blocks pdserve's prefix cache lost the prompts a rate re-sends
# (0% hits at 1 req/s) while vLLM's held them (44%)
COMMON = ["--decode-num-kv-blocks", "5825", "--prefill-num-kv-blocks", "256", "--decode-max-num-seqs", "64"]


def measure_limits(prompt_len: int, output_len: int, batch: int, env: dict[str, str], conn) -> None:
    """In a child, with env set: the machine's peaks and the offline engine's rates for this workload,
    both cores."""
    os.environ.update(env)  # before the engine is imported: PDSERVE_NO_AMX is read as its kernels load
    import torch

    from benchmarks.machine import measure_machine
    from engine import LLM, SamplingParams

    try:
        machine = measure_machine(quick=True)
        torch.set_num_threads(2)
        llm = LLM("default", num_threads=2, num_kv_blocks=1024, max_num_batched_tokens=512,
                  enable_prefix_caching=False)
        prompts = [p for p, _ in make_requests(Workload("fixed", prompt_len, output_len), batch, 7, VOCAB, 8192)]
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
        prefill_s = float("inf")
        for _ in range(3):  # the best of three: one pass is short enough for a noisy host to move it 30%
            t = time.perf_counter()
            llm.generate(prompts, one)
            prefill_s = min(prefill_s, time.perf_counter() - t)
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=output_len + 1, ignore_eos=True))
        decode_s = time.perf_counter() - t - prefill_s
        prefill_rate, decode_rate = batch * prompt_len / prefill_s, batch * output_len / decode_s
        conn.send({"matmul_peak_gflops": machine["matmul_peak_gflops"], "mem_read_bw_gbs": machine["mem_read_bw_gbs"],
                   "prefill_tok_s": prefill_rate, "decode_batch": batch, "decode_tok_s": decode_rate,
                   "limit_rps": 1 / (prompt_len / prefill_rate + output_len / decode_rate),
                   "kernels": llm.engine.runner.stack_path})
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        conn.send({"error": repr(e)})


def limits(prompt_len: int, output_len: int, batch: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=measure_limits, args=(prompt_len, output_len, batch, env or {}, child))
    proc.start()
    result = parent.recv()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"measuring the engine's rates failed: {result['error']}")
    return result


@contextmanager
def server(cmd: list[str], ready: re.Pattern, log: Path, env: dict[str, str] | None = None,
           timeout_s: float = 900) -> Iterator[str]:
    """Run cmd until the context ends; yields the first group of the first output line matching `ready`."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            found = None
            for line in proc.stdout:
                out.write(line)
                out.flush()
                if (m := ready.search(line)) is not None:
                    found = m.group(1)
                    break
                if time.monotonic() > deadline:
                    break
            if found is None:
                raise RuntimeError(f"{' '.join(cmd[:3])} did not get ready (exit {proc.poll()}); see {log}")
            # keep draining its output into the log, or a full pipe blocks the server
            threading.Thread(target=lambda: [out.write(line) for line in proc.stdout], daemon=True).start()
            yield found
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()


def wait_http(base_url: str, timeout_s: float = 900) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base_url}/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base_url} did not answer within {timeout_s:g} s")
        time.sleep(2)


def markdown(sweeps: list[dict[str, Any]], cpu: str, machine: dict[str, dict[str, Any]]) -> str:
    """The README's table: a row per rate, a column per target (TTFT, TPOT and ITL p50/p99 ms, both SLOs)."""
    def cell(run: dict[str, Any]) -> str:
        q = lambda m: "/".join("-" if run[m][p] is None else f"{run[m][p]:.0f}" for p in ("p50", "p99"))  # noqa: E731
        return f"{q('ttft_ms')}, {q('tpot_ms')}, {q('itl_ms')}, {100 * (run['slo']['both'] or 0):.1f}%"

    lines = [f"Host: {cpu}. Each cell: TTFT p50/p99 ms, TPOT p50/p99 ms, ITL p50/p99 ms, share within both SLOs.", "",
             "| rate req/s | " + " | ".join(s["label"] for s in sweeps) + " |",
             "|---" * (len(sweeps) + 1) + "|"]
    for i, run in enumerate(sweeps[0]["runs"] if sweeps else []):
        lines.append(f"| {run['rate']:g} | " + " | ".join(cell(s["runs"][i]) for s in sweeps) + " |")
    lines.append("| goodput | " + " | ".join(f"{s['goodput_rps'] or 0:g} req/s" for s in sweeps) + " |")
    for name, m in machine.items():
        lines.append(f"\nEngine{' ' + name if name else ''} ({m['kernels']}), both cores: prefill "
                     f"{m['prefill_tok_s']:.0f} tok/s, decode batch {m['decode_batch']} {m['decode_tok_s']:.0f} tok/s: "
                     f"limit {m['limit_rps']:.2f} req/s (matmul peak {m['matmul_peak_gflops']:.0f} GFLOP/s, memory "
                     f"{m['mem_read_bw_gbs']:.1f} GB/s in the same run).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.machine import cpu_name

    ap = argparse.ArgumentParser(prog="python -m benchmarks.serving_vs", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-vs")
    ap.add_argument("--rates", default="0.5,1,1.2,1.4,1.5,1.6,1.8,2")
    ap.add_argument("--requests", type=int, default=48, help="per rate (default %(default)s)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--ttft-slo", type=float, default=1.0)
    ap.add_argument("--tpot-slo", type=float, default=0.1)
    ap.add_argument("--layouts", default="colocated,1p1d", help=f"pdserve layouts: {', '.join(LAYOUTS)} ('' none)")
    ap.add_argument("--door", choices=("grpc", "openai"), default="grpc", help="pdserve's front door")
    ap.add_argument("--portable", action="store_true", help="also each layout with PDSERVE_NO_AMX=1 (the path "
                                                           "of a CPU without AMX), and its engine rates")
    ap.add_argument("--fresh-prompts", action="store_true",
                    help="new prompts at each rate (by default every rate sends the same ones, which a layout whose "
                         "prefix caches hold them all then serves from its caches)")
    ap.add_argument("--vllm", action="store_true", help="also `vllm serve` (scripts/vllm_serve.sh)")
    ap.add_argument("--server", action="append", default=[], metavar="NAME=URL",
                    help="also a running OpenAI-compatible server, by its base URL (repeatable)")
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    workload = Workload("fixed", args.prompt_len, args.output_len)
    requests = make_requests(workload, args.requests, 0, VOCAB, 8192)
    warmup = make_requests(workload, 4, 1, VOCAB, 8192)
    # --fresh-prompts: rate i sends prompts of seed FRESH_SEED + i
    fresh = fresh_requests(workload, args.requests, FRESH_SEED, len(rates), VOCAB, 8192)
    (out / "workload.json").write_text(json.dumps({
        "prompt_len": args.prompt_len, "output_len": args.output_len, "seed": 0,
        "prompts": [p for p, _ in requests], "arrivals": {str(r): arrival_times(len(requests), r, 0) for r in rates},
        "fresh_prompts": args.fresh_prompts, "fresh_seed": FRESH_SEED if args.fresh_prompts else None}))
    cpu = cpu_name()
    print(f"host: {cpu}, {os.cpu_count()} CPUs; {args.requests} requests of {args.prompt_len} prompt and "
          f"{args.output_len} output tokens per rate; SLO TTFT <= {args.ttft_slo:g} s, TPOT <= {args.tpot_slo:g} s",
          flush=True)
    batch = max(8, min(64, round(max(rates) * (args.output_len * 0.05 + 1))))  # about the batch at the top rate
    machine = {"": limits(args.prompt_len, args.output_len, batch)}
    if args.portable:
        machine["portable"] = limits(args.prompt_len, args.output_len, batch, {"PDSERVE_NO_AMX": "1"})
    for name, m in machine.items():
        print(f"engine{' ' + name if name else ''} ({m['kernels']}): matmul peak {m['matmul_peak_gflops']:.0f} "
              f"GFLOP/s, memory {m['mem_read_bw_gbs']:.1f} GB/s; prefill {m['prefill_tok_s']:.0f} tok/s, decode "
              f"batch {m['decode_batch']} {m['decode_tok_s']:.0f} tok/s -> limit {m['limit_rps']:.2f} req/s",
              flush=True)

    sweeps = []
    kw = dict(warmup=warmup, ttft_slo=args.ttft_slo, tpot_slo=args.tpot_slo, seed=0, timeout=600)

    def sweep(label: str, target: str, backend: str) -> None:
        print(f"--- {label}", flush=True)
        s = run_sweep(target, fresh if args.fresh_prompts else requests, rates, label=label, backend=backend, **kw)
        s |= {"host": cpu}
        (out / f"{label}.json").write_text(json.dumps(s, indent=1))
        print(format_sweep(s), flush=True)
        sweeps.append(s)

    ready = re.compile(r"ready: call it at (\S+)" if args.door == "grpc" else r"OpenAI-compatible API on (\S+)")
    variants = [("", {})] + ([("-portable", {"PDSERVE_NO_AMX": "1"})] if args.portable else [])
    for layout in [x for x in args.layouts.split(",") if x]:
        for suffix, env in variants:
            label = f"pdserve-{layout}{suffix}"
            cmd = [str(ROOT / ".venv/bin/pdserve"), "serve", "--port", "0", "--http-port", "0", *COMMON,
                   *LAYOUTS[layout]]
            env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
            with server(cmd, ready, out / f"{label}.log", env) as address:
                sweep(label, address, args.door)
    if args.vllm:
        with server(["bash", "scripts/vllm_serve.sh", "8100"], re.compile(r"(Application startup complete)"),
                    out / "vllm.log"):
            wait_http("http://127.0.0.1:8100/v1")
            sweep("vllm-serve", "http://127.0.0.1:8100/v1", "openai")
    for spec in args.server:
        name, _, url = spec.partition("=")
        sweep(name, url, "openai")

    print(f"\nhost: {cpu}")
    print(f"{'target':<28}{'goodput req/s':>14}" + "".join(f"{r:>8g}" for r in rates) + "   (both SLOs, % per rate)")
    for s in sweeps:
        print(f"{s['label']:<28}{s['goodput_rps'] or 0:>14g}" + "".join(
            f"{100 * run['slo']['both']:>8.0f}" for run in s["runs"]))
    (out / "summary.md").write_text(markdown(sweeps, cpu, machine))
    print(f"wrote {out / 'summary.md'}")
    (out / "summary.json").write_text(json.dumps({"host": cpu, "rates": rates, "machine": machine,
                                                  "slo": {"ttft_s": args.ttft_slo, "tpot_s": args.tpot_slo},
                                                  "goodput_rps": {s["label"]: s["goodput_rps"] for s in sweeps}},
                                                 indent=1))
    try:
        plot_sweeps(sweeps, out / "serving-vs.png")
        print(f"wrote {out / 'serving-vs.png'}")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
