"""On a CUDA machine: the `collective` backend with both engines on the GPU (two processes on
one GPU, where NCCL refuses two ranks: the gloo wire carries each layer through host memory, the
receiving threads on side streams as on NCCL). The decode side's greedy continuation equals one
engine doing both. Run: pytest -m gpu tests/gpu"""
from __future__ import annotations

import pytest
import torch

from tests.kv_transfer.test_collective_transfer import check_transfer_equals_one_engine, start_pair, stop_pair

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_collective_on_cuda_equals_one_engine(tiny_checkpoints, monkeypatch) -> None:
    monkeypatch.setenv("PDSERVE_KV_WIRE", "gloo")  # the prefill child inherits it
    pair = start_pair(str(tiny_checkpoints["llama"]), device="cuda")
    try:
        assert pair[0].runner.kv_cache.is_cuda
        check_transfer_equals_one_engine(pair)
    finally:
        stop_pair(pair)
