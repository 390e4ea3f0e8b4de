"""x @ W^T with AVX-512 FMAs for weights that came block-quantized (GGUF Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0), on CPUs without the AMX tile unit (qgemm.py is the AMX path): the integers kept as int8
(1.125 bytes a weight with its fp16 scales, against fp32's 4), widened to fp32 in registers; exact to
fp32 up to the order of its roundings (how: csrc/bqgemm.c). Without tiles it takes every step and the
layer keeps no fp32 copy: a batch-1 decode reads its weights once a token, so the bytes a weight takes
are its speed; a batch of decodes is compute-bound, where it keeps pace with fp32 panels; a prefill
chunk (PANEL_MIN rows and more) dequantizes a 64-column panel at a time into L2 and runs a plain
fp32 matmul over it, at MKL's speed or better. Up to PANEL_MIN - 1 rows a row's result is bit for bit
the same whatever else is in its step."""
from __future__ import annotations

import ctypes
import threading
from functools import cache
from pathlib import Path
from typing import NamedTuple

import torch

from engine import native
from engine.layers.qgemm import BLOCK, GROUP, BlockQuant, by_group, packed_numel

_SOURCE = Path(__file__).parent / "csrc" / "bqgemm.c"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
# Without tiles it takes every step (the most rows a step can have); from PANEL_MIN rows (past any decode
# step) the dequantized-panel path, as csrc/bqgemm.c's PANEL_MIN.
ALL_ROWS = 2**62
PANEL_MIN = 129
# Where the CPU has AMX tiles too, the steps the int8 blocks still take: a step of a few rows streams the
# weights once, and int8 is half the tiles' bytes (3072 x 576 from memory: 41 against 69 us at one row, 61
# against 73 at four, 76 against 74 at six, 97 against 82 at eight; the LM head 1.2 against 1.5 ms at six)
FEW_ROWS = 6


class Packed8(NamedTuple):
    q8: torch.Tensor  # int8 [groups, in, 16]: per column group, each k's 16 integers
    dm: torch.Tensor  # fp16 [groups, blocks, 2, 16]: d then m (GGUF stores them in fp16: exact)
    out_features: int
    has_m: bool = True  # False where every m is 0 (Q4_0, Q5_0, Q8_0): the kernel skips that term


@cache
def _lib() -> ctypes.CDLL | None:
    lib = native.load(_SOURCE, _FLAGS, {
        "bqgemm_supported": ([], ctypes.c_int),
        "bqgemm_f32": ([_ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, ctypes.c_int, _ptr, _ptr, _i64, _i64, _ptr, _ptr],
                       ctypes.c_int)})
    return lib if lib is not None and lib.bqgemm_supported() else None


def supported() -> bool:
    return _lib() is not None


@cache
def unsupported() -> str | None:
    """Why the AVX-512 block-quant kernel is not used here (None: it is), in words a benchmark prints."""
    if _lib() is not None:
        return None
    if native.load(_SOURCE, _FLAGS, {}) is None:
        return "the block-quant kernel did not build (no C compiler, or it failed)"
    if native.portable():
        return f"{native.PORTABLE_ENV} is set (AVX-512 off)"
    return "no AVX-512 on this CPU"


def packable(quant: BlockQuant | None) -> bool:
    """Whether the weight can take the kernel: 32-weight blocks whose scales are fp16 values (as every GGUF
    block format stores them; others keep the fp32 layouts)."""
    return (quant is not None and quant.q.shape[1] % BLOCK == 0 and supported()
            and all(torch.equal(t.half().float(), t) for t in (quant.d, quant.m)))


def pack(quant: BlockQuant, q8_out: torch.Tensor | None = None, dm_out: torch.Tensor | None = None) -> Packed8:
    """The weight's integers by column group (int8, as stored) and its scales per block (qgemm's
    layout, in fp16), written into the given flat buffers (sized by qgemm.packed_numel) where given.
    ValueError where a scale is not an fp16 value (every GGUF block format stores them as fp16)."""
    q, dm, groups, _ = by_group(quant)
    dm16 = (dm_out if dm_out is not None else torch.empty(dm.numel(), dtype=torch.float16)).view(dm.shape)
    dm16.copy_(dm)
    if not torch.equal(dm16.float(), dm):
        raise ValueError("a block scale is not an fp16 value: int8 blocks keep their scales in fp16")
    cols = quant.q.shape[1]
    q8 = (q8_out if q8_out is not None else torch.empty(packed_numel(quant)[0], dtype=torch.int8))
    q8 = q8.view(groups, cols, GROUP)
    q8.copy_(q.view(groups, GROUP, cols).permute(0, 2, 1))
    return Packed8(q8, dm16, quant.q.shape[0], bool(quant.m.any()))


def rows_taken(beside_tiles: bool) -> int:
    """The most rows a step may have to take the int8 blocks: FEW_ROWS beside AMX tiles, else every step
    (ALL_ROWS; gemm.matmul, the C decoder stack and the step's byte count all ask here)."""
    return FEW_ROWS if beside_tiles else ALL_ROWS


def usable(x: torch.Tensor, packed: Packed8 | None, max_rows: int = ALL_ROWS) -> bool:
    return (packed is not None and x.dim() == 2 and x.shape[0] <= max_rows and x.dtype is torch.float32
            and x.is_cpu and x.shape[1] == packed.q8.shape[1])


_scratch = threading.local()  # per thread: two engines in one process may step at once


def _buffer(name: str, numel: int) -> torch.Tensor:
    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel)
        setattr(_scratch, name, buf)
    return buf


def scratch_numel(rows: int, k: int) -> tuple[int, int]:
    """Floats of the kernel's two scratch buffers for a call of `rows` rows over k inputs: the
    block sums, and x packed per tile (used from 9 rows up to PANEL_MIN - 1; the panel path uses neither)."""
    rows = min(rows, PANEL_MIN - 1)
    return rows * (k // BLOCK), rows * k


def linear(x: torch.Tensor, packed: Packed8, bias: torch.Tensor | None) -> torch.Tensor:
    """x [rows, in] @ W^T (+ bias) -> a new [rows, out_features]."""
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, k = x.shape
    n = packed.out_features
    y = torch.empty(rows, n)
    n_xs, n_xp = scratch_numel(rows, k)
    xs, xp = _buffer("sums", n_xs), _buffer("packed", n_xp)
    if _lib().bqgemm_f32(x.data_ptr(), x.stride(0), rows, k, packed.q8.data_ptr(), packed.dm.data_ptr(),
                         packed.q8.shape[0], packed.has_m, bias.data_ptr() if bias is not None else None,
                         y.data_ptr(), n, n, xs.data_ptr(), xp.data_ptr()):
        raise MemoryError("bqgemm: a thread could not allocate its scratch for the widened weights")
    return y
