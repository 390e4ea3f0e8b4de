"""EngineOptions: every option a user gives an engine, declared once.

`LLM(...)` and `LLMEngine.from_model(...)` fill it from keyword arguments, `EngineConfig` resolves it
against the model, a pool's `PoolConfig` (pdserve/config.py) extends it, and `pdserve serve` derives
its per-pool flags from its fields. Standard library only: the router and the CLI import it without torch."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# dtype names a user may write -> torch's name for them (engine/config.py turns them into torch dtypes)
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
DEVICES = ("cpu", "cuda")
SCHEDULING_POLICIES = ("fcfs", "lof", "spf")  # engine/scheduler.py: the order waiting requests start in


@dataclass(frozen=True)
class EngineOptions:
    """One engine's options, grouped by who reads them: the scheduler, the KV cache, the ranks, the runner.
    The attention backend's name is checked by its registry (engine/attention), which needs torch."""
    # scheduler (engine/scheduler.py reads these straight off the options)
    max_num_batched_tokens: int = 2048  # the token budget of one step, prefill and decode together
    max_num_seqs: int = 256  # most sequences in the running batch
    max_prefill_chunk: int | None = None  # most tokens one sequence gets in one step; None: the whole budget
    # a step with a prefill chunk should take at most this long (e.g. the TPOT target): prefill tokens per step are
    # cut to what fits beside the decodes, at the prefill rate the engine measures (scheduler.StepCosts); None:
    # only the budget bounds them
    step_time_target_s: float | None = None
    # the order waiting requests start in (engine/scheduler.py, POLICIES): "fcfs" (arrival), "lof" (longest output
    # first: the larger max_tokens first; a burst through a disaggregated pair drains sooner) or "spf" (shortest
    # prompt first: the mean TTFT of a burst falls). Only arrivals within max_queue_wait_s of each other are
    # reordered: a request never waits longer than that behind later ones
    scheduling_policy: str = "fcfs"
    max_queue_wait_s: float = 10.0
    # paged KV cache
    block_size: int = 16  # tokens per KV block, a power of two
    num_kv_blocks: int | None = None  # KV blocks per rank; None: as many as kv_cache_bytes holds
    kv_cache_bytes: int = 1 << 30  # the KV cache's size per rank when num_kv_blocks is None
    enable_prefix_caching: bool = True  # requests share the KV of a common prefix's full blocks (block_manager.py)
    # ranks (the models read expert_parallel off the options)
    tensor_parallel_size: int = 1  # ranks per replica; > 1 needs a rank launcher (replica.ranks.start_followers)
    expert_parallel: bool = False  # MoE: experts partitioned over the ranks (else each expert is TP-sharded)
    # model runner
    dtype: str = "float32"  # weights, activations and KV cache: a key of DTYPES
    device: str = "cpu"  # "cpu" or "cuda"
    attention_backend: str = "auto"  # "auto", "torch", "cpu" or "flash" (engine/attention's registry)
    num_threads: int | None = None  # torch intra-op threads per rank; None leaves torch's default
    max_model_len: int = 0  # longest sequence, prompt and output; 0: the model's max_position_embeddings
    # CPU fp32: the linear weights laid out once for the C matmuls: AMX tiles of a block-quantized checkpoint's
    # integers (every step; they replace the fp32 copy, at half its size); without AMX, its integers as int8
    # on AVX-512 (steps of up to 128 rows; a quarter of the fp32 copy's size, which stays for MKL); else a
    # second copy in 48-column fp32 panels (steps of 2-128 rows; the weights' size again)
    weight_panels: bool = True
    # CPU fp32 with block-quantized weights in AMX tiles (or int8 blocks on AVX-512 without them, steps of up to
    # 128 tokens): the decoder stack as one C call per step, bit for bit the Python forward
    # (models/native_decoder.py); False keeps the Python forward
    native_decoder: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "tensor_parallel_size", "kv_cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("max_prefill_chunk", "num_kv_blocks", "num_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1 or None")
        if self.step_time_target_s is not None and not self.step_time_target_s > 0:
            raise ValueError(f"step_time_target_s={self.step_time_target_s} must be positive or None")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy={self.scheduling_policy!r}; choose one of "
                             f"{', '.join(SCHEDULING_POLICIES)}")
        if not self.max_queue_wait_s >= 0 or self.max_queue_wait_s == float("inf"):
            raise ValueError(f"max_queue_wait_s={self.max_queue_wait_s} must be a finite number of seconds >= 0")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} must be a power of two, e.g. 16")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; use one of {sorted(DTYPES)}")
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r}; choose 'cpu' or 'cuda'")
        if self.max_model_len < 0:
            raise ValueError(f"max_model_len={self.max_model_len} must be >= 0 (0: the model's limit)")

    @property
    def chunk_size(self) -> int:
        """The most prompt tokens one sequence is given in one step."""
        return self.max_prefill_chunk or self.max_num_batched_tokens

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineOptions:
        """The options from keyword arguments; an unknown one raises ValueError naming the valid ones."""
        names = [f.name for f in fields(cls)]
        if unknown := sorted(set(kwargs) - set(names)):
            raise ValueError(f"unknown engine option{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(names))}")
        return cls(**kwargs)
