"""The decoder stack of a dense Llama-family model as one C call per step (csrc/decoder.c), in
place of ~10 Python-level calls a layer, where every part of the layer already runs in C: CPU
fp32, block-quantized weights in AMX tiles (qgemm) or, without the tile unit, as int8 blocks on
AVX-512 (bqgemm), the paged CPU attention kernels, one rank, no q/k norm, no MoE; every step.
The C calls the same kernels in the same order, so the hidden states are bit for bit those of
LlamaModel's Python forward, which stays the definition of the model and the path for
everything else (other devices, dtypes, layouts, tensor parallelism, a KV saver).

A step's intermediates live in one workspace per model, grown to the largest step so far and
reused: the hidden states returned are a view into it, valid until the next step."""
from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
from torch import nn

from engine.attention import paged_cpu
from engine.attention.metadata import AttentionMetadata
from engine.config import ModelConfig
from engine.layers import bqgemm, fused, qgemm
from engine.native import build

_SOURCE = Path(__file__).parent / "csrc" / "decoder.c"
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
_i64, _f32, _p = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class _Weight(ctypes.Structure):
    _fields_ = [("tiles", _p), ("dm", _p), ("q8", _p), ("dm16", _p), ("bias", _p), ("groups", _i64),
                ("in_features", _i64), ("out_features", _i64), ("has_m", _i64)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _p), ("post_norm", _p), ("qkv", _Weight), ("o", _Weight), ("gate_up", _Weight),
                ("down", _Weight), ("k_cache", _p), ("v_cache", _p)]


class _Model(ctypes.Structure):
    _fields_ = [("num_layers", _i64), ("hidden", _i64), ("heads", _i64), ("kv_heads", _i64), ("head_dim", _i64),
                ("inter", _i64), ("block_size", _i64), ("eps", _f32), ("scale", _f32), ("layers", _p),
                ("final_norm", _p), ("cos_table", _p), ("sin_table", _p), ("qgemm", _p), ("bqgemm", _p),
                ("bq_rows", _i64), ("decode", _p), ("prefill", _p), ("norm", _p), ("rotary", _p), ("silu", _p)]


class _Step(ctypes.Structure):
    _fields_ = [("tokens", _i64), ("num_decodes", _i64), ("num_seqs", _i64), ("max_blocks", _i64),
                ("max_decode_len", _i64), ("positions", _p), ("slots", _p), ("block_tables", _p), ("seq_lens", _p),
                ("query_start", _p), ("residual", _p), ("x", _p), ("qkv", _p), ("attn", _p), ("gate_up", _p),
                ("act", _p), ("ap", _p), ("xs", _p), ("xp", _p)]


@cache
def _lib() -> ctypes.CDLL | None:
    lib = build(_SOURCE, _FLAGS)
    if lib is not None:
        lib.decoder_forward_f32.argtypes, lib.decoder_forward_f32.restype = [_p, _p], ctypes.c_int
    return lib


def _address(fn) -> int:
    return ctypes.cast(fn, _p).value


def _weight(linear, bias: torch.Tensor | None) -> _Weight:
    amx: qgemm.Packed | None = linear.weight_amx
    b: bqgemm.Packed8 | None = linear.weight_bq
    some = amx if amx is not None else b
    groups, k = (amx.bq.shape[0], amx.bq.shape[1] * qgemm.BLOCK) if amx is not None else b.q8.shape[:2]
    tiles, dm = (amx.bq, amx.dm) if amx is not None else (None, None)
    q8, dm16 = (b.q8, b.dm) if b is not None else (None, None)
    return _Weight(*(t.data_ptr() if t is not None else None for t in (tiles, dm, q8, dm16, bias)), groups, k,
                   some.out_features, int(some.has_m))


def unsupported(model: nn.Module, tp_size: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the C stack cannot run this model (None: it can). The model is read as handed in, not
    imported: models/llama.py imports this module, so the dependency runs one way."""
    inner = getattr(model, "model", None)
    if not hasattr(inner, "native"):  # the slot a decoder stack offers for a NativeDecoder: LlamaModel's
        return "not a Llama-family model"
    cfg = model.config
    model_reasons = [
        (device.type != "cpu" or dtype is not torch.float32, "not CPU fp32"),
        (tp_size != 1, "tensor-parallel"),
        (bool(cfg.num_experts), "MoE"),
        (cfg.qk_norm, "q/k norm"),
        (cfg.head_dim % 16 != 0, f"head_dim {cfg.head_dim} is not a multiple of 16"),
    ]
    if why := next((why for bad, why in model_reasons if bad), None):
        return why
    tiles = qgemm.supported()
    if not tiles and not bqgemm.supported():
        return f"{qgemm.unsupported()}; {bqgemm.unsupported()}"
    if any(lib() is None for lib in (_lib, fused._lib, fused._activation_lib, paged_cpu._kernel,
                                     paged_cpu._prefill_kernel)):
        return "a C kernel did not build"
    for layer in inner.layers:
        attn = layer.self_attn
        linears = (attn.qkv_proj, attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
        if any((m.weight_amx if tiles else m.weight_bq) is None for m in linears):
            return "a weight is not in AMX tiles" if tiles else "a weight is not in int8 blocks"
        if not isinstance(attn.backend, paged_cpu.PagedCPUAttention):
            return "not the paged CPU attention"
    return None


class NativeDecoder:
    """LlamaModel's layers and final norm as one C call: embedded tokens in, hidden states out."""

    def __init__(self, inner: nn.Module, cfg: ModelConfig) -> None:
        self.inner = inner  # the LlamaModel: its weights, caches and buffers stay alive with it
        layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            layers.append(_Layer(
                layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                _weight(attn.qkv_proj, attn.qkv_proj.bias), _weight(attn.o_proj, None),
                _weight(mlp.gate_up_proj, None), _weight(mlp.down_proj, None),
                attn.k_cache.data_ptr(), attn.v_cache.data_ptr()))
        self._layers = (_Layer * len(layers))(*layers)
        rotary, attn0 = inner.rotary, inner.layers[0].self_attn
        self.hidden, self.heads, self.kv_heads, self.head_dim = (
            cfg.hidden_size, attn0.num_heads, attn0.num_kv_heads, cfg.head_dim)
        self.inter = cfg.intermediate_size
        self.max_k = max(self.hidden, self.heads * self.head_dim, self.inter)
        first = inner.layers[0].self_attn.qkv_proj
        self.tiles, self.int8 = first.weight_amx is not None, first.weight_bq is not None
        # the steps that take the int8 blocks (gemm.matmul's choice): a few tokens beside tiles, else all
        self.bq_rows = bqgemm.rows_taken(self.tiles) if self.int8 else 0
        self._model = _Model(
            len(layers), self.hidden, self.heads, self.kv_heads, self.head_dim, self.inter, attn0.k_cache.shape[1],
            cfg.rms_norm_eps, attn0.scale, ctypes.addressof(self._layers), inner.norm.weight.data_ptr(),
            rotary.cos.data_ptr(), rotary.sin.data_ptr(), _address(qgemm._lib().qgemm_f32) if self.tiles else None,
            _address(bqgemm._lib().bqgemm_f32) if self.int8 else None, self.bq_rows,
            _address(paged_cpu._kernel().paged_decode_attention_f32),
            _address(paged_cpu._prefill_kernel().paged_prefill_attention_f32), _address(fused._lib().add_rms_norm_f32),
            _address(fused._lib().rotary_f32), _address(fused._activation_lib().silu_mul_f32))
        self._step = _Step()
        self._rows = 0  # tokens the workspace holds
        self._fn = _lib().decoder_forward_f32

    def describe(self) -> str:
        """What the stack runs over, in words a benchmark prints."""
        if self.tiles:
            few = f" (int8 blocks for steps of up to {self.bq_rows} tokens)" if self.int8 else ""
            return f"the C decoder stack over AMX tiles{few}"
        return "the C decoder stack over int8 blocks"

    def _grow(self, tokens: int) -> None:
        rows = -(-tokens // qgemm.GROUP) * qgemm.GROUP
        widths = (self.hidden, (self.heads + 2 * self.kv_heads) * self.head_dim, self.heads * self.head_dim,
                  2 * self.inter, self.inter)  # x, qkv, attn, gate_up, act
        self._ws = torch.empty(rows * sum(widths))
        n_xs, n_xp = bqgemm.scratch_numel(rows, self.max_k) if self.int8 else (0, 0)
        self._ap = torch.empty(rows * self.max_k * 3, dtype=torch.bfloat16) if self.tiles else None
        self._xs = torch.empty(max(n_xs, rows * (self.max_k // qgemm.BLOCK) if self.tiles else 0))  # block sums
        self._xp = torch.empty(n_xp) if self.int8 else None
        x, qkv, attn, gate_up, act = self._ws.split([rows * w for w in widths])
        self._x = x.view(rows, self.hidden)
        s = self._step
        s.x, s.qkv, s.attn, s.gate_up, s.act = (t.data_ptr() for t in (x, qkv, attn, gate_up, act))
        s.ap, s.xs, s.xp = (t.data_ptr() if t is not None else None for t in (self._ap, self._xs, self._xp))
        self._rows = rows

    def __call__(self, embedded: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """embedded [tokens, hidden] fp32, contiguous (overwritten: it becomes the residual
        stream) -> the final norm's output [tokens, hidden], valid until the next call."""
        tokens = embedded.shape[0]
        if tokens > self._rows:
            self._grow(tokens)
        s = self._step
        s.tokens, s.num_decodes, s.num_seqs = tokens, meta.num_decodes, len(meta.seq_lens_list)
        s.max_blocks, s.max_decode_len = meta.block_tables.shape[1], meta.max_decode_len
        s.positions, s.slots = positions.data_ptr(), meta.slot_mapping.data_ptr()
        s.block_tables, s.seq_lens = meta.block_tables.data_ptr(), meta.seq_lens.data_ptr()
        s.query_start, s.residual = meta.query_start_loc.data_ptr(), embedded.data_ptr()
        failed = self._fn(ctypes.addressof(self._model), ctypes.addressof(s))
        if failed:
            raise (RuntimeError if failed == 3 else MemoryError)(
                {1: "paged decode attention could not allocate its score buffer",
                 2: "paged prefill attention could not allocate its scratch",
                 3: "paged prefill attention cannot take this shape",
                 4: "bqgemm could not allocate its scratch for the widened weights"}[failed])
        return self._x[:tokens]
