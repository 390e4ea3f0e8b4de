"""The vocabulary cut: each rank holds a contiguous slice of the embedding rows (padded so
the slices are equal). Embedding: look up the ids in your slice, zeros elsewhere, all-reduce.
LM head: logits for your slice, all-gathered into the whole vocabulary."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import get_tp_group
from engine.layers import bqgemm, gemm, qgemm


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp = get_tp_group()
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // self.tp.world_size)  # per rank, padded
        self.start = self.tp.rank * self.rows
        self.end = min(vocab_size, self.start + self.rows)
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden_size), requires_grad=False)
        self.weight_panels: torch.Tensor | None = None  # the LM head's layouts for steps of
        self.weight_amx: qgemm.Packed | None = None  # several rows (gemm.pack_model)
        self.weight_bq: bqgemm.Packed8 | None = None
        self.block_quant: qgemm.BlockQuant | None = None
        self._quant_parts: list | None = []

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: int = 0) -> None:
        if loaded.shape != (self.vocab_size, param.shape[1]):
            raise ValueError(f"embedding has shape {tuple(loaded.shape)}, expected {(self.vocab_size, param.shape[1])}")
        param.data[:self.end - self.start].copy_(loaded[self.start:self.end])
        self._quant_parts = qgemm.collect(self._quant_parts, loaded, slice(self.start, self.end), slice(None), 0)

    def post_load(self) -> None:
        self.block_quant = qgemm.assemble(self._quant_parts, self.rows)
        self._quant_parts = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.end)
        x = F.embedding((ids - self.start).masked_fill_(outside, 0), self.weight)
        x.masked_fill_(outside.unsqueeze(1), 0)
        return self.tp.all_reduce(x)

    def panel_source(self) -> torch.Tensor:
        return self.weight.data.t()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """As the LM head (its own weight, or the embedding's when tied):
        [num_rows, hidden] -> [num_rows, vocab]."""
        local = gemm.matmul(hidden, self.weight_amx, self.weight_panels, self.weight.t(), None, self.weight_bq)
        logits = self.tp.all_gather(local)
        return logits[:, :self.vocab_size] if logits.shape[1] != self.vocab_size else logits


ParallelLMHead = VocabParallelEmbedding  # the output projection is sharded exactly like the embedding
