"""Flash attention varlen over the paged cache (CUDA): vllm-flash-attn or flash-attn,
whichever imports with the installed torch. Written and unit-tested through the CPU paths (the
same metadata and paged cache drive the CPU backends in tests/engine/test_attention.py); it has
not run on a GPU yet: tests/gpu/ is to check it on a lent GPU machine."""
from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch

from engine.attention.backend import AttentionBackend, register_backend
from engine.attention.metadata import AttentionMetadata


@cache
def _varlen_func() -> tuple[str, Callable] | None:
    for module in ("vllm_flash_attn", "flash_attn"):
        try:
            return module, __import__(module, fromlist=["flash_attn_varlen_func"]).flash_attn_varlen_func
        except (ImportError, OSError, AttributeError):
            continue
    return None


@register_backend("flash")
class FlashAttention(AttentionBackend):
    @staticmethod
    def is_available() -> bool:
        return torch.cuda.is_available() and _varlen_func() is not None

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        num_kv_heads, head_dim = k_cache.shape[2:]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
        module, varlen = _varlen_func()
        keys = dict(cu_seqlens_q=meta.query_start_loc, max_seqlen_q=meta.max_query_len, max_seqlen_k=meta.max_seq_len,
                    softmax_scale=scale, causal=True, block_table=meta.block_tables)
        if module == "vllm_flash_attn":
            keys["seqused_k"] = meta.seq_lens
        else:  # flash-attn 2 takes cumulative key lengths, and pages of a multiple of 256 tokens
            keys["cu_seqlens_k"] = torch.nn.functional.pad(meta.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        return varlen(q.contiguous(), k_cache, v_cache, **keys)
