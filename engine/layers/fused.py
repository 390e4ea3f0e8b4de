"""The decoder layer's elementwise steps as single C passes on CPU fp32 tensors (csrc/fused.c),
with the torch expressions they replace as the fallback (other devices and dtypes, strided
inputs, no C compiler)."""
from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.native import load

_CSRC = Path(__file__).parent / "csrc"
# no FMA contraction: products and sums round as torch's separate ops round them
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-lm"]
_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


@cache
def _lib() -> ctypes.CDLL | None:
    return load(_CSRC / "fused.c", _FLAGS, {
        "add_rms_norm_f32": ([_ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32], None),
        "rotary_f32": ([_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr], None),
        "argmax_rows_f32": ([_ptr, _i64, _i64, _ptr], None)})


@cache
def _activation_lib() -> ctypes.CDLL | None:  # libmvec: glibc's vector expf
    return load(_CSRC / "activation.c", [*_FLAGS, "-lmvec"], {"silu_mul_f32": ([_ptr, _i64, _i64, _ptr], None)})


def _native(x: torch.Tensor) -> bool:
    return x.dtype is torch.float32 and x.is_cpu and _lib() is not None


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rms_norm(x + residual) * weight, x + residual), or (rms_norm(x) * weight, None) without a
    residual. With a residual, both buffers are reused: the sum lands in residual, the normed
    output in x (neither is read again by the caller)."""
    if (_native(x) and weight.dtype is torch.float32 and x.is_contiguous()
            and (residual is None or residual.is_contiguous())):
        cols = weight.numel()
        out = x if residual is not None else torch.empty_like(x)
        _lib().add_rms_norm_f32(x.data_ptr(), residual.data_ptr() if residual is not None else None,
                                weight.data_ptr(), out.data_ptr(), x.numel() // cols, cols, eps)
        return out, residual
    if residual is not None:
        x = residual = x + residual
    if x.dtype is torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps), residual
    # half precision: normalize in fp32, round to x's dtype, then scale by the weight in that dtype, as
    # transformers and vLLM do (F.rms_norm scales in fp32 and rounds once: a different bf16/fp16 result)
    return F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype) * weight, residual


def rotary_inplace(x: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor
                   ) -> bool:
    """The rotary embedding in place on x: [num_tokens, heads, head_dim] (a view into q|k|v is fine)
    with cos/sin table rows [max_positions, head_dim] picked by positions; False where only the
    torch path can (see rotary.rotate_)."""
    if not (_native(x) and cos_table.dtype is torch.float32 and x.stride(2) == 1 and x.stride(1) == x.shape[2]
            and positions.dtype == torch.int64 and positions.is_contiguous() and cos_table.is_contiguous()
            and sin_table.is_contiguous()):
        return False
    _lib().rotary_f32(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], x.shape[2], positions.data_ptr(),
                      cos_table.data_ptr(), sin_table.data_ptr())
    return True


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate|up [rows, 2 * inter] -> a new [rows, inter]."""
    if _native(gate_up) and gate_up.dim() == 2 and gate_up.is_contiguous() and _activation_lib() is not None:
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, inter, dtype=torch.float32)
        _activation_lib().silu_mul_f32(gate_up.data_ptr(), rows, inter, out.data_ptr())
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)  # silu's fresh output takes the product


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [rows, cols] -> int64 [rows]: torch's argmax(dim=-1) (first of equals; NaN the largest),
    in one multithreaded pass (torch's CPU argmax over a 32 x 49152 batch of logits: ~2.4 ms)."""
    if _native(x) and x.dim() == 2 and x.is_contiguous() and x.shape[1] > 0:
        out = torch.empty(x.shape[0], dtype=torch.int64)
        _lib().argmax_rows_f32(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
        return out
    return x.argmax(dim=-1)
