"""The real cluster: a local Ray on 127.0.0.1, the pools as Ray actors, the router's gRPC server,
called through the SDK. One Ray for the session; clusters per module."""
from __future__ import annotations

import os
import time

import pytest

from pdserve import Client
from pdserve.config import ClusterConfig, PoolConfig, RouterConfig
from pdserve.launch import start_cluster


def small_cluster(model: str, **router) -> ClusterConfig:
    """One prefill and one decode replica, one core and one torch thread each, KV pools sized for tests."""
    return ClusterConfig(
        model=model, name=f"test{os.getpid()}",
        prefill=PoolConfig(max_num_batched_tokens=128, num_kv_blocks=128),
        decode=PoolConfig(max_num_batched_tokens=128, num_kv_blocks=256),
        router=RouterConfig(**{"port": 0, "metrics_port": 0, "http_port": 0, **router}))


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoints) -> str:
    """The tiny random llama checkpoint (no tokenizer: prompts are token ids)."""
    return str(tiny_checkpoints["llama"])


@pytest.fixture(scope="module")
def default_cluster(ray_local):
    with start_cluster(small_cluster("default", max_ongoing_requests=8, max_queued_requests=64), progress=None) as c:
        yield c


def listening_beyond_loopback() -> list[tuple[str, int, str]]:
    """The TCP listeners of this process and its children (Ray's daemons and workers, the router)
    on any address but loopback: (ip, port, process name)."""
    import psutil

    me = psutil.Process()
    pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    return [(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()) for c in listening
            if c.laddr.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]


def wait_idle(client: Client, timeout_s: float = 20.0) -> dict[str, int]:
    """Poll until no request is in flight and no KV block is held; returns the last block counts."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = client.status()
        used = {f"{p.role}/{r.index}": r.kv_blocks_used for p in s.pools for r in p.replicas}
        if (s.requests_in_flight == 0 and s.requests_queued == 0 and not any(used.values())) \
                or time.monotonic() > deadline:
            return used
        time.sleep(0.1)
