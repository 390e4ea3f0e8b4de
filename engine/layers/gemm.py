"""x @ W^T for decode-sized batches on CPU, over weights laid out in 48-column panels once at load
(csrc/gemm.c). MKL, given the plain [in, out] weight, spends as long re-laying out cold weights
as multiplying them when a step has few rows; chunked prefill steps have thousands of rows, where
MKL's own kernels win, so layers keep both layouts and pick by row count (the panels cost a
second copy of the linear weights in memory)."""
from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine import hugepages
from engine.layers import qgemm
from engine.native import load

_SOURCE = Path(__file__).parent / "csrc" / "gemm.c"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
PANEL = 48  # columns per panel, as in gemm.c
# Row counts this kernel takes; outside them MKL on the [in, out] weight is as fast or faster
# (measured on a 2-core Xeon: one row is a GEMV MKL streams at full bandwidth; from ~128 rows up
# MKL's packing is paid back)
MIN_ROWS, MAX_ROWS = 2, 128
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


@cache
def _lib() -> ctypes.CDLL | None:
    lib = load(_SOURCE, _FLAGS, {"gemm_packed_supported": ([], ctypes.c_int),
                                 "gemm_packed_f32": ([_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64], None)})
    return lib if lib is not None and lib.gemm_packed_supported() else None


def pack(weight_t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """[in, out] fp32 CPU weight -> panels [ceil(out/48), in, 48] (zero past out), written into
    `out` (numel = panel_numel(weight_t)) where given; None where the kernel cannot run (no
    AVX-512 or no compiler, other devices or dtypes)."""
    if not packable(weight_t):
        return None
    k, n = weight_t.shape
    panels = -(-n // PANEL)
    padded = F.pad(weight_t, (0, panels * PANEL - n)) if n % PANEL else weight_t
    dest = (out if out is not None else torch.empty(panel_numel(weight_t))).view(panels, k, PANEL)
    dest.copy_(padded.reshape(k, panels, PANEL).permute(1, 0, 2))
    return dest


def packable(weight_t: torch.Tensor) -> bool:
    return weight_t.dtype is torch.float32 and weight_t.is_cpu and weight_t.dim() == 2 and _lib() is not None


def panel_numel(weight_t: torch.Tensor) -> int:
    return -(-weight_t.shape[1] // PANEL) * PANEL * weight_t.shape[0]


def pack_model(model: nn.Module, enabled: bool = True) -> None:
    """Give every layer that has a weight_panels slot (see panel_source) its layout for steps of
    several rows, each kind in one buffer on huge pages (together they are the bulk of what a
    decode step reads): AMX tiles for a weight that came block-quantized (qgemm), where the CPU
    has them (they then take every step, and a linear layer drops its fp32 copy), else fp32
    panels. The integers collected while loading are dropped either way."""
    slots = [m for m in model.modules() if hasattr(m, "weight_panels")]
    if enabled:
        tiled = [m for m in slots if qgemm.packable(m.block_quant)]
        sizes = [qgemm.packed_numel(m.block_quant) for m in tiled]
        bq = hugepages.empty(sum(s[0] for s in sizes), torch.bfloat16)
        dm = hugepages.empty(sum(s[1] for s in sizes))
        at_bq = at_dm = 0
        for layer, (n_bq, n_dm) in zip(tiled, sizes):
            layer.weight_amx = qgemm.pack(layer.block_quant, bq[at_bq:at_bq + n_bq], dm[at_dm:at_dm + n_dm])
            at_bq, at_dm = at_bq + n_bq, at_dm + n_dm
            if hasattr(layer, "drop_dense"):  # (an embedding keeps its table for the lookups)
                layer.drop_dense()
        paneled = [m for m in slots if m.weight_amx is None and packable(m.panel_source())]
        sizes = [panel_numel(m.panel_source()) for m in paneled]
        arena = hugepages.empty(sum(sizes))
        offset = 0
        for layer, size in zip(paneled, sizes):
            layer.weight_panels = pack(layer.panel_source(), arena[offset:offset + size])
            offset += size
    for layer in slots:
        layer.block_quant = None


def usable(x: torch.Tensor, panels: torch.Tensor | None) -> bool:
    return (panels is not None and x.dim() == 2 and MIN_ROWS <= x.shape[0] <= MAX_ROWS and x.dtype is torch.float32
            and x.is_cpu and x.stride(1) == 1 and x.shape[1] == panels.shape[1])


def linear(x: torch.Tensor, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [rows, in] (rows contiguous) @ W^T (+ bias) -> a new [rows, out_features]."""
    y = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    _lib().gemm_packed_f32(x.data_ptr(), x.stride(0), panels.data_ptr(),
                           bias.data_ptr() if bias is not None else None, y.data_ptr(), out_features,
                           x.shape[0], out_features, x.shape[1])
    return y
