"""Runs one step: builds the flat batch and its attention metadata, runs the model,
computes logits only where a sequence samples, and samples."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from engine import hugepages
from engine.attention.backend import get_backend
from engine.attention.metadata import AttentionMetadata, attention_metadata
from engine.config import EngineConfig
from engine.distributed import get_tp_group, kv_head_range
from engine.kv_connector import KVSaver, StepLayout
from engine.layers import bqgemm, gemm, qgemm
from engine.metrics import ModelCost
from engine.models import build_model, native_decoder
from engine.sampler import Sampler
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence, TokenLogprobs

# (shape, dtype, device) -> the KV pool tensor; lets a connector put the pool in shared memory
KVAllocator = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


@dataclass
class StepPlan:
    """One step's flat batch as plain lists: what rank 0 sends the other ranks of its replica."""
    input_ids: list[int]
    positions: list[int]
    query_start_loc: list[int]  # cu_seqlens of the new tokens
    seq_lens: list[int]  # tokens in context after this step, per sequence
    block_tables: list[list[int]]  # padded to the longest
    num_decodes: int  # the first num_decodes sequences have one new token
    sample_idx: list[int]  # rows whose logits are sampled


class ModelRunner:
    def __init__(self, config: EngineConfig, weights: Iterable[tuple[str, torch.Tensor]],
                 device: torch.device | str = "cpu", kv_allocator: KVAllocator | None = None) -> None:
        self.config = config
        self.device = torch.device(device)
        if config.options.num_threads:
            torch.set_num_threads(config.options.num_threads)
        cfg = config.model_config
        prev_dtype = torch.get_default_dtype()
        torch.set_default_dtype(config.dtype)
        try:
            with self.device:
                self.model = build_model(cfg, config.options)
        finally:
            torch.set_default_dtype(prev_dtype)
        self.model.load_weights(weights)
        for module in self.model.modules():
            if hasattr(module, "post_load"):
                module.post_load()
        gemm.pack_model(self.model, config.options.weight_panels)
        self.model.eval()
        self.tp = get_tp_group()
        kv_start, kv_end = kv_head_range(cfg.num_key_value_heads, self.tp.rank, self.tp.world_size)
        self.num_kv_heads = kv_end - kv_start  # this rank's
        self.block_size = config.options.block_size
        self.num_blocks = config.options.num_kv_blocks or self._blocks_that_fit(config.options.kv_cache_bytes)
        shape = (cfg.num_hidden_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, cfg.head_dim)
        # [layers, k|v, num_blocks, block_size, kv_heads, head_dim], zero-filled now so no page is
        # first touched on the hot path; a connector may place it in memory another process maps
        self.kv_cache = (kv_allocator or _zeros)(shape, config.dtype, self.device)
        backend = get_backend(config.options.attention_backend, self.device)
        for i, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            attn.backend, attn.k_cache, attn.v_cache = backend, self.kv_cache[i, 0], self.kv_cache[i, 1]
        # why the decoder stack runs in Python (None: it runs as one C call, models/native_decoder.py)
        self.native_unsupported = (native_decoder.unsupported(self.model, self.tp.world_size, config.dtype, self.device)
                                   if config.options.native_decoder else "native_decoder=False")
        if self.native_unsupported is None:
            self.model.model.native = native_decoder.NativeDecoder(self.model.model, cfg)
        # what the decoder stack runs as, in words a benchmark and `pdserve serve` print
        self.stack_path = (self.model.model.native.describe() if self.native_unsupported is None
                           else f"the Python forward ({self.native_unsupported})")
        self.sampler = Sampler()
        self.kv_saver: KVSaver | None = None
        self.cost = _as_stored(ModelCost.of(cfg, config.dtype.itemsize), self.model, config.dtype.itemsize,
                               self.tp.world_size)
        self._last_plan: StepPlan | None = None

    def set_kv_saver(self, saver: KVSaver | None) -> None:
        self.kv_saver = saver
        if saver is not None:
            saver.bind_local(self.kv_cache)
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.kv_saver, layer.self_attn.layer_idx = saver, i

    def _blocks_that_fit(self, num_bytes: int) -> int:
        cfg = self.config.model_config
        per_block = (2 * cfg.num_hidden_layers * self.block_size * self.num_kv_heads * cfg.head_dim
                     * self.config.dtype.itemsize)
        if num_bytes < per_block:
            raise ValueError(f"kv_cache_bytes={num_bytes} holds no KV block ({per_block} bytes each); raise it")
        return num_bytes // per_block

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput
                ) -> tuple[list[Sequence], list[int], list[TokenLogprobs | None]]:
        """Run one step (rank 0 of the replica); return the sequences that sampled, their tokens
        and logprobs."""
        plan, sampling, layout = self._plan(sched)
        saver = self.kv_saver
        if self.tp.world_size > 1:
            if saver is not None and not hasattr(saver, "plan"):
                raise NotImplementedError(f"{type(saver).__name__} cannot send from a tensor-parallel replica")
            sends = saver.plan(layout) if saver is not None else None
            try:
                self.tp.broadcast_object((plan, sends))
                logits = self._forward(plan, sends)
            except RuntimeError as e:  # a peer died or hung: the replica cannot step again
                raise RuntimeError(f"tensor-parallel replica lost a rank during a step; restart it ({e})") from e
        else:
            if saver is not None:
                saver.begin_step(layout)
            logits = self._forward(plan)
        if not sampling:
            return [], [], []
        tokens, logprobs = self.sampler(logits, sampling)
        return sampling, tokens, logprobs

    @torch.inference_mode()
    def follow(self) -> None:
        """Ranks 1..n-1: run the steps rank 0 plans, until it sends None."""
        while (step := self.tp.broadcast_object()) is not None:
            self._forward(*step)

    def stop_followers(self) -> None:
        if self.tp.world_size > 1:
            self.tp.broadcast_object(None)

    def _forward(self, plan: StepPlan, sends=None) -> torch.Tensor | None:
        """The model on the step's flat batch, the KV saver's sends (planned by rank 0) on the way;
        logits of the sampled rows (every rank takes part in the vocab gather; rank 0 samples)."""
        input_ids, positions, meta, sample_idx = self._tensors(plan)
        if sends is not None and self.kv_saver is not None:
            self.kv_saver.begin_planned(sends)
        with attention_metadata(meta):
            hidden = self.model(input_ids, positions)
        if self.kv_saver is not None:
            if self.native_unsupported is None and self.model.model.runs_native():
                self.kv_saver.save_from_cache(meta.slot_mapping)  # the C stack wrote it there: now it leaves
            self.kv_saver.end_step()
        return self.model.compute_logits(hidden[sample_idx]) if plan.sample_idx else None

    def _plan(self, sched: SchedulerOutput) -> tuple[StepPlan, list[Sequence], StepLayout]:
        # decodes (one query token) first, so attention can batch them in one call
        pairs = sorted(zip(sched.seqs, sched.num_scheduled_tokens), key=lambda p: p[1] != 1)
        num_decodes = sum(1 for _, n in pairs if n == 1)
        input_ids: list[int] = []
        positions: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_idx: list[int] = []
        sampling: list[Sequence] = []
        for seq, n in pairs:
            start = seq.num_computed_tokens
            input_ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            if start + n == seq.num_tokens:
                sample_idx.append(qsl[-1] - 1)
                sampling.append(seq)
        max_blocks = max(len(s.block_table) for s, _ in pairs)
        tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s, _ in pairs]
        layout = StepLayout([s for s, _ in pairs], [n for _, n in pairs], qsl)
        self._last_plan = plan = StepPlan(input_ids, positions, qsl, seq_lens, tables, num_decodes, sample_idx)
        return plan, sampling, layout

    @property
    def step_cost(self) -> tuple[int, float, float]:
        """(tokens, FLOPs, bytes read) of the last step; computed only when asked (for metrics)."""
        p = self._last_plan
        return self.cost.step(p.query_start_loc, p.seq_lens, len(p.sample_idx)) if p else (0, 0.0, 0.0)

    def _tensors(self, plan: StepPlan):
        dev = self.device
        bs = self.block_size
        qsl, seq_lens = plan.query_start_loc, plan.seq_lens
        positions_t = torch.tensor(plan.positions, dtype=torch.int64, device=dev)
        block_tables = torch.tensor(plan.block_tables, dtype=torch.int32, device=dev)
        qsl_t = torch.tensor(qsl, dtype=torch.int32, device=dev)
        seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
        seq_of_token = torch.repeat_interleave(torch.arange(len(seq_lens), device=dev), qsl_t.diff())
        slot_mapping = block_tables[seq_of_token, positions_t // bs].long() * bs + positions_t % bs
        meta = AttentionMetadata(
            num_decodes=plan.num_decodes, slot_mapping=slot_mapping, query_start_loc=qsl_t, seq_lens=seq_lens_t,
            block_tables=block_tables, max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
            max_seq_len=max(seq_lens), query_start_loc_list=qsl, seq_lens_list=seq_lens,
            max_decode_len=max(seq_lens[:plan.num_decodes], default=0))
        input_ids_t = torch.tensor(plan.input_ids, dtype=torch.int64, device=dev)
        return input_ids_t, positions_t, meta, torch.tensor(plan.sample_idx, device=dev)


def _as_stored(cost: ModelCost, model: torch.nn.Module, itemsize: int, tp_size: int) -> ModelCost:
    """The model's cost with the weights a step reads counted as the engine stores them, so bandwidth
    figures (MBU) stay within the machine's: a weight in AMX tiles streams its bf16 integers and fp32
    scales (~2.25 bytes a weight, not fp32's 4); one in int8 blocks 1.125 bytes (fp16 scales), for the steps they take
    (up to bqgemm.FEW_ROWS tokens beside tiles, every step without; longer ones read the tiles, or
    MKL's fp32 copy). Ranks hold equal slices."""
    tiled = int8 = 0  # bytes stored minus the dtype's bytes of the same weights
    for m in model.modules():
        tiles, blocks = getattr(m, "weight_amx", None), getattr(m, "weight_bq", None)
        if tiles is not None:
            logical = tiles.out_features * tiles.bq.shape[1] * qgemm.BLOCK * itemsize
            tiled += tiles.bq.numel() * tiles.bq.element_size() + tiles.dm.numel() * tiles.dm.element_size() - logical
        if blocks is not None:
            logical = blocks.out_features * blocks.q8.shape[1] * itemsize
            int8 += blocks.q8.numel() + blocks.dm.numel() * blocks.dm.element_size() - logical
    if not (tiled or int8):
        return cost
    return dataclasses.replace(
        cost, weight_bytes=cost.weight_bytes + tiled * tp_size,
        small_step_tokens=bqgemm.rows_taken(bool(tiled)) if int8 else 0,
        small_step_weight_bytes=cost.weight_bytes + int8 * tp_size if int8 else 0.0)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":  # decodes read much of it each step: on huge pages
        return hugepages.empty(math.prod(shape), dtype).view(shape).zero_()  # every page touched now
    return torch.zeros(shape, dtype=dtype, device=device)
