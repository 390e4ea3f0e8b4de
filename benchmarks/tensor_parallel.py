"""Tensor parallelism on this machine: step time at TP 1 and TP 2 on the same cores, and the
share of rank 0's step spent in collectives (gloo on loopback), beside the machine's matmul
peak and memory read bandwidth measured in the same run (engine.peaks, the probe every
benchmark and the replicas' MFU/MBU share).

    python -m benchmarks.tensor_parallel [--json FILE] [--quick]

The model is a random Llama-shaped checkpoint written at run time, large enough that the
matmuls are not noise (hidden 1024, 16 layers, 16 heads, 8 KV heads: ~250M parameters).
On 2 cores TP 2 cannot beat TP 1: each rank gets one core instead of two, and every dense
block adds two all-reduces. The figure is for the record; on GPUs the same code runs on NCCL."""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

SHAPE = dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
             intermediate_size=2816, vocab_size=32000)


def write_random_llama(path: Path, seed: int = 0, **shape) -> Path:
    """A Llama checkpoint (config.json + model.safetensors) with N(0, 0.02) weights."""
    from safetensors.torch import save_file

    s = {**SHAPE, **shape}
    h, i, v, d = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["hidden_size"] // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * d
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.02  # noqa: E731
    tensors = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h),
               "lm_head.weight": rand(v, h)}
    for layer in range(s["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors |= {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                    p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                    p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                    p + "mlp.down_proj.weight": rand(h, i), p + "input_layernorm.weight": torch.ones(h),
                    p + "post_attention_layernorm.weight": torch.ones(h)}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "float32", **s}))
    return path


def measure(model: str, tp: int, prefill_len: int, decode_batch: int, decode_steps: int) -> dict:
    from engine import LLM, SamplingParams
    from engine.distributed import CollectiveCounter, get_tp_group
    from replica.ranks import start_followers

    threads = max(1, (os.cpu_count() or 2) // tp)  # the same cores in all: TP n gives each rank 1/n of them
    with LLM(model, num_kv_blocks=512, max_num_batched_tokens=max(prefill_len, decode_batch),
             tensor_parallel_size=tp, num_threads=threads, rank_launcher=start_followers) as llm:
        eng = llm.engine
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, 32000, (prefill_len,), generator=g).tolist()
        llm.generate([prompt[:16]], SamplingParams(temperature=0, max_tokens=2))  # warm-up
        out = {"tp": tp, "threads_per_rank": threads}
        for name, prompts, steps in (("prefill", [prompt], 1),
                                     ("decode", [prompt[k:k + 16] for k in range(decode_batch)], decode_steps)):
            for p in prompts:
                eng.add_request(p, SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))
            if name == "decode":
                eng.step()  # the prompts' own prefill step is not what is measured
            counter = get_tp_group().counter = CollectiveCounter()
            start = time.perf_counter()
            for _ in range(steps):
                eng.step()
            elapsed = (time.perf_counter() - start) / steps
            get_tp_group().counter = None
            collective_s = sum(counter.seconds.values()) / steps
            out[name] = {"step_ms": round(elapsed * 1e3, 2), "collective_ms": round(collective_s * 1e3, 2),
                         "collective_share": round(collective_s / elapsed, 3),
                         "all_reduce_per_step": counter.calls["all_reduce"] // steps,
                         "bytes_per_step": sum(counter.bytes.values()) // steps}
            while eng.has_unfinished():
                eng.step()
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tensor_parallel", description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="a smaller run")
    args = ap.parse_args(argv)
    from benchmarks.machine import measure_machine
    from replica.ranks import ensure_ray

    machine = measure_machine(quick=True)
    prefill_len, batch, steps = (128, 8, 8) if args.quick else (512, 32, 32)
    ensure_ray()
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_random_llama(Path(tmp) / "llama-250m"))
        runs = [measure(model, tp, prefill_len, batch, steps) for tp in (1, 2)]
    result = {"machine": machine, "model": SHAPE, "prefill_tokens": prefill_len, "decode_batch": batch, "runs": runs}
    print(f"machine: matmul peak {machine['matmul_peak_gflops']} GFLOP/s, "
          f"memory read {machine['mem_read_bw_gbs']} GB/s ({os.cpu_count()} cores)")
    print(f"{'':8}{'prefill ' + str(prefill_len) + ' tok':>30}{'decode batch ' + str(batch):>34}")
    print(f"{'TP':<8}{'step ms':>10}{'collective':>12}{'share':>8}{'step ms':>14}{'collective':>12}{'share':>8}")
    for r in runs:
        p, d = r["prefill"], r["decode"]
        print(f"{r['tp']:<8}{p['step_ms']:>10}{p['collective_ms']:>12}{p['collective_share']:>8.0%}"
              f"{d['step_ms']:>14}{d['collective_ms']:>12}{d['collective_share']:>8.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
