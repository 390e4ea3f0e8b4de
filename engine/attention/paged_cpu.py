"""The CPU backend: decodes and prefill chunks attend in place over the paged cache through
small C kernels (compiled with the system C compiler on first use, cached by source hash);
the torch reference path where they cannot (other dtypes, layouts, head sizes)."""
from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from engine.attention.backend import register_backend
from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import TorchAttention
from engine.native import load

_CSRC = Path(__file__).parent / "csrc"
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-lm"]  # fast-math: vector expf
_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


@cache
def _kernel() -> ctypes.CDLL | None:
    return load(_CSRC / "paged_decode.c", _FLAGS, {"paged_decode_attention_f32": (
        [_ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _f32,
         _i64], ctypes.c_int)})


@cache
def _prefill_kernel() -> ctypes.CDLL | None:
    return load(_CSRC / "paged_prefill.c", [*_FLAGS, "-lmvec"], {"paged_prefill_attention_f32": (
        [_ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i64, _i64, _ptr, _i64, _i64, _i64,
         _i64, _i64, _f32], ctypes.c_int)})


@register_backend("cpu")
class PagedCPUAttention(TorchAttention):
    @staticmethod
    def is_available() -> bool:
        return _kernel() is not None

    def __init__(self) -> None:
        self._fn = _kernel().paged_decode_attention_f32
        lib = _prefill_kernel()
        self._prefill_fn = lib.paged_prefill_attention_f32 if lib is not None else None

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Each kernel writes the K/V of its own tokens into the cache, then attends."""
        if not all(_rows(t) for t in (q, k, v)) or q.dtype != torch.float32:
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)
        nd, num_seqs = meta.num_decodes, len(meta.seq_lens_list)
        num_kv_heads, head_dim = k_cache.shape[2:]
        out = q.new_empty(q.shape)  # contiguous even when q is a view into q|k|v
        tables = meta.block_tables
        if nd:
            failed = self._fn(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                              meta.slot_mapping.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                              tables.shape[1], meta.seq_lens.data_ptr(), out.data_ptr(), nd, q.shape[1], num_kv_heads,
                              head_dim, k_cache.shape[1], scale, meta.max_decode_len)
            if failed:
                raise MemoryError("paged decode attention could not allocate its score buffer")
        if nd < num_seqs:
            failed = -1 if self._prefill_fn is None else self._prefill_fn(
                q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                meta.slot_mapping.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), tables.shape[1],
                meta.query_start_loc.data_ptr(), meta.seq_lens.data_ptr(), nd, num_seqs, out.data_ptr(), out.stride(0),
                q.shape[1], num_kv_heads, head_dim, k_cache.shape[1], scale)
            if failed == -2:
                raise MemoryError("paged prefill attention could not allocate its scratch")
            if failed:  # a shape the kernel does not take (it wrote nothing): the torch path
                self.store_kv(k_cache, v_cache, meta.slot_mapping[nd:], k[nd:], v[nd:])
                self.prefill(q, k, v, k_cache, v_cache, meta, scale, out)
        return out

    def decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out: torch.Tensor) -> None:
        """Decodes over a cache that already holds their K/V (the kernel writes none)."""
        if q.dtype != torch.float32 or not _rows(q):
            return super().decode(q, k_cache, v_cache, meta, scale, out)
        _, block_size, num_kv_heads, head_dim = k_cache.shape
        tables = meta.block_tables
        failed = self._fn(q.data_ptr(), q.stride(0), None, 0, None, 0, None, k_cache.data_ptr(), v_cache.data_ptr(),
                          tables.data_ptr(), tables.shape[1], meta.seq_lens.data_ptr(), out.data_ptr(),
                          meta.num_decodes, q.shape[1], num_kv_heads, head_dim, block_size, scale,
                          meta.max_decode_len)
        if failed:
            raise MemoryError("paged decode attention could not allocate its score buffer")


def _rows(t: torch.Tensor) -> bool:
    """[tokens, heads, head_dim] with heads packed in each token's row (tokens may be strided)."""
    return t.stride(2) == 1 and t.stride(1) == t.shape[2]
