"""x @ W^T on CPU over the weight layouts made once at load, and the choice among them (matmul).
Here: 48-column fp32 panels for decode-sized batches (csrc/gemm.c). MKL, given the plain
[in, out] weight, spends as long re-laying out cold weights as multiplying them when a step has
few rows; chunked prefill steps have thousands of rows, where MKL's own kernels win, so layers
keep both layouts and pick by row count (the panels cost a second copy of the linear weights in
memory). A block-quantized checkpoint's weights take the AMX tiles instead (qgemm.py)."""
from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine import hugepages
from engine.layers import bqgemm, qgemm
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
    decode step reads): for a weight that came block-quantized, AMX tiles where the CPU has them,
    else its integers as int8 on AVX-512 (bqgemm); either then takes every step and a linear layer
    drops its fp32 copy. fp32 panels for the rest. The integers collected while loading are dropped after."""
    slots = [m for m in model.modules() if hasattr(m, "weight_panels")]
    if enabled:
        on_cpu = [m for m in slots if m.panel_source().is_cpu]  # (a GPU engine's layers keep their weights)
        tiled = [m for m in on_cpu if qgemm.packable(m.block_quant)]
        for layer, bq, dm in _quant_buffers(tiled, torch.bfloat16):
            layer.weight_amx = qgemm.pack(layer.block_quant, bq, dm)
        # int8 blocks on AVX-512 FMAs: beside the tiles, for steps of up to bqgemm.FEW_ROWS rows; without
        # tiles, every step (no panels for these)
        blocked = [m for m in on_cpu if bqgemm.packable(m.block_quant)]
        for layer, q8, dm in _quant_buffers(blocked, torch.int8, torch.float16):
            layer.weight_bq = bqgemm.pack(layer.block_quant, q8, dm)
        def quantized(m: nn.Module) -> bool:  # tiles or int8 blocks: either takes every fp32 step
            return m.weight_amx is not None or getattr(m, "weight_bq", None) is not None

        for layer in on_cpu:  # so the fp32 copy goes (an embedding keeps its table for the lookups)
            if quantized(layer) and hasattr(layer, "drop_dense"):
                layer.drop_dense()
        paneled = [m for m in slots if not quantized(m) and packable(m.panel_source())]
        sizes = [panel_numel(m.panel_source()) for m in paneled]
        for layer, panels in zip(paneled, hugepages.empty(sum(sizes)).split(sizes)):
            layer.weight_panels = pack(layer.panel_source(), panels)
    for layer in slots:
        layer.block_quant = None


def _quant_buffers(layers: list[nn.Module], dtype: torch.dtype, scale_dtype: torch.dtype = torch.float32):
    """(layer, its integers' buffer, its scales' buffer) for each layer's block_quant: the integers
    of all of them in one buffer of `dtype` on huge pages, the scales in another."""
    n_q, n_dm = zip(*(qgemm.packed_numel(m.block_quant) for m in layers)) if layers else ((), ())
    return zip(layers, hugepages.empty(sum(n_q), dtype).split(n_q),
               hugepages.empty(sum(n_dm), scale_dtype).split(n_dm))


def matmul_path(model: nn.Module) -> str:
    """Which layouts the model's matmuls run on and why, in words a benchmark and `pdserve serve` print."""
    slots = [m for m in model.modules() if hasattr(m, "weight_panels")]
    tiles = sum(m.weight_amx is not None for m in slots)
    blocks = sum(getattr(m, "weight_bq", None) is not None for m in slots)
    panels = sum(m.weight_panels is not None for m in slots)
    if tiles:
        few = (f", int8 blocks on AVX-512 FMAs for steps of up to {bqgemm.FEW_ROWS} rows ({blocks} layers)"
               if blocks else "")
        return f"AMX tiles over the checkpoint's integers ({tiles} of {len(slots)} layers){few}"
    parts = []
    if blocks:
        parts.append(f"int8 blocks on AVX-512 FMAs for every step ({blocks} of {len(slots)} layers; "
                     f"no tiles: {qgemm.unsupported()})")
    if panels:
        parts.append(f"fp32 panels ({panels} layers)")
    if blocks < len(slots):
        parts.append("MKL on fp32 weights" + (" beyond" if panels else ""))
    return ", ".join(parts)


def matmul(x: torch.Tensor, amx: qgemm.Packed | None, panels: torch.Tensor | None, weight_t: torch.Tensor | None,
           bias: torch.Tensor | None, bq: bqgemm.Packed8 | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) by the first of W's layouts that takes x: the int8 blocks (a step of up to
    bqgemm.FEW_ROWS rows beside tiles, every step without), the AMX tiles, the fp32 panels, else
    MKL on the [in, out] weight_t (None only where tiles or int8 blocks take every fp32 step)."""
    if bqgemm.usable(x, bq, bqgemm.rows_taken(amx is not None)):
        return bqgemm.linear(x, bq, bias)
    if qgemm.usable(x, amx):
        return qgemm.linear(x, amx, bias)
    if usable(x, panels):
        return linear(x, panels, weight_t.shape[1], bias)
    if weight_t is None:
        raise ValueError(f"no layout of this weight takes a {x.dtype} {tuple(x.shape)} input on {x.device}: its fp32 "
                         "copy went when its AMX tiles or int8 blocks were made, which take 2-D fp32 CPU inputs only")
    return torch.addmm(bias, x, weight_t) if bias is not None else torch.mm(x, weight_t)


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
