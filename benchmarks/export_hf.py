"""Write a model pdserve loads (the default GGUF, or any GGUF) as a Hugging Face folder: config.json,
model.safetensors (float32, the weights exactly as pdserve's engine reads them) and the tokenizer's files
(with its chat template), so that another server (`vllm serve`, transformers) runs the same model.

    python -m benchmarks.export_hf OUT_DIR [--model default]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def export_hf(model: str, out: str | Path) -> Path:
    """Export `model` into the folder `out` (made if missing; files in it are overwritten); returns it."""
    from safetensors.torch import save_file

    from engine.loader import open_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = open_model(model)
    config = dict(source.hf_config)
    weights = {name: w.contiguous() for name, w in source.weights}
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage, and HF re-ties it
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.export_hf", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the folder to write")
    ap.add_argument("--model", default="default", help="a GGUF file or 'default' (default: %(default)s)")
    args = ap.parse_args(argv)
    print(export_hf(args.model, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
