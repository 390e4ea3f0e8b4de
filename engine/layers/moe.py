"""Mixture of experts: a router picks top-k of E small gated MLPs per token."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 norm_topk_prob: bool) -> None:
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router
        self.gate.requires_grad_(False)
        # expert e computes w2[e] @ (silu(w13[e][:I] x) * w13[e][I:] x)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, hidden]."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # [num_tokens, E]
        weights, experts = probs.topk(self.top_k, dim=-1)  # [num_tokens, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype).flatten()
        # group the (token, choice) pairs by expert so each expert runs one matmul
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.w13.shape[0]).tolist()
        token_of = order // self.top_k
        out = torch.zeros_like(x)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            rows = order[start:start + count]
            tokens = token_of[start:start + count]
            gate, up = F.linear(x[tokens], self.w13[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[e]) * weights[rows].unsqueeze(1)
            out.index_add_(0, tokens, y)
            start += count
        return out
