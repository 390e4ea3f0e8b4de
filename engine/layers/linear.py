"""Linear layers in their tensor-parallel shape, the two dual cuts of a dense block:
column-parallel (each rank computes a slice of the outputs; no communication) then
row-parallel (each rank holds a slice of the inputs and computes a partial sum; one
all-reduce). Weight loaders take the full checkpoint tensor and keep the rank's slice."""
from __future__ import annotations

import torch
from torch import nn

from engine.distributed import get_tp_group
from engine.layers import bqgemm, gemm, qgemm


class _Linear(nn.Module):
    """After loading, W is kept as a contiguous [in, out] for MKL; on CPU fp32, gemm.pack_model
    adds a layout of its own: the AMX tiles where the checkpoint's weight was block-quantized
    (the shards' integers are collected while loading), or without tiles their int8 blocks, which then
    take every step and replace the [in, out] copy; else the fp32 panels for steps of 2-128 rows
    (single rows and prefill chunks stay on MKL). The [out, in] copy is dropped."""

    weight_panels: torch.Tensor | None = None
    weight_amx: qgemm.Packed | None = None
    weight_bq: bqgemm.Packed8 | None = None
    block_quant: qgemm.BlockQuant | None = None

    def __init__(self) -> None:
        super().__init__()
        self._quant_parts: list | None = []

    def post_load(self) -> None:
        self.weight_t = nn.Parameter(self.weight.data.t().contiguous(), requires_grad=False)
        self.block_quant = qgemm.assemble(self._quant_parts, self.weight.shape[0])
        self._quant_parts = None
        del self.weight

    def panel_source(self) -> torch.Tensor:
        return self.weight_t.data

    def drop_dense(self) -> None:
        """The tiles, or the int8 blocks where there are no tiles, take every fp32 step (gemm.pack_model
        gave them): the [in, out] copy goes."""
        if self.weight_t.dtype is torch.float32:
            self.weight_t = None

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return gemm.matmul(x, self.weight_amx, self.weight_panels, self.weight_t, bias, self.weight_bq)


class ColumnParallelLinear(_Linear):
    """y = x W^T with W's rows (outputs) split across ranks. Several logical outputs may be
    merged into one matmul (q|k|v, gate|up); each loads its slice into its own rows.
    shards: per logical output, (first row, rows) this rank keeps of the full tensor; the
    default is an even split by rank (KV heads replicated across ranks pass their own)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 shards: list[tuple[int, int]] | None = None) -> None:
        super().__init__()
        tp = get_tp_group()
        self.full_sizes = output_sizes
        self.shards = shards or [(tp.rank * (s // tp.world_size), s // tp.world_size) for s in output_sizes]
        self.output_sizes = [size for _, size in self.shards]  # this rank's
        self.offsets = [sum(self.output_sizes[:i]) for i in range(len(self.output_sizes))]
        self.weight = nn.Parameter(torch.empty(sum(self.output_sizes), input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(self.output_sizes)), requires_grad=False) if bias else None

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: int = 0) -> None:
        if loaded.shape[0] != self.full_sizes[shard]:
            raise ValueError(f"weight shard {shard} has {loaded.shape[0]} rows, expected {self.full_sizes[shard]}")
        start, size = self.shards[shard]
        param.data[self.offsets[shard]:self.offsets[shard] + size].copy_(loaded[start:start + size])
        if param is self.weight:
            self._quant_parts = qgemm.collect(self._quant_parts, loaded, slice(start, start + size), slice(None),
                                              self.offsets[shard])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


class RowParallelLinear(_Linear):
    """y = x W^T with W's columns (inputs) split across ranks: each rank's partial product is
    summed by one all-reduce; the bias is added once, after it."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.tp = get_tp_group()
        self.full_input_size = input_size
        self.input_size = input_size // self.tp.world_size
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: int = 0) -> None:
        if param is self.bias:
            param.data.copy_(loaded)
            return
        if loaded.shape != (param.shape[0], self.full_input_size):
            raise ValueError(f"weight has shape {tuple(loaded.shape)}, "
                             f"expected {(param.shape[0], self.full_input_size)}")
        start = self.tp.rank * self.input_size
        param.data.copy_(loaded[:, start:start + self.input_size])
        self._quant_parts = qgemm.collect(self._quant_parts, loaded, slice(None),
                                          slice(start, start + self.input_size), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self._matmul(x, None))
        return y + self.bias if self.bias is not None else y
