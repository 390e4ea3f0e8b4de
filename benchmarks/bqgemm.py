"""The block-quant matmul without AMX (engine/layers/bqgemm.py) against MKL on the fp32 weights it
stands for, on the default model's shapes, beside the CPU's FMA peak measured in the same run.

    python -m benchmarks.bqgemm [--rows 1,8,32,128,129,512,2048] [--threads 2]

Per shape (out x in: SmolLM2's qkv, o, gate|up, down) and row count: microseconds a call (best of
--reps after one warm-up; the weights stay in the caches, so one-row figures are not a decode's
memory-bound speed: engine.bench measures that), GFLOP/s (2 x rows x out x in), the fraction of the
FMA peak, and the time against MKL's torch.mm on the dequantized fp32 weight. Names the path each
row count takes (csrc/bqgemm.c) and why the kernel is off where it is.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.machine import cpu_name, fma_peak_gflops
from engine.layers import bqgemm, qgemm

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))


def random_q4_1(rows: int, cols: int) -> qgemm.BlockQuant:
    """A Q4_1 weight as GGUF stores one: 4-bit integers, fp16 scales d and offsets m per 32 weights."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.int8)
    d, m = ((torch.rand(rows, cols // qgemm.BLOCK, generator=g) * s).half().float() for s in (0.05, -0.2))
    return qgemm.BlockQuant(q, d, m)


def path(rows: int) -> str:
    """Which of the kernel's paths a call of this many rows takes (as bqgemm_f32 picks)."""
    return ("few rows" if rows <= 8 else "streaming tiles" if rows < 48 else "wide" if rows < bqgemm.PANEL_MIN
            else "dequantized panels")


def best_us(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bqgemm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,8,32,128,129,512,2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tiles = qgemm.unsupported() or f"AMX (this kernel then takes steps of up to {bqgemm.FEW_ROWS} rows only)"
    print(f"host: {cpu_name()}; tile unit: {tiles}")
    if not bqgemm.supported():
        print(f"the block-quant kernel is off here: {bqgemm.unsupported()}")
        return 1
    fma = fma_peak_gflops(args.threads)
    print(f"FMA peak {fma} GFLOP/s on {args.threads} threads (benchmarks/csrc/fma_peak.c)")
    print(f"{'shape':>10} {'rows':>5} {'path':>19} {'us':>9} {'GFLOP/s':>8} {'of FMA':>7} {'MKL us':>9} "
          f"{'ours/MKL':>9}")
    for n, k in SHAPES:
        quant = random_q4_1(n, k)
        packed, weight_t = bqgemm.pack(quant), quant.dequantize().t().contiguous()
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k)
            ours = best_us(lambda: bqgemm.linear(x, packed, None), args.reps)
            mkl = best_us(lambda: torch.mm(x, weight_t), args.reps)
            gflops = 2 * rows * n * k / ours / 1e3
            frac = f"{gflops / fma:.2f}" if fma else "-"
            print(f"{n:>5}x{k:<4} {rows:>5} {path(rows):>19} {ours:>9.1f} {gflops:>8.1f} {frac:>7} {mkl:>9.1f} "
                  f"{ours / mkl:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
