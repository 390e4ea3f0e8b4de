"""Benchmark the engine against transformers and against this machine's own limits, in one run.

    python -m benchmarks.engine --json bench.json [--quick] [--skip-hf] [--profile]
                           [--wait-quiet S --retries N]   (on a machine shared with other jobs)
                           [--vllm .vllm-venv/bin/python [--vllm-model .vllm-model]]

--vllm adds vLLM's offline engine (its CPU build, in the venv `bash scripts/vllm_serve.sh` makes, on the
default model written as a Hugging Face folder by `python -m benchmarks.export_hf`: float32, the weights
ours reads) as a third engine on every workload but prefix, in a child process of its own, both cores
bound (VLLM_CPU_OMP_THREADS_BIND), driven a step at a time as ours is; its greedy tokens are compared
with ours.

Default model (SmolLM2-135M-Instruct, GGUF dequantized to fp32), 2 torch threads for every part.
Three workloads, each warmed up once (short) before it is timed, each run on both engines:

  single   one chat prompt ("What is the capital of France?", chat template), 128 new tokens
  batch32  32 prompts of 128 seeded random token ids, 128 new tokens each
  prefill  8 prompts of 512 seeded random token ids, 1 new token each
  prefix   32 prompts of one 1,024-token random prefix and 16 distinct tokens each, 1 new token each,
           prefix cache on and off (ours only); prompt tok/s counts the cached tokens as processed

Our engine runs with its prefix cache on (the default), emptied before each timed call, so each rep
of a workload computes what the first did (the prefix workload's first request computes the prefix).
Always greedy with ignore_eos. Decode rates exclude the prefill, the same way for both engines,
inside one generate call: T is its wall time, T_first the moment every prompt has its first new
token (ours: after the engine step that gives the last one; transformers: its streamer's first
put of new tokens), K the new tokens that exist at T_first (the first token of each prompt, plus
any that chunked prefill let earlier prompts decode meanwhile), N all new tokens:

    decode tok/s = (N - K) / (T - T_first)

The end-to-end rate N / T is reported beside it. Each workload takes the best of its reps.

Machine limits, by the engine's own peak probe (engine.peaks, the one behind the replicas' MFU and
MBU): fp32 matmul peak = best GFLOP/s of torch.mm on 2048^2 and 3072^2 matrices; memory read
bandwidth = the best of three ways of streaming 1 GiB (sum, matrix-vector product, copy; each best
of several), since a GEMV is what a batch-1 decode step does with its weights.
They are measured in a child process (so their 1 GB buffers do not count in
peak RSS), before and after the workloads; the better of the two is used. A short probe before
each workload records how far the host drifts during the run (machine.spread). transformers runs in
another child process, so each engine's peak RSS is its own and the two never run at once;
within each workload the engines take turns run by run (ours, transformers, ours, ...), so that a
noisy neighbour or a drifting host hurts both alike.
`cpu_util` is process CPU time / (wall time * threads) over the timed calls: well under 1.0
means another process took the cores and the figures are pessimistic.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks.engine_runners import OurEngine, RemoteHF, RemoteVLLM, maxrss_mb
from benchmarks.engine_table import print_table
from benchmarks.engine_workloads import DECODE_METHOD, decode_workload, prefill_workload, random_prompts, wait_quiet
from benchmarks.machine import THREADS, MachineProbe, cpu_name
from benchmarks.roofline import FLOPS_FORMULA, ROOFLINE_FORMULA, decode_roofline, model_counts, prefill_flops
from benchmarks.step_profiler import run_profile
from engine.layers import gemm

SEED = 0


def _strip_tokens(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "tokens"}


def _match_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _agreement(res: dict[str, dict[str, Any]], other: str) -> dict[str, Any]:
    """How many leading greedy tokens `other` shares with ours: the single prompt's, and the batch's least and mean."""
    batch = [_match_prefix(a, b) for a, b in zip(res["batch32"]["pdserve"]["tokens"], res["batch32"][other]["tokens"])]
    return {"single": _match_prefix(res["single"]["pdserve"]["tokens"][0], res["single"][other]["tokens"][0]),
            "batch32_min": min(batch), "batch32_mean": round(sum(batch) / len(batch), 1)}


def _ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return round(a / b, digits) if a is not None and b else None


class ColdCacheEngine(OurEngine):
    """Our engine, its prefix cache emptied before each call: a rep does not reuse the previous one's KV."""

    def generate(self, prompts: list[list[int]], n: int) -> dict[str, Any]:
        self.llm.engine.block_manager.reset_prefix_cache()
        return super().generate(prompts, n)


def prefix_workload(ours: ColdCacheEngine, prompts: list[list[int]], reps: int,
                    quiet_wait: float = 0.0) -> dict[str, dict[str, Any]]:
    """Prompt tokens per second (cached ones counted) of the fastest run, with the prefix cache on
    (cold at the start of each run) and off; the two take turns."""
    engine = ours.llm.engine
    best: dict[str, dict[str, Any]] = {}
    try:
        for _ in range(reps):
            for mode in ("off", "on"):
                wait_quiet(quiet_wait)
                engine.block_manager.enable_caching = mode == "on"
                hits = engine.scheduler.prefix_cache_hits
                r = ours.generate(prompts, 1)
                r["cached_tokens"] = engine.scheduler.prefix_cache_hits - hits
                if mode not in best or r["wall"] < best[mode]["wall"]:
                    best[mode] = r
    finally:
        engine.block_manager.enable_caching = engine.config.options.enable_prefix_caching
    total = sum(map(len, prompts))
    return {mode: {"t_s": round(r["wall"], 3), "tok_s": round(total / r["wall"], 1),
                   "cached_tokens": r["cached_tokens"], "cpu_util": round(r["cpu"] / (r["wall"] * THREADS), 3),
                   "tokens": r["tokens"]} for mode, r in best.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    quick = args.quick
    cfg = {
        "single_new_tokens": 64 if quick else 128, "single_reps": 1 if quick else 3,
        "batch": 32, "batch_prompt_len": 128, "batch_new_tokens": 32 if quick else 128, "batch_reps": 1 if quick else 2,
        "prefill_prompts": 8, "prefill_len": 512, "prefill_reps": 1 if quick else 3,
        "prefix_len": 1024, "prefix_requests": 32, "prefix_suffix_len": 16, "prefix_reps": 1 if quick else 2,
    }
    opts = {"quiet_wait": args.wait_quiet, "retries": args.retries}
    load_before = os.getloadavg()
    if load_before[0] > 0.5 * THREADS:
        print(f"warning: load average {load_before[0]:.2f} on {os.cpu_count()} cpus: other processes are "
              f"running and will slow every figure here", flush=True)
    print(f"measuring the machine ({THREADS} threads) ...", flush=True)
    wait_quiet(args.wait_quiet)
    machine = MachineProbe(quick)
    machine_before = machine.full()

    from engine.loader.gguf import default_model_path

    path = default_model_path()
    hf = None if args.skip_hf else RemoteHF(path)  # loads in its own process while ours loads here
    vllm = RemoteVLLM(args.vllm, args.vllm_model) if args.vllm else None  # and so does vLLM
    print("loading the engines ...", flush=True)
    ours = ColdCacheEngine()
    hf_info = hf.wait_loaded() if hf else None
    vllm_info = vllm.wait_loaded() if vllm else None
    counts = model_counts(ours.llm)
    vocab = counts["vocab"]
    engines = [ours] + ([hf] if hf else []) + ([vllm] if vllm else [])

    chat = ours.chat_ids()
    batch_prompts = random_prompts(cfg["batch"], cfg["batch_prompt_len"], vocab, SEED)
    prefill_prompts = random_prompts(cfg["prefill_prompts"], cfg["prefill_len"], vocab, SEED + 1)
    res: dict[str, dict[str, Any]] = {}
    wait_quiet(args.wait_quiet)
    machine.probe("before single")
    names = " and ".join(e.name for e in engines)
    print(f"single decode: {names} ...", flush=True)
    res["single"] = decode_workload(engines, [chat], cfg["single_new_tokens"], [chat], cfg["single_reps"], **opts)
    warm = random_prompts(cfg["batch"], 16, vocab, SEED + 2)
    wait_quiet(args.wait_quiet)
    machine.probe("before batch32")
    print(f"batch32 decode: {names} ...", flush=True)
    res["batch32"] = decode_workload(engines, batch_prompts, cfg["batch_new_tokens"], warm, cfg["batch_reps"],
                                     **opts)
    warm = random_prompts(1, cfg["prefill_len"], vocab, SEED + 3)
    wait_quiet(args.wait_quiet)
    machine.probe("before prefill")
    print(f"prefill: {names} ...", flush=True)
    res["prefill"] = prefill_workload(engines, prefill_prompts, warm, cfg["prefill_reps"], **opts)
    shared = random_prompts(1, cfg["prefix_len"], vocab, SEED + 4)[0]
    prefix_prompts = [shared + p for p in random_prompts(cfg["prefix_requests"], cfg["prefix_suffix_len"], vocab,
                                                         SEED + 5)]
    wait_quiet(args.wait_quiet)
    machine.probe("before prefix")
    print("prefix: pdserve, prefix cache off and on ...", flush=True)
    res["prefix"] = prefix_workload(ours, prefix_prompts, cfg["prefix_reps"], args.wait_quiet)
    peak_rss = maxrss_mb()

    profile = None
    if args.profile:
        print("profiling our engine ...", flush=True)
        profile = run_profile(ours, {
            "single": ([chat], 64),
            "batch32": (batch_prompts, 32),
            "prefill": (prefill_prompts, 1),
        }, args.wait_quiet)
    hf_rss = hf.close() if hf else None
    vllm_rss = vllm.close() if vllm else None
    print("measuring the machine again ...", flush=True)
    wait_quiet(args.wait_quiet)
    machine_after = machine.full()
    machine.close()
    load_after = os.getloadavg()

    mm = [machine_before["matmul_2048_gflops"], machine_after["matmul_2048_gflops"]]
    mm += [p["matmul_gflops"] for p in machine.probes]
    mv = [machine_before["mem_read_matvec_gbs"], machine_after["mem_read_matvec_gbs"]]
    mv += [p["matvec_gbs"] for p in machine.probes]
    # the limits: the best seen in the run, full measurements and probes alike
    peak = max(machine_before["matmul_peak_gflops"], machine_after["matmul_peak_gflops"], *mm)
    bw = max(machine_before["mem_read_bw_gbs"], machine_after["mem_read_bw_gbs"], *mv)
    fma = max((m["fma_peak_gflops"] for m in (machine_before, machine_after) if m.get("fma_peak_gflops")),
              default=None)

    def get(w, e, k):
        return res[w].get(e, {}).get(k)

    s_ours, s_hf = get("single", "pdserve", "decode_tok_s"), get("single", "transformers", "decode_tok_s")
    b_ours, b_hf = get("batch32", "pdserve", "decode_tok_s"), get("batch32", "transformers", "decode_tok_s")
    p_ours, p_hf = get("prefill", "pdserve", "tok_s"), get("prefill", "transformers", "tok_s")
    ctx = cfg["batch_prompt_len"] + cfg["batch_new_tokens"] / 2
    roof32 = decode_roofline(counts, cfg["batch"], ctx, bw, peak)
    # the same roofline from the two short probes that bracket the batch32 workload: the host's
    # speed around it, where the headline above takes the best moment of the whole run
    around = [p for p in machine.probes if p["when"] in ("before batch32", "before prefill")]
    roof32_around = (decode_roofline(counts, cfg["batch"], ctx, max(p["matvec_gbs"] for p in around),
                                     max(p["matmul_gflops"] for p in around)) if len(around) == 2 else None)
    roof1 = decode_roofline(counts, 1, len(chat) + cfg["single_new_tokens"] / 2, bw, peak)
    # the same against the bytes a single decode step reads as the engine stores its weights (int8 blocks
    # 1.125 bytes a weight, AMX tiles ~2.25; fp32 panels 4): the limit of the layout that ran
    stored = {**counts, "weight_bytes": ours.llm.engine.runner.cost.weight_bytes_for(1)}
    roof1_stored = decode_roofline(stored, 1, len(chat) + cfg["single_new_tokens"] / 2, bw, peak)
    # a single decode's compute bound: its FLOPs a token at the CPU's FMA peak (what no layout can beat)
    compute1 = fma * 1e9 / roof1["step_flops"] if fma else None
    pf = prefill_flops(counts, cfg["prefill_prompts"], cfg["prefill_len"])
    p_tokens = cfg["prefill_prompts"] * cfg["prefill_len"]
    prefill_gflops = pf / (p_tokens / p_ours) / 1e9
    prefill_hf_gflops = pf / (p_tokens / p_hf) / 1e9 if p_hf else None

    s_vl, b_vl, p_vl = (get("single", "vllm", "decode_tok_s"), get("batch32", "vllm", "decode_tok_s"),
                        get("prefill", "vllm", "tok_s"))
    vllm_match = _agreement(res, "vllm") if vllm else None
    hf_match = _agreement(res, "transformers") if hf else {}

    out = {
        "model": os.path.basename(path), "dtype": "float32", "quick": quick, "config": cfg,
        "wait_quiet_s": args.wait_quiet, "retries": args.retries,
        "machine": {
            "torch": torch.__version__, "threads": THREADS, "python": platform.python_version(),
            "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
            "before": machine_before, "after": machine_after, "probes": machine.probes,
            "spread": {"matmul_2048_gflops": [min(mm), max(mm)], "matvec_gbs": [min(mv), max(mv)]},
        },
        "matmul_peak_gflops": peak, "mem_read_bw_gbs": bw, "fma_peak_gflops": fma,
        "model_counts": counts,
        "engine_commit": _git_commit(),
        "attention_backend": type(ours.llm.engine.runner.model.model.layers[0].self_attn.backend).__name__,
        "matmul": gemm.matmul_path(ours.llm.engine.runner.model),
        "decoder_stack": ours.llm.engine.runner.stack_path,
        "load_s": {"pdserve": round(ours.load_s, 1), "transformers": round(hf_info["load_s"], 1) if hf_info else None},
        "hf_attn_implementation": hf_info["attn_impl"] if hf_info else None,
        "decode_method": DECODE_METHOD,
        "single_decode_tok_s": s_ours,
        "single_decode_hf_tok_s": s_hf,
        "single_decode_vs_hf": _ratio(s_ours, s_hf),
        "single_decode_roofline_tok_s": round(roof1["tok_s"], 1),
        "single_decode_frac_of_roofline": _ratio(s_ours, roof1["tok_s"]),
        "weight_bytes_stored": int(stored["weight_bytes"]),
        "single_decode_roofline_stored_tok_s": round(roof1_stored["tok_s"], 1),
        "single_decode_frac_of_roofline_stored": _ratio(s_ours, roof1_stored["tok_s"]),
        "single_decode_compute_bound_tok_s": round(compute1, 1) if compute1 else None,
        "single_decode_frac_of_compute_bound": _ratio(s_ours, compute1),
        "single_ttft_s": get("single", "pdserve", "t_first_s"),
        "single_ttft_hf_s": get("single", "transformers", "t_first_s"),
        "single_greedy_match_prefix": hf_match.get("single"),
        "batch32_decode_tok_s": b_ours,
        "batch32_hf_tok_s": b_hf,
        "batch32_e2e_tok_s": get("batch32", "pdserve", "e2e_tok_s"),
        "batch32_hf_e2e_tok_s": get("batch32", "transformers", "e2e_tok_s"),
        "batch32_roofline_tok_s": round(roof32["tok_s"], 1),
        "batch32_roofline_with_kv_tok_s": round(roof32["tok_s_with_kv"], 1),
        "batch32_roofline_detail": {k: round(v, 3) for k, v in roof32.items()},
        "batch32_frac_of_roofline": _ratio(b_ours, roof32["tok_s"]),
        "batch32_hf_frac_of_roofline": _ratio(b_hf, roof32["tok_s"]),
        "batch32_roofline_around_tok_s": round(roof32_around["tok_s"], 1) if roof32_around else None,
        "batch32_frac_of_roofline_around": _ratio(b_ours, roof32_around["tok_s"]) if roof32_around else None,
        "batch32_hf_frac_of_roofline_around": _ratio(b_hf, roof32_around["tok_s"]) if roof32_around else None,
        "batch32_vs_hf": _ratio(b_ours, b_hf),
        "batch32_greedy_match_prefix_min": hf_match.get("batch32_min"),
        "batch32_greedy_match_prefix_mean": hf_match.get("batch32_mean"),
        "prefill_tok_s": p_ours,
        "prefill_hf_tok_s": p_hf,
        "prefill_vs_hf": _ratio(p_ours, p_hf),
        "prefill_gflops": round(prefill_gflops, 1),
        "prefill_hf_gflops": round(prefill_hf_gflops, 1) if prefill_hf_gflops else None,
        "prefill_flops_frac": _ratio(prefill_gflops, peak),
        "prefill_hf_flops_frac": _ratio(prefill_hf_gflops, peak),
        "prefill_frac_of_fma_peak": _ratio(prefill_gflops, fma),
        "prefill_hf_frac_of_fma_peak": _ratio(prefill_hf_gflops, fma),
        "prefill_flops_per_run": pf,
        "vllm": vllm_info and {
            "version": vllm_info["version"], "load_s": round(vllm_info["load_s"], 1), "peak_rss_mb": round(vllm_rss, 1),
            "single_decode_tok_s": s_vl, "batch32_decode_tok_s": b_vl, "prefill_tok_s": p_vl,
            "single_decode_ours_vs_vllm": _ratio(s_ours, s_vl), "batch32_ours_vs_vllm": _ratio(b_ours, b_vl),
            "prefill_ours_vs_vllm": _ratio(p_ours, p_vl), "batch32_frac_of_roofline": _ratio(b_vl, roof32["tok_s"]),
            "single_decode_frac_of_roofline": _ratio(s_vl, roof1["tok_s"]),
            "prefill_flops_frac": _ratio(pf / (p_tokens / p_vl) / 1e9, peak) if p_vl else None,
            "prefill_frac_of_fma_peak": _ratio(pf / (p_tokens / p_vl) / 1e9, fma) if p_vl else None,
            "greedy_match_with_ours": vllm_match},
        "prefix_cached_tok_s": get("prefix", "on", "tok_s"),
        "prefix_uncached_tok_s": get("prefix", "off", "tok_s"),
        "prefix_cache_speedup": _ratio(get("prefix", "on", "tok_s"), get("prefix", "off", "tok_s")),
        "prefix_cached_tokens": get("prefix", "on", "cached_tokens"),
        "prefix_same_tokens": res["prefix"]["on"]["tokens"] == res["prefix"]["off"]["tokens"],
        "flops_formula": FLOPS_FORMULA,
        "roofline_formula": ROOFLINE_FORMULA,
        "peak_rss_mb": round(peak_rss, 1),
        "peak_rss_hf_mb": round(hf_rss, 1) if hf_rss else None,
        "kv_cache_mb": round(ours.llm.engine.runner.kv_cache.numel() * 4 / 2 ** 20, 1),
        "workloads": {w: {e: _strip_tokens(r) for e, r in d.items()} for w, d in res.items()},
        "targets": {
            "single_decode_vs_hf >= 1.3": _ge(_ratio(s_ours, s_hf), 1.3),
            "batch32_frac_of_roofline >= 0.6": _ge(_ratio(b_ours, roof32["tok_s"]), 0.6),
            "prefill_flops_frac >= 0.8": _ge(_ratio(prefill_gflops, peak), 0.8),
            "prefill_vs_hf > 1": _ge(_ratio(p_ours, p_hf), 1.0 + 1e-9),
            **({"single_decode_vs_vllm >= 2": _ge(_ratio(s_ours, s_vl), 2.0),
                "batch32_vs_vllm > 1": _ge(_ratio(b_ours, b_vl), 1.0 + 1e-9),
                "prefill_vs_vllm > 1": _ge(_ratio(p_ours, p_vl), 1.0 + 1e-9)} if vllm else {}),
        },
        "profile": profile,
        "bench_wall_s": round(time.perf_counter() - started, 1),
    }
    return out


def _ge(x: float | None, y: float) -> bool | None:
    return None if x is None else bool(x >= y)


def _git_commit() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "engine"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="FILE", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="fewer new tokens and repetitions")
    ap.add_argument("--skip-hf", action="store_true", help="do not run the transformers reference")
    ap.add_argument("--profile", action="store_true", help="also time the parts of our engine's steps")
    ap.add_argument("--vllm", metavar="PYTHON", help="also run vLLM's offline engine, with this interpreter (the "
                                                     "venv scripts/vllm_serve.sh makes: .vllm-venv/bin/python)")
    ap.add_argument("--vllm-model", default=".vllm-model", metavar="DIR",
                    help="the default model as a Hugging Face folder, for --vllm (python -m benchmarks.export_hf DIR)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each timed run, wait up to S seconds for other processes to leave the cpus idle")
    ap.add_argument("--retries", type=int, default=0,
                    help="extra runs allowed per workload when a run was slowed by other processes (cpu util < 0.85)")
    args = ap.parse_args(argv)
    result = run(args)
    print_table(result)
    print(f"prefix ({result['config']['prefix_requests']} prompts, a {result['config']['prefix_len']}-token prefix "
          f"shared): prompt tok/s cache on {result['prefix_cached_tok_s']}, off {result['prefix_uncached_tok_s']} "
          f"(x{result['prefix_cache_speedup']}; {result['prefix_cached_tokens']} tokens cached; same tokens: "
          f"{result['prefix_same_tokens']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

