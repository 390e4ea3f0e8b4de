"""Useful work of a dense Llama-family model, counted from its config: parameters, prefill FLOPs,
and the decode roofline against the machine's matmul peak and memory read bandwidth."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine import LLM

def model_counts(llm: LLM) -> dict[str, int]:
    """Parameter counts from the model's config (a dense Llama-family model): the useful work,
    whatever layout the engine keeps its weights in."""
    cfg = llm.engine.config.model_config
    h, d, heads, kv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    per_layer = h * (heads + 2 * kv) * d + heads * d * h + 3 * h * cfg.intermediate_size  # qkv, o, gate|up, down
    linear = cfg.num_hidden_layers * per_layer
    embedding = cfg.vocab_size * h
    total = (linear + cfg.num_hidden_layers * 2 * h + h + embedding  # + norms (+ an untied lm_head)
             + (0 if cfg.tie_word_embeddings else embedding))
    return {"params": total, "weight_bytes": total * llm.engine.config.dtype.itemsize,
            "linear_params": linear,  # the decoder layers' matmul weights (embedding and lm_head excluded)
            "lm_head_params": embedding, "layers": cfg.num_hidden_layers,
            "heads": heads, "kv_heads": kv, "head_dim": d, "hidden": h, "vocab": cfg.vocab_size}


FLOPS_FORMULA = ("prefill FLOPs = 2*linear_params*tokens (q,k,v,o,gate,up,down of every layer) "
                 "+ 4*layers*heads*head_dim*n*(n+1)/2 per prompt of n tokens (QK^T and PV, causal: query i "
                 "sees i keys) + 2*vocab*hidden per sampled row (lm_head on the last token only); "
                 "norms, rotary, softmax and activations not counted. The same useful-work count is used "
                 "for both engines.")
ROOFLINE_FORMULA = ("decode step of B sequences: bytes = weight_bytes (fp32 parameters, tied embedding "
                    "counted once); FLOPs = 2*(linear_params + lm_head_params)*B + 4*layers*heads*head_dim*ctx*B "
                    "with ctx = prompt_len + new_tokens/2 the average context; roofline tok/s = "
                    "B / max(bytes / mem_read_bw, FLOPs / matmul_peak). The _with_kv variant adds the KV-cache "
                    "bytes read per step (B*ctx*layers*2*kv_heads*head_dim*4). The \"stored\" single-decode roofline "
                    "puts the weights' bytes as the engine keeps them (its ModelCost: AMX tiles, int8 blocks "
                    "or fp32) in place of fp32's.")


def prefill_flops(c: dict[str, int], num: int, n: int) -> float:
    """FLOPS_FORMULA for `num` prompts of n tokens each, given model_counts' c."""
    attn = 4 * c["layers"] * c["heads"] * c["head_dim"] * n * (n + 1) / 2
    return num * (2 * c["linear_params"] * n + attn + 2 * c["lm_head_params"])


def decode_roofline(c: dict[str, int], batch: int, ctx: float, bw: float, peak: float) -> dict[str, float]:
    """ROOFLINE_FORMULA for one decode step of `batch` sequences at average context ctx, against
    bw (GB/s) and peak (GFLOP/s)."""
    flops = (2 * (c["linear_params"] + c["lm_head_params"]) * batch
             + 4 * c["layers"] * c["heads"] * c["head_dim"] * ctx * batch)
    t_mem = c["weight_bytes"] / (bw * 1e9)
    kv = batch * ctx * c["layers"] * 2 * c["kv_heads"] * c["head_dim"] * 4
    t_flop = flops / (peak * 1e9)
    return {"step_flops": flops, "t_mem_ms": t_mem * 1e3, "t_flops_ms": t_flop * 1e3,
            "tok_s": batch / max(t_mem, t_flop), "tok_s_with_kv": batch / max(t_mem + kv / (bw * 1e9), t_flop)}
