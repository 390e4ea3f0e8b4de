"""The Llama family as one flat-batch decoder: Llama 2/3, Mistral, Qwen2 (qkv bias),
Qwen3 (q/k norm), and their MoE forms (Mixtral, Qwen3-MoE). Inputs are the step's
tokens from every sequence concatenated: [num_tokens], no batch dimension, no padding."""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from engine.attention.backend import AttentionBackend
from engine.attention.metadata import get_attention_metadata
from engine.config import ModelConfig
from engine.distributed import get_tp_group, kv_head_range
from engine.kv_connector import KVSaver
from engine.layers.linear import ColumnParallelLinear, RowParallelLinear
from engine.layers.mlp import GatedMLP
from engine.layers.moe import MoE
from engine.layers.norm import RMSNorm
from engine.layers.rotary import Rope, RotaryEmbedding, rotate_
from engine.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from engine.models.native_decoder import NativeDecoder
from engine.options import EngineOptions


class Attention(nn.Module):
    """Heads split across the ranks: q|k|v column-parallel (each rank its own heads, KV heads
    replicated when the ranks outnumber them), attention local, o_proj row-parallel."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        tp = get_tp_group()
        self.head_dim = d = cfg.head_dim
        self.num_heads = cfg.num_attention_heads // tp.world_size  # this rank's
        kv_start, kv_end = kv_head_range(cfg.num_key_value_heads, tp.rank, tp.world_size)
        self.num_kv_heads = kv_end - kv_start
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        self.scale = d ** -0.5
        kv_full = cfg.num_key_value_heads * d
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size, [cfg.num_attention_heads * d, kv_full, kv_full], bias=cfg.attention_bias,
            shards=[(tp.rank * self.q_size, self.q_size), (kv_start * d, self.kv_size), (kv_start * d, self.kv_size)])
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        # set by the ModelRunner once the paged cache exists
        self.backend: AttentionBackend | None = None
        self.k_cache = self.v_cache = torch.empty(0)
        self.kv_saver: KVSaver | None = None  # set on the prefill side of a disaggregated pair
        self.layer_idx = 0

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        h, kvh = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(-1, h + 2 * kvh, self.head_dim)  # [num_tokens, q|k|v heads, head_dim]
        if self.q_norm is None:
            rotate_(qkv[:, :h + kvh], rope)  # q and k heads rotate in one pass, in place
            q, k = qkv[:, :h], qkv[:, h:h + kvh]
        else:
            q, k = self.q_norm(qkv[:, :h]), self.k_norm(qkv[:, h:h + kvh])  # fresh tensors: rotate in place
            rotate_(q, rope)
            rotate_(k, rope)
        v = qkv[:, h + kvh:]
        o = self.backend.forward(q, k, v, self.k_cache, self.v_cache, get_attention_metadata(), self.scale)
        if self.kv_saver is not None:  # this layer's K/V leave now, while later layers compute
            self.kv_saver.save_kv_layer(self.layer_idx, k, v)
        return self.o_proj(o.view(-1, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: EngineOptions) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (MoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                        cfg.norm_topk_prob, parallel.expert_parallel)
                    if cfg.num_experts else GatedMLP(cfg.hidden_size, cfg.intermediate_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rope)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: EngineOptions) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, parallel) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)

    # set by the ModelRunner where every part of a layer runs in C; native_decoder.unsupported takes
    # this slot as the sign of a Llama-family stack (it cannot import this module: we import it)
    native: NativeDecoder | None = None

    def runs_native(self) -> bool:
        """Whether a step runs as the one C call: not where a KV saver must be handed each layer's K/V
        while the step runs (one that takes them after it does not stop it)."""
        native, saver = self.native, self.layers[0].self_attn.kv_saver
        return native is not None and (saver is None or saver.after_step)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.runs_native():
            return self.native(x, positions, get_attention_metadata())  # the same kernels, one call
        rope = self.rotary(positions)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope)
        x, _ = self.norm(x, residual)
        return x  # [num_tokens, hidden]


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: EngineOptions | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, parallel or EngineOptions())
        self.lm_head = (self.model.embed_tokens if cfg.tie_word_embeddings
                        else ParallelLMHead(cfg.vocab_size, cfg.hidden_size))
        self.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Only the rows that sample: [num_sampled, hidden] -> [num_sampled, vocab] (on every rank)."""
        return self.lm_head.logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take Hugging Face names; merge q/k/v, gate/up and per-expert weights as they come."""
        params = dict(self.named_parameters())
        missing = set(params)
        for name, tensor in weights:
            if "rotary_emb" in name or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            target, loader = _route(name, self)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {self.config.architecture}")
            loader(params[target], tensor)
            missing.discard(target)
        if missing:
            raise ValueError(f"checkpoint is missing weights for {sorted(missing)[:4]} "
                             f"({len(missing)} in all); is the file complete?")


_MERGED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_EXPERT = re.compile(r"(.*)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")
_EXPERT_HALF = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1}


def _route(name: str, model: LlamaForCausalLM):
    """Map a Hugging Face tensor name to (our parameter name, a function that loads this rank's part)."""
    if m := _EXPERT.fullmatch(name):
        prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
        moe = model.get_submodule(f"{prefix}.mlp")
        half = _EXPERT_HALF.get(kind)
        return f"{prefix}.mlp.{'w2' if half is None else 'w13'}", lambda p, t: moe.load_expert(p, t, e, half)
    name = name.replace("block_sparse_moe.gate.", "mlp.gate.")
    module_name, _, leaf = name.rpartition(".")
    parent, _, proj = module_name.rpartition(".")
    if proj in _MERGED:
        merged, shard = _MERGED[proj]
        layer = model.get_submodule(f"{parent}.{merged}")
        return f"{parent}.{merged}.{leaf}", lambda p, t: layer.load_shard(p, t, shard)
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None  # not ours: load_weights names it
    if hasattr(module, "load_shard"):  # tensor-parallel layers keep their rank's slice
        return name, module.load_shard
    return name, _copy_checked(name)


def _copy_checked(name: str):
    def load(p: torch.Tensor, t: torch.Tensor) -> None:
        if p.shape != t.shape:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        p.data.copy_(t)
    return load
