"""On a machine with two GPUs: the `collective` backend over NCCL, a prefill engine on one GPU streaming each
layer's KV straight from its memory into the decode engine's pool on the other; the decode side's greedy
continuation equals one engine doing both. NCCL refuses two ranks on one device, so one GPU skips it (the gloo
wire covers that case: test_collective_cuda.py). Run: pytest -m gpu tests/gpu"""
from __future__ import annotations

import pytest
import torch

from tests.kv_transfer.test_collective_transfer import check_transfer_equals_one_engine, start_pair, stop_pair

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices for two NCCL ranks")]


def test_collective_over_nccl_equals_one_engine(tiny_checkpoints, monkeypatch) -> None:
    monkeypatch.delenv("PDSERVE_KV_WIRE", raising=False)
    pair = start_pair(str(tiny_checkpoints["llama"]), device="cuda:0", decode_device="cuda:1")
    try:
        receiver = pair[2]
        assert receiver.wire.backend == "nccl" and pair[0].runner.kv_cache.device == torch.device("cuda:1")
        check_transfer_equals_one_engine(pair)
    finally:
        stop_pair(pair)
