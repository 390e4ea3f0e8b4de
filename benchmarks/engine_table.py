"""The engine benchmark's result as a table on stdout."""
from __future__ import annotations

from typing import Any

from benchmarks.step_profiler import StepProfiler


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(r: dict[str, Any]) -> None:
    m = r["machine"]
    print()
    print(f"machine: {m['cpu']}, {m['cpu_count']} cpus, torch {m['torch']}, {m['threads']} threads, "
          f"load avg {m['loadavg_before'][0]} -> {m['loadavg_after'][0]}")
    print(f"  fp32 matmul peak {r['matmul_peak_gflops']:.1f} GFLOP/s (FMA peak {_fmt(r.get('fma_peak_gflops'))})   "
          f"memory read {r['mem_read_bw_gbs']:.1f} GB/s   "
          f"(before {m['before']['matmul_peak_gflops']}/{m['before']['mem_read_bw_gbs']}, "
          f"after {m['after']['matmul_peak_gflops']}/{m['after']['mem_read_bw_gbs']})")
    sp = m["spread"]
    print(f"  drift during the run: matmul(2048) {sp['matmul_2048_gflops'][0]}-{sp['matmul_2048_gflops'][1]} "
          f"GFLOP/s, matvec {sp['matvec_gbs'][0]}-{sp['matvec_gbs'][1]} GB/s "
          "(compare engines within a workload, not across runs)")
    w = r["workloads"]

    def util(work, eng):
        return _fmt(w[work].get(eng, {}).get("cpu_util"), ".2f")
    rows = [
        ("single decode tok/s", r["single_decode_tok_s"], r["single_decode_hf_tok_s"],
         f"roofline {r['single_decode_roofline_tok_s']:.1f} (stored "
         f"{r.get('single_decode_roofline_stored_tok_s', float('nan')):.1f})", r["single_decode_vs_hf"],
         util("single", "pdserve"), util("single", "transformers")),
        ("  time to first token s", r["single_ttft_s"], r["single_ttft_hf_s"], "", None, "", ""),
        ("batch32 decode tok/s", r["batch32_decode_tok_s"], r["batch32_hf_tok_s"],
         f"roofline {r['batch32_roofline_tok_s']:.1f}", r["batch32_vs_hf"],
         util("batch32", "pdserve"), util("batch32", "transformers")),
        ("  end-to-end new tok/s", r["batch32_e2e_tok_s"], r["batch32_hf_e2e_tok_s"], "", None, "", ""),
        ("prefill tok/s", r["prefill_tok_s"], r["prefill_hf_tok_s"], "", r["prefill_vs_hf"],
         util("prefill", "pdserve"), util("prefill", "transformers")),
        ("  prefill GFLOP/s", r["prefill_gflops"], r["prefill_hf_gflops"],
         f"peak {r['matmul_peak_gflops']:.1f} (FMA {_fmt(r.get('fma_peak_gflops'))})", None, "", ""),
    ]
    print()
    print(f"{'workload':<26}{'pdserve':>10}{'transformers':>14}{'limit':>30}{'ours/hf':>9}{'cpu util':>13}")
    for name, a, b, lim, ratio, ua, ub in rows:
        ut = f"{ua}/{ub}" if ua else ""
        print(f"{name:<26}{_fmt(a, '.2f'):>10}{_fmt(b, '.2f'):>14} {lim:>29}{_fmt(ratio, '.2f'):>9}{ut:>13}")
    print()
    print(f"fractions: batch32 of roofline ours {_fmt(r['batch32_frac_of_roofline'], '.3f')} "
          f"hf {_fmt(r['batch32_hf_frac_of_roofline'], '.3f')} (roofline with KV reads "
          f"{r['batch32_roofline_with_kv_tok_s']:.1f});  prefill of matmul peak ours "
          f"{_fmt(r['prefill_flops_frac'], '.3f')} hf {_fmt(r['prefill_hf_flops_frac'], '.3f')}")
    if r.get("fma_peak_gflops"):
        print(f"  prefill of the FMA peak ours {_fmt(r['prefill_frac_of_fma_peak'], '.3f')} hf "
              f"{_fmt(r['prefill_hf_frac_of_fma_peak'], '.3f')}")
    print(f"single decode: {_fmt(r.get('single_decode_frac_of_roofline_stored'), '.3f')} of the roofline over the "
          f"weights' {r['weight_bytes_stored'] / 1e6:.0f} MB as stored (fp32 "
          f"{r['model_counts']['weight_bytes'] / 1e6:.0f} MB: {_fmt(r['single_decode_frac_of_roofline'], '.3f')}); "
          "its compute bound at the FMA peak "
          f"{_fmt(r.get('single_decode_compute_bound_tok_s'))} tok/s "
          f"({_fmt(r.get('single_decode_frac_of_compute_bound'), '.3f')} of it)")
    if r.get("batch32_frac_of_roofline_around") is not None:
        print(f"  batch32 against the probes around it (roofline {r['batch32_roofline_around_tok_s']:.1f}): ours "
              f"{r['batch32_frac_of_roofline_around']:.3f} hf {_fmt(r['batch32_hf_frac_of_roofline_around'], '.3f')}")
    print(f"greedy agreement with transformers: single {r['single_greedy_match_prefix']} leading tokens; "
          f"batch32 min {r['batch32_greedy_match_prefix_min']} mean {r['batch32_greedy_match_prefix_mean']}")
    print(f"engine {r['engine_commit']}, attention backend {r['attention_backend']}, "
          f"decoder stack {r.get('decoder_stack')}, matmuls {r.get('matmul')}")
    print(f"peak RSS: pdserve {r['peak_rss_mb']:.0f} MB (KV cache {r['kv_cache_mb']:.0f} MB), "
          f"transformers {_fmt(r['peak_rss_hf_mb'], '.0f')} MB;  load s: {r['load_s']}")
    if v := r.get("vllm"):
        print(f"vLLM {v['version']} (offline engine, same workloads, turns taken with ours): single decode "
              f"{_fmt(v['single_decode_tok_s'], '.2f')} tok/s (ours x{_fmt(v['single_decode_ours_vs_vllm'], '.2f')}), "
              f"batch32 {_fmt(v['batch32_decode_tok_s'], '.2f')} (ours x{_fmt(v['batch32_ours_vs_vllm'], '.2f')}; "
              f"{_fmt(v['batch32_frac_of_roofline'], '.3f')} of roofline), prefill {_fmt(v['prefill_tok_s'], '.1f')} "
              f"(ours x{_fmt(v['prefill_ours_vs_vllm'], '.2f')}; {_fmt(v['prefill_flops_frac'], '.3f')} of the matmul "
              f"peak, {_fmt(v.get('prefill_frac_of_fma_peak'), '.3f')} of the FMA peak); greedy agreement with ours "
              f"{v['greedy_match_with_ours']}; peak RSS {v['peak_rss_mb']:.0f} MB, "
              f"load {v['load_s']} s")
    print("targets: " + ", ".join(f"{k}: {v}" for k, v in r["targets"].items()))
    if r.get("profile"):
        print()
        print("profile of our engine, ms per step:")
        parts = (*StepProfiler.PARTS, "total")
        print(f"{'workload':<18}{'steps':>6}" + "".join(f"{p[:10]:>11}" for p in parts))
        for work, d in r["profile"].items():
            for kind in ("prefill", "decode"):
                if kind in d:
                    row = d[kind]
                    print(f"{work + ' ' + kind:<18}{row['steps']:>6}"
                          + "".join(f"{row[p + '_ms']:>11.2f}" for p in parts))
    print(f"\nbench wall time {r['bench_wall_s']:.0f} s")
