"""Attention metadata for one flat batch, set for the duration of a forward."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Filled by the ModelRunner each step; read by every attention layer.
    Sequences are ordered decodes first (one query token each), then prefill chunks."""
    num_decodes: int  # leading sequences with exactly one query token
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each token's K/V
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cu_seqlens of the queries
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step (cached + new)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies for the CPU backend's per-sequence loop (no device sync on the hot path).
    query_start_loc_list: list[int]
    seq_lens_list: list[int]
    max_decode_len: int = 0  # longest context among the decodes
    # [num_decodes, 1, 1, padded max_decode_len] bool: the key slots each decode may attend;
    # built on first use by a backend that needs it (the torch one), once per step
    decode_mask: torch.Tensor | None = None


_current: AttentionMetadata | None = None


@contextmanager
def attention_metadata(meta: AttentionMetadata) -> Iterator[AttentionMetadata]:
    global _current
    prev, _current = _current, meta
    try:
        yield meta
    finally:
        _current = prev


def get_attention_metadata() -> AttentionMetadata:
    if _current is None:
        raise RuntimeError("attention ran outside `with attention_metadata(...)`")
    return _current
