"""Profiles on paper: a pool's step model (planner/cost.py) for a GPU this machine does not have, from the
roofline of its spec sheet, for the simulator and `pdserve plan` to size clusters past this machine.

A step of T tokens (S of them sampled, P prefill attention pairs, K decode context tokens) on a replica of
TP degree t takes

    overhead_s + allreduce(T)                                 launches, scheduling; 2 all-reduces a layer
    + max(2 N T / (c F t),  W / (m B t))                     the layers' matmuls: compute- or bandwidth-bound
    + max(2 V H S / (c F t), V H b / (m B t))                the LM head, for the sampled rows
    + 4 L (heads / t) d P / (a F)                            prefill attention (flash attention's FLOPs)
    + 2 L max(kv / t, 1) d b K / (m B)                       decode attention: the KV it reads

F and B are the spec sheet's dense FLOP/s and memory bandwidth, N the layers' parameters (W their bytes, b
bytes a value), V H the LM head. The efficiencies c (matmuls), m (memory), a (attention) and overhead_s
are not the spec sheet's: they are fitted (calibrate()) to a published measurement, TensorRT-LLM's
throughput and first-token latency tables (v0.6.1 / v0.5 docs, docs/source/performance.md): LLaMA 7B on one
A100 in fp16. The same fractions then stand for any GPU of the table (a fraction of its own peaks), which the
table's H100 FP8 rows check (benchmarks/paper_plan.py prints both).

Standard library only."""
from __future__ import annotations

import math
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace

from planner.cost import PoolProfile, Profile, StepModel, pool_key

KNOTS = tuple(2 ** i for i in range(15))  # 1 .. 16384 tokens a step
SAMPLE_KNOTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class GPU:
    name: str
    flops: dict[str, float]  # dense tensor FLOP/s by dtype (spec sheet, no sparsity)
    bandwidth: float  # HBM bytes/s
    memory: float  # bytes
    link: float  # NVLink bytes/s per direction (all-reduce within a node)


# NVIDIA's spec sheets (SXM parts): A100 80GB (312 TFLOP/s fp16/bf16, 2.039 TB/s, NVLink 600 GB/s), H100
# (989 TFLOP/s bf16, 1979 fp8, 3.35 TB/s, 80 GB, NVLink 900 GB/s), H200 (the H100's compute, 4.8 TB/s, 141 GB)
A100 = GPU("A100-SXM-80GB", {"float16": 312e12, "bfloat16": 312e12}, 2.039e12, 80e9, 300e9)
H100 = GPU("H100-SXM", {"bfloat16": 989e12, "float16": 989e12, "fp8": 1979e12}, 3.35e12, 80e9, 450e9)
H200 = GPU("H200-SXM", {"bfloat16": 989e12, "float16": 989e12, "fp8": 1979e12}, 4.8e12, 141e9, 450e9)
GPUS = {g.name.split("-")[0].lower(): g for g in (A100, H100, H200)}

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        """The decoder layers' matmul weights (attention projections and the gated MLP)."""
        d = self.head_dim
        attn = self.hidden * (self.heads * d) * 2 + self.hidden * (self.kv_heads * d) * 2
        return self.layers * (attn + 3 * self.hidden * self.intermediate)

    def kv_bytes_per_token(self, dtype: str) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * BYTES[dtype]

    def weight_bytes(self, dtype: str) -> float:
        return (self.layer_params + 2 * self.vocab * self.hidden) * BYTES[dtype]  # embedding and LM head


# config.json of each checkpoint on Hugging Face
LLAMA2_7B = Model("LLaMA-2-7B", 4096, 32, 32, 32, 11008, 32000)
LLAMA2_70B = Model("LLaMA-2-70B", 8192, 80, 64, 8, 28672, 32000)
LLAMA31_8B = Model("Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256)
LLAMA31_70B = Model("Llama-3.1-70B", 8192, 80, 64, 8, 28672, 128256)
MODELS = {m.name.lower(): m for m in (LLAMA2_7B, LLAMA2_70B, LLAMA31_8B, LLAMA31_70B)}


@dataclass(frozen=True)
class Efficiency:
    matmul: float = 0.7  # c: the layers' and the LM head's matmuls, of the dense FLOP/s peak (16-bit weights)
    matmul_fp8: float = 0.5  # c for fp8 weights
    memory: float = 0.8  # m: of the HBM bandwidth
    attention: float = 0.4  # a: prefill attention, of the dense FLOP/s peak
    layer_overhead_s: float = 50e-6  # a step's fixed cost per layer (kernel launches and the gaps between)
    allreduce_latency_s: float = 10e-6  # per all-reduce


@dataclass(frozen=True)
class Roofline:
    model: Model
    gpu: GPU
    tp: int = 1
    dtype: str = "bfloat16"
    eff: Efficiency = Efficiency()

    @property
    def peak(self) -> float:
        return self.gpu.flops[self.dtype]

    @property
    def matmul(self) -> float:
        return self.eff.matmul_fp8 if self.dtype == "fp8" else self.eff.matmul

    def dense(self, tokens: float) -> float:
        m, e, t = self.model, self.eff, self.tp
        compute = 2 * m.layer_params * tokens / (self.matmul * self.peak * t)
        memory = m.layer_params * BYTES[self.dtype] / (e.memory * self.gpu.bandwidth * t)
        allreduce = 0.0
        if t > 1:  # ring all-reduce of the activations, twice a layer
            size = tokens * m.hidden * BYTES["bfloat16"]
            allreduce = 2 * m.layers * (e.allreduce_latency_s * 2 * (t - 1) + 2 * (t - 1) / t * size / self.gpu.link)
        return m.layers * e.layer_overhead_s + allreduce + max(compute, memory)

    def sample(self, rows: float) -> float:
        m, e, t = self.model, self.eff, self.tp
        return max(2 * m.vocab * m.hidden * rows / (self.matmul * self.peak * t),
                   m.vocab * m.hidden * BYTES[self.dtype] / (e.memory * self.gpu.bandwidth * t))

    @property
    def prefill_pair_s(self) -> float:
        m = self.model
        return 4 * m.layers * (m.heads / self.tp) * m.head_dim / (self.eff.attention * self.peak)

    @property
    def decode_context_s(self) -> float:
        m = self.model
        per_rank = 2 * m.layers * max(m.kv_heads / self.tp, 1) * m.head_dim * BYTES[self.dtype]
        return per_rank / (self.eff.memory * self.gpu.bandwidth)

    def step_model(self) -> StepModel:
        return StepModel(KNOTS, tuple(self.dense(k) for k in KNOTS), SAMPLE_KNOTS,
                         tuple(self.sample(k) for k in SAMPLE_KNOTS), self.prefill_pair_s, self.decode_context_s)

    def kv_tokens(self, memory_fraction: float = 0.9) -> int:
        """Tokens of KV a replica holds: its GPUs' memory (this fraction of it) less the weights."""
        free = memory_fraction * self.gpu.memory * self.tp - self.model.weight_bytes(self.dtype)
        per_rank_heads = max(self.model.kv_heads / self.tp, 1) * self.tp  # heads stored across the ranks
        per_token = 2 * self.model.layers * per_rank_heads * self.model.head_dim * BYTES[self.dtype]
        return max(int(free / per_token), 0)

    # the whole-request figures the published tables report (a static batch: all prompts at once, then decoding)
    def batch_throughput(self, batch: int, prompt: int, output: int) -> float:
        """Output tokens/s of `batch` requests of `prompt` tokens prefilled in one step, then decoded together."""
        s = self.step_model()
        total = s.seconds(batch * prompt, batch, batch * prompt * (prompt + 1) / 2, 0)
        steps = output - 1  # each decodes one token for every request, reading prompt + j tokens of context
        context = batch * (steps * prompt + steps * (steps + 1) / 2)
        total += steps * (s.dense(batch) + s.sample(batch)) + s.decode_context_s * context
        return batch * output / total

    def first_token_s(self, prompt: int) -> float:
        return self.step_model().seconds(prompt, 1, prompt * (prompt + 1) / 2, 0)


def pool_profile(roofline: Roofline) -> PoolProfile:
    options = {"tensor_parallel_size": roofline.tp, "num_threads": 1, "dtype": roofline.dtype, "device": "cuda"}
    return PoolProfile(options, roofline.step_model(), fit={"source": "roofline", "gpu": roofline.gpu.name,
                                                            "model": roofline.model.name,
                                                            "kv_tokens": roofline.kv_tokens()})


def paper_profile(model: Model, gpu: GPU, tps: Seq[int] = (1, 2, 4, 8), dtype: str = "bfloat16",
                  eff: Efficiency = Efficiency()) -> Profile:
    """A profile for every TP degree whose weights fit (with room for KV), as `pdserve profile` writes one."""
    pools = {}
    for tp in tps:
        r = Roofline(model, gpu, tp, dtype, eff)
        if r.kv_tokens() >= 16384:
            pools[pool_key(pool_profile(r).options)] = pool_profile(r)
    host = {"gpu": gpu.name, "peak_flops": gpu.flops[dtype], "peak_bandwidth": gpu.bandwidth, "source": "roofline",
            "efficiency": eff.__dict__}
    return Profile(model.name, host, pools)


def gpu_config(config, profile: Profile):
    """`config` (a pdserve ClusterConfig) with GPU pools as a paper profile's step models assume: its dtype on
    cuda, one GPU and one CPU thread a rank, an 8192-token prefill chunk and a 2048-token step budget on the
    decode replicas (vLLM's default for chunked prefill), 256 sequences a step, and a router that admits what
    thousands of GPUs' worth of requests need. num_kv_blocks follows each layout's TP (planner.plan.kv_sized)."""
    dtype = next(iter(profile.pools.values())).options["dtype"]
    changes = {"router.max_ongoing_requests": 1 << 16, "router.max_queued_requests": 1 << 20}
    for role, budget in (("prefill", 8192), ("decode", 2048)):
        changes |= {f"{role}.device": "cuda", f"{role}.num_gpus": 1.0, f"{role}.num_cpus": 1.0,
                    f"{role}.num_threads": 1, f"{role}.dtype": dtype, f"{role}.max_num_batched_tokens": budget,
                    f"{role}.max_num_seqs": 256}
    return config.replace(**changes)


# TensorRT-LLM's published figures (docs/source/performance.md, v0.6.1 throughput / v0.5 first token):
# (model, gpu, dtype, tp, batch, input, output, output tok/s per GPU) and (model, gpu, dtype, tp, input, ms)
THROUGHPUT = [
    (LLAMA2_7B, A100, "float16", 1, 384, 128, 128, 5586), (LLAMA2_7B, A100, "float16", 1, 60, 128, 2048, 1928),
    (LLAMA2_7B, A100, "float16", 1, 52, 2048, 128, 591),
    (LLAMA2_7B, H100, "fp8", 1, 768, 128, 128, 19694), (LLAMA2_7B, H100, "fp8", 1, 112, 128, 2048, 6818),
    (LLAMA2_7B, H100, "fp8", 1, 80, 2048, 128, 2244), (LLAMA2_7B, H100, "fp8", 1, 48, 2048, 2048, 2740),
    (LLAMA2_70B, H100, "fp8", 2, 1024, 128, 128, 2657), (LLAMA2_70B, H100, "fp8", 4, 480, 128, 2048, 1486),
    (LLAMA2_70B, H100, "fp8", 2, 96, 2048, 128, 306), (LLAMA2_70B, H100, "fp8", 2, 64, 2048, 2048, 547),
]
FIRST_TOKEN = [
    (LLAMA2_7B, A100, "float16", 1, 128, 16), (LLAMA2_7B, A100, "float16", 1, 2048, 133),
    (LLAMA2_7B, H100, "fp8", 1, 128, 7), (LLAMA2_7B, H100, "fp8", 1, 2048, 36),
    (LLAMA2_70B, H100, "fp8", 4, 128, 26), (LLAMA2_70B, H100, "fp8", 4, 2048, 109),
    (LLAMA2_70B, A100, "float16", 4, 128, 47), (LLAMA2_70B, A100, "float16", 4, 2048, 377),
]
LIMITS = {"matmul": 0.9, "matmul_fp8": 0.9, "memory": 0.9, "attention": 0.7}  # what the hardware allows


def predictions(eff: Efficiency, rows: Seq[int] | None = None) -> list[dict]:
    """Each published row (THROUGHPUT then FIRST_TOKEN; those numbered in `rows`, or all) beside what the roofline
    with `eff` predicts."""
    out = []
    for i, (model, gpu, dtype, tp, batch, prompt, output, published) in enumerate(THROUGHPUT):
        if rows is None or i in rows:
            got = Roofline(model, gpu, tp, dtype, eff).batch_throughput(batch, prompt, output) / tp
            out.append({"what": f"{model.name} {gpu.name} {dtype} TP{tp} batch {batch} {prompt}/{output} tok/s/GPU",
                        "published": published, "predicted": got})
    for i, (model, gpu, dtype, tp, prompt, ms) in enumerate(FIRST_TOKEN, len(THROUGHPUT)):
        if rows is None or i in rows:
            got = 1e3 * Roofline(model, gpu, tp, dtype, eff).first_token_s(prompt)
            out.append({"what": f"{model.name} {gpu.name} {dtype} TP{tp} first token, {prompt} in (ms)",
                        "published": ms, "predicted": got})
    return out


ROWS = len(THROUGHPUT) + len(FIRST_TOKEN)


def calibrate(rows: Seq[int] | None = None) -> Efficiency:
    """The efficiencies that best fit the published rows (`rows`, or all): least squares of the log ratios, by
    moves of each parameter up or down (by 30%, then 10%, then 3%) until none helps, within LIMITS."""
    rows = range(ROWS) if rows is None else rows

    def err(eff: Efficiency) -> float:
        return sum(math.log(r["predicted"] / r["published"]) ** 2 for r in predictions(eff, rows))

    best, best_err = Efficiency(), err(Efficiency())
    for step in (0.3, 0.1, 0.03):
        improved = True
        while improved:
            improved = False
            for name in ("matmul", "matmul_fp8", "memory", "attention", "layer_overhead_s", "allreduce_latency_s"):
                for factor in (1 - step, 1 + step):
                    trial = replace(best, **{name: getattr(best, name) * factor})
                    if getattr(trial, name) > LIMITS.get(name, math.inf):
                        continue
                    if (e := err(trial)) < best_err:
                        best, best_err, improved = trial, e, True
    return best


def held_out_errors() -> list[float]:
    """Each row predicted by a fit to all the others: |predicted / published - 1|."""
    return [abs(predictions(calibrate([j for j in range(ROWS) if j != i]), [i])[0]["predicted"]
                / predictions(Efficiency(), [i])[0]["published"] - 1) for i in range(ROWS)]
