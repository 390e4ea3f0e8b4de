"""The reference backend: torch SDPA over K/V gathered from the paged cache. Runs anywhere."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.backend import AttentionBackend, register_backend
from engine.attention.metadata import AttentionMetadata


@register_backend("torch")
class TorchAttention(AttentionBackend):
    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        self.store_kv(k_cache, v_cache, meta.slot_mapping, k, v)
        out = q.new_empty(q.shape)  # contiguous even when q is a view into q|k|v
        if meta.num_decodes:
            self.decode(q, k_cache, v_cache, meta, scale, out)
        if meta.num_decodes < len(meta.seq_lens_list):
            self.prefill(q, k, v, k_cache, v_cache, meta, scale, out)
        return out

    @staticmethod
    def store_kv(k_cache, v_cache, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Each token's K/V row into its cache slot."""
        num_kv_heads, head_dim = k_cache.shape[2:]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)

    def decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out: torch.Tensor) -> None:
        """All decodes in one SDPA call: gather each one's blocks, mask the padding."""
        nd = meta.num_decodes
        _, block_size, num_kv_heads, head_dim = k_cache.shape
        if meta.decode_mask is None:
            width = -(-meta.max_decode_len // block_size) * block_size
            meta.decode_mask = (torch.arange(width, device=q.device) < meta.seq_lens[:nd, None])[:, None, None, :]
        tables = meta.block_tables[:nd, : meta.decode_mask.shape[-1] // block_size]
        kd = k_cache[tables].view(nd, -1, num_kv_heads, head_dim).transpose(1, 2)  # [nd, kv_heads, len, head_dim]
        vd = v_cache[tables].view(nd, -1, num_kv_heads, head_dim).transpose(1, 2)
        qd = q[:nd].unsqueeze(2)  # [nd, heads, 1, head_dim]
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True)
        out[:nd] = od.squeeze(2)

    def prefill(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, out: torch.Tensor) -> None:
        """One SDPA per prefill chunk, over the chunk's cached context plus itself."""
        _, block_size, num_kv_heads, head_dim = k_cache.shape
        qsl, lens = meta.query_start_loc_list, meta.seq_lens_list
        for i in range(meta.num_decodes, len(lens)):
            start, end, seq_len = qsl[i], qsl[i + 1], lens[i]
            n = end - start
            qi = q[start:end].transpose(0, 1)[None]  # [1, heads, n, head_dim]: 4-D takes the fused CPU kernel
            if n == seq_len:  # nothing cached before this chunk: attend to the fresh K/V
                ki, vi, mask, causal = k[start:end], v[start:end], None, True
            else:
                blocks = meta.block_tables[i, : -(-seq_len // block_size)]
                ki = k_cache[blocks].view(-1, num_kv_heads, head_dim)[:seq_len]  # [seq_len, kv_heads, head_dim]
                vi = v_cache[blocks].view(-1, num_kv_heads, head_dim)[:seq_len]
                # query j sits at position seq_len - n + j and sees keys up to there
                mask = torch.ones(n, seq_len, dtype=torch.bool, device=q.device).tril_(seq_len - n)
                causal = False
            oi = F.scaled_dot_product_attention(qi, ki.transpose(0, 1)[None], vi.transpose(0, 1)[None],
                                                attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
            out[start:end] = oi[0].transpose(0, 1)
