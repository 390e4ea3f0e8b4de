"""x @ W^T on the CPU's AMX tile unit for weights that came block-quantized (GGUF Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0: W = d * q + m per 32 weights along a row, q a small integer), exact to fp32
(how: csrc/qgemm.c). The loader hands such weights over as fp32 tensors that also carry their
integers (`block_quant`); layers collect their shard's rows of it while loading, and
gemm.pack_model lays it out for the tile unit in place of the fp32 panels (half their size).
Used for every row count: a single decode row streams 2 bytes a weight instead of MKL's 4
(SmolLM2's matmul chain at one row 17 against MKL's 25 ms), so the layer drops its fp32 copy."""
from __future__ import annotations

import ctypes
import os
import threading
from functools import cache
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from engine import native
from engine.native import load

_SOURCE = Path(__file__).parent / "csrc" / "qgemm.c"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
BLOCK = 32  # weights per quant block along k, as in qgemm.c
GROUP = 16  # output columns per B tile
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class BlockQuant(NamedTuple):
    """A weight [rows, cols] as W[r, c] = d[r, c // 32] * q[r, c] + m[r, c // 32]."""
    q: torch.Tensor  # int8 [rows, cols], |q| <= 128
    d: torch.Tensor  # fp32 [rows, cols // 32]
    m: torch.Tensor  # fp32 [rows, cols // 32] (zeros for formats without an offset)

    def take(self, rows: slice | torch.Tensor, cols: slice = slice(None)) -> BlockQuant | None:
        """The sub-weight [rows, cols]; None when cols cuts through a block."""
        start, stop, step = cols.indices(self.q.shape[1])
        if step != 1 or start % BLOCK or (stop - start) % BLOCK:
            return None
        b = slice(start // BLOCK, stop // BLOCK)
        return BlockQuant(self.q[rows, start:stop], self.d[rows, b], self.m[rows, b])

    def dequantize(self) -> torch.Tensor:
        return (self.d.repeat_interleave(BLOCK, 1) * self.q.float()) + self.m.repeat_interleave(BLOCK, 1)


class Packed(NamedTuple):
    bq: torch.Tensor  # bf16 [groups, blocks, 16 k-pairs, 16 columns, 2]
    dm: torch.Tensor  # fp32 [groups, blocks, 2, 16]: d then m
    out_features: int
    has_m: bool = True  # False where every m is 0 (Q4_0, Q5_0, Q8_0): the kernel skips that term


# Set to 1 to take the portable path on an AMX host (fp32 panels and the Python decoder stack, as on a CPU
# without AMX): how one machine measures and tests both paths.
NO_AMX_ENV = "PDSERVE_NO_AMX"


def _no_amx() -> bool:
    return os.environ.get(NO_AMX_ENV, "0") not in ("", "0")


@cache
def _lib() -> ctypes.CDLL | None:
    if _no_amx():
        return None
    args = [_ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, ctypes.c_int, _ptr, _ptr, _i64, _i64, _ptr, _ptr]
    lib = load(_SOURCE, _FLAGS, {"qgemm_supported": ([], ctypes.c_int), "qgemm_f32": (args, None)})
    return lib if lib is not None and lib.qgemm_supported() else None


def supported() -> bool:
    """Compiled, and the CPU has AMX-BF16 and AVX512-BF16 and the kernel grants the tile state."""
    return _lib() is not None


@cache
def unsupported() -> str | None:
    """Why the AMX kernel is not used here (None: it is), in words a benchmark prints."""
    if _lib() is not None:
        return None
    if _no_amx():
        return f"{NO_AMX_ENV} is set"
    if native.portable():
        return f"{native.PORTABLE_ENV} is set (AVX-512 off, so no AMX either)"
    if load(_SOURCE, _FLAGS, {}) is None:
        return "the AMX kernel did not build (no C compiler, or it failed)"
    return "no AMX-BF16 on this CPU (or the kernel refused the tile state)"


# Collecting a layer's shard of the quantized form while its weight loads.


def collect(parts: list | None, loaded: torch.Tensor, rows: slice, cols: slice, dest_row: int) -> list | None:
    """Add rows [rows, cols] of the loaded tensor's block_quant, to sit at dest_row of the layer's
    weight, to parts; None (for good) once any shard comes without one or cuts a block."""
    quant = getattr(loaded, "block_quant", None)
    part = quant.take(rows, cols) if quant is not None and parts is not None else None
    if part is None:
        return None
    parts.append((dest_row, part))
    return parts


def assemble(parts: list | None, rows: int) -> BlockQuant | None:
    """The collected parts as one BlockQuant of `rows` rows (rows no part covers are zero: the
    padded rows of a vocabulary slice); None when parts overlap or differ in width."""
    if not parts:
        return None
    cols = parts[0][1].q.shape[1]
    q = torch.zeros(rows, cols, dtype=torch.int8)
    d, m = torch.zeros(rows, cols // BLOCK), torch.zeros(rows, cols // BLOCK)
    seen = torch.zeros(rows, dtype=torch.bool)
    for row, part in parts:
        n = part.q.shape[0]
        if part.q.shape[1] != cols or row + n > rows or seen[row:row + n].any():
            return None
        q[row:row + n], d[row:row + n], m[row:row + n] = part
        seen[row:row + n] = True
    return BlockQuant(q, d, m)


# The tile layout and the matmul.


def packable(quant: BlockQuant | None) -> bool:
    return quant is not None and quant.q.shape[1] % BLOCK == 0 and supported()


def packed_numel(quant: BlockQuant) -> tuple[int, int]:
    """(elements of the integers, bf16 here and int8 in bqgemm's layout; fp32 elements of dm)."""
    rows, cols = quant.q.shape
    groups = -(-rows // GROUP)
    return groups * GROUP * cols, groups * GROUP * (cols // BLOCK) * 2


def by_group(quant: BlockQuant, dm_out: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """What both block-quant kernels (this one and bqgemm's) lay out alike: the integers padded to
    whole groups of GROUP output rows, and the scales as dm [groups, blocks, 2 (d then m), GROUP],
    written into dm_out where given. Returns (padded q, dm, groups, blocks)."""
    rows, cols = quant.q.shape
    groups, blocks = -(-rows // GROUP), cols // BLOCK
    pad = groups * GROUP - rows
    q, d, m = (F.pad(t, (0, 0, 0, pad)) for t in quant) if pad else quant
    dm = (dm_out if dm_out is not None else torch.empty(packed_numel(quant)[1])).view(groups, blocks, 2, GROUP)
    dm.copy_(torch.stack([d.view(groups, GROUP, blocks), m.view(groups, GROUP, blocks)], 2).permute(0, 3, 2, 1))
    return q, dm, groups, blocks


def pack(quant: BlockQuant, bq_out: torch.Tensor | None = None, dm_out: torch.Tensor | None = None) -> Packed:
    """The weight's integers as B tiles (bf16, exact) and its scales per block, written into the
    given flat buffers where given."""
    q, dm, groups, blocks = by_group(quant, dm_out)
    bq = (bq_out if bq_out is not None else torch.empty(packed_numel(quant)[0], dtype=torch.bfloat16))
    bq = bq.view(groups, blocks, BLOCK // 2, GROUP, 2)
    bq.copy_(q.view(groups, GROUP, blocks, BLOCK // 2, 2).permute(0, 2, 3, 1, 4))
    return Packed(bq, dm, quant.q.shape[0], bool(quant.m.any()))


def usable(x: torch.Tensor, packed: Packed | None) -> bool:
    return (packed is not None and x.dim() == 2 and x.dtype is torch.float32 and x.is_cpu
            and x.shape[1] == packed.bq.shape[1] * BLOCK)


_scratch = threading.local()  # per thread: two engines in one process may step at once


def _buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-call scratch, grown to the largest call so far and reused."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf


def linear(x: torch.Tensor, packed: Packed, bias: torch.Tensor | None, out_features: int | None = None
           ) -> torch.Tensor:
    """x [rows, in] @ W^T (+ bias) -> a new [rows, out_features] (default: all of the packed
    weight's rows)."""
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, k = x.shape
    n = packed.out_features if out_features is None else out_features
    padded = -(-rows // GROUP) * GROUP
    ap, xs = _buffer(padded * k * 3, torch.bfloat16), _buffer(padded * (k // BLOCK), torch.float32)
    y = torch.empty(rows, n, dtype=torch.float32)
    _lib().qgemm_f32(x.data_ptr(), x.stride(0), rows, k, packed.bq.data_ptr(), packed.dm.data_ptr(),
                     packed.bq.shape[0], packed.has_m, bias.data_ptr() if bias is not None else None, y.data_ptr(),
                     n, n, ap.data_ptr(), xs.data_ptr())
    return y
