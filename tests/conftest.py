"""Session-wide test setup: two torch threads, and the tiny random checkpoints made once."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.engine.tiny_models import ARCHS, make_tiny_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> folder of a tiny random float32 HF checkpoint (no tokenizer), one per arch in ARCHS."""
    root = tmp_path_factory.mktemp("tiny_ckpts")
    return {arch: make_tiny_checkpoint(arch, root / arch) for arch in ARCHS}
