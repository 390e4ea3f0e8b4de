#!/usr/bin/env bash
# Fetch into .whl the wheels tests/gpu/run.sh needs that a lent GPU machine lacks (it cannot reach PyPI; its
# python3 is 3.12 with torch, transformers, safetensors, numpy, grpcio and pytest already there). Run here, in
# the repository root, then carry .whl (64 MiB at most travel). Flash attention: vllm-flash-attn's wheels are
# built against one torch each; without one for the machine's torch the flash test fails with its install
# hint and the engine runs the torch attention backend.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl gguf==0.19.0 "${@}"
ls -la .whl
