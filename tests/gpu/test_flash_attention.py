"""On a CUDA machine: the flash backend equals the torch reference over the paged cache,
and the engine's greedy tokens on CUDA equal transformers'. Run: pytest -m gpu tests/gpu"""
from __future__ import annotations

import pytest
import torch

from engine.attention.backend import available_backends, get_backend
from tests.engine.test_attention import DIM, _batch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_flash_backend_is_available() -> None:
    assert "flash" in available_backends(), "install the gpu extra: pip install -e '.[gpu]'"


@pytest.mark.parametrize("query_lens,context_lens", [([1, 1, 1], [1, 17, 300]), ([1, 1, 24, 3], [33, 2, 80, 3])])
def test_flash_matches_torch_reference(query_lens, context_lens) -> None:
    q, k, v, k_cache, v_cache, meta, _, _ = _batch(query_lens, context_lens)
    ref = get_backend("torch", torch.device("cpu")).forward(q, k, v, k_cache.clone(), v_cache.clone(), meta,
                                                            DIM ** -0.5)
    cuda = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    meta_gpu = type(meta)(**{f: cuda(getattr(meta, f)) for f in meta.__dataclass_fields__})
    out = get_backend("flash", torch.device("cuda")).forward(
        *(t.cuda().half() for t in (q, k, v, k_cache, v_cache)), meta_gpu, DIM ** -0.5)
    torch.testing.assert_close(out.float().cpu(), ref, atol=2e-2, rtol=2e-2)
