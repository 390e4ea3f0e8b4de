"""Mixture of experts: a router picks top-k of E small gated MLPs per token.

Across the ranks of a replica, two ways:
- tensor parallel (default): every rank holds every expert, each cut like a dense MLP
  (gate|up by rows, down by columns); one all-reduce after.
- expert parallel: rank r holds experts [r E/n, (r+1) E/n). Every rank has the whole
  batch, so each takes a 1/n slice of the tokens, sends each (token, choice) to the rank
  that owns the expert (all-to-all), runs its experts on what arrives, sends the results
  back (all-to-all), and the slices are gathered into the whole batch again."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import get_tp_group


class MoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 norm_topk_prob: bool, expert_parallel: bool = False) -> None:
        super().__init__()
        self.tp = get_tp_group()
        n, r = self.tp.world_size, self.tp.rank
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.num_experts = num_experts
        self.expert_parallel = expert_parallel and n > 1
        self.local_experts = num_experts // n if self.expert_parallel else num_experts
        self.first_expert = r * self.local_experts if self.expert_parallel else 0
        self.full_intermediate = intermediate_size
        self.intermediate = intermediate_size if self.expert_parallel else intermediate_size // n
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router, replicated
        self.gate.requires_grad_(False)
        # expert e computes w2[e] @ (silu(w13[e][:I] x) * w13[e][I:] x)
        self.w13 = nn.Parameter(torch.empty(self.local_experts, 2 * self.intermediate, hidden_size),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.local_experts, hidden_size, self.intermediate), requires_grad=False)

    def load_expert(self, param: nn.Parameter, loaded: torch.Tensor, expert: int, half: int | None) -> None:
        """One expert's gate (half 0), up (half 1) or down (half None) from the checkpoint."""
        e = expert - self.first_expert
        if not 0 <= e < self.local_experts:
            return  # another rank's expert
        i, start = self.intermediate, 0 if self.expert_parallel else self.tp.rank * self.intermediate
        if half is None:
            param.data[e].copy_(loaded[:, start:start + i])
        else:
            param.data[e, half * i:(half + 1) * i].copy_(loaded[start:start + i])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, hidden], the same on every rank."""
        if self.expert_parallel:
            return self._expert_parallel(x)
        weights, experts = self._route(x)
        return self.tp.all_reduce(self._experts(x, experts.flatten(), weights.flatten(), self.top_k))

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # [num_tokens, E]
        weights, experts = probs.topk(self.top_k, dim=-1)  # [num_tokens, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def _experts(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, per_row: int) -> torch.Tensor:
        """Sum over (row, expert, weight) triples of weight * expert(x[row]); experts are local
        indices, row i // per_row of x. Pairs are grouped by expert so each runs one matmul."""
        order = experts.argsort(stable=True)
        counts = torch.bincount(experts, minlength=self.local_experts).tolist()
        row_of = order // per_row
        out = torch.zeros(x.shape[0], self.w2.shape[1], dtype=x.dtype, device=x.device)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            pairs, rows = order[start:start + count], row_of[start:start + count]
            gate, up = F.linear(x[rows], self.w13[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[e]) * weights[pairs].unsqueeze(1)
            out.index_add_(0, rows, y)
            start += count
        return out

    def _expert_parallel(self, x: torch.Tensor) -> torch.Tensor:
        n, r = self.tp.world_size, self.tp.rank
        weights, experts = self._route(x)  # on the whole batch, as one rank would: same bits
        per_rank = -(-x.shape[0] // n)
        lo, hi = min(r * per_rank, x.shape[0]), min((r + 1) * per_rank, x.shape[0])  # this rank's tokens
        flat, w = experts[lo:hi].flatten(), weights[lo:hi].flatten()
        # (token, choice) pairs sorted by expert, hence grouped by the rank that owns it; each token's
        # choices are then summed in expert order, as the single-rank path does
        order = flat.argsort(stable=True)
        send = torch.bincount(flat // self.local_experts, minlength=n)
        send_counts, recv_counts = send.tolist(), self.tp.exchange_counts(send).tolist()
        token_of = lo + order // self.top_k
        tokens_in = self.tp.all_to_all(x[token_of], send_counts, recv_counts)  # dispatch
        experts_in = self.tp.all_to_all(flat[order], send_counts, recv_counts) - self.first_expert
        ones = torch.ones(tokens_in.shape[0], dtype=x.dtype, device=x.device)
        back = self.tp.all_to_all(self._experts(tokens_in, experts_in, ones, 1), recv_counts, send_counts)  # combine
        out = x.new_zeros(per_rank, x.shape[1])  # padded: the last slices may be short
        out.index_add_(0, order // self.top_k, back * w[order].unsqueeze(1))
        return self.tp.all_gather(out, dim=0)[:x.shape[0]]
