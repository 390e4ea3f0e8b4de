"""python -m engine "question" [--max-tokens N]: a chat answer from the offline engine."""
from __future__ import annotations

import argparse
import time

import torch

from engine import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    ap.add_argument("prompt", nargs="?", default="What is the capital of France?")
    ap.add_argument("--model", default="default", help='"default", a Hugging Face folder or a .gguf file')
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    llm = LLM(args.model)
    t1 = time.perf_counter()
    out = llm.chat([{"role": "user", "content": args.prompt}],
                   SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens))[0]
    t2 = time.perf_counter()
    print(out.text.strip())
    print(f"\n[{len(out.token_ids)} tokens in {t2 - t1:.2f} s ({len(out.token_ids) / (t2 - t1):.1f} tok/s), "
          f"model loaded in {t1 - t0:.1f} s, finish: {out.finish_reason}]")


if __name__ == "__main__":
    main()
