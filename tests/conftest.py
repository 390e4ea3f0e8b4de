"""Session-wide test setup: two torch threads, and the tiny random checkpoints made once."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from replica.ranks import loopback_ray

loopback_ray()  # before any test module imports ray: a local Ray must bind 127.0.0.1 only

from tests.engine.tiny_models import ARCHS, make_tiny_checkpoint  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> folder of a tiny random float32 HF checkpoint (no tokenizer), one per arch in ARCHS."""
    root = tmp_path_factory.mktemp("tiny_ckpts")
    return {arch: make_tiny_checkpoint(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray on 127.0.0.1 for the session; 8 logical CPUs so that several small clusters
    and tensor-parallel replicas can share the 2 real cores (each rank runs one torch thread)."""
    import ray

    from pdserve.config import ClusterConfig
    from pdserve.launch import init_ray

    init_ray(ClusterConfig(), num_cpus=8)
    yield
    ray.shutdown()
