"""pdserve: disaggregated prefill/decode LLM serving.

The top level is the client SDK, which needs only grpcio and protobuf:

    with pdserve.Client("127.0.0.1:50051") as client:
        print(client.generate("The capital of France is", max_tokens=8, temperature=0).text)

Nothing imported here may pull in torch, ray, numpy or yaml (tests/pdserve/test_sdk_without_torch.py checks it).
"""
from __future__ import annotations

from pdserve.client import AsyncClient, Chunk, Client, Completion, ModelInfo, RequestError, TokenLogprob, Usage

__all__ = ["AsyncClient", "Chunk", "Client", "Completion", "ModelInfo", "RequestError", "TokenLogprob", "Usage"]

# The serving side (config, launching a cluster) goes below as lazy attributes, through a module-level __getattr__,
# so that it is imported only when first used and `import pdserve` stays light.

_LAZY = {"ClusterConfig": "pdserve.config", "PoolConfig": "pdserve.config", "RouterConfig": "pdserve.config",
         "start_cluster": "pdserve.launch", "Cluster": "pdserve.launch"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pdserve' has no attribute {name!r}")
