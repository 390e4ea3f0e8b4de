"""Sampling as a pure function of (request seed, position, logits): the same request gives the
same tokens whichever engine samples which position (prefill side, decode side, or one engine)."""
from __future__ import annotations

import torch

from engine.layers.fused import argmax_rows
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, TokenLogprobs

_MASK64 = (1 << 63) - 1


def position_seed(seed: int, position: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) & _MASK64


def sample_row(logits: torch.Tensor, params: SamplingParams, seed: int, position: int) -> int:
    """logits: [vocab] float32. Exponential-race sampling (argmax p/E, E ~ Exp(1)) with noise
    drawn from a generator seeded by (seed, position)."""
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop = order[mass_before >= params.top_p]
        probs = probs.index_fill(0, drop, 0.0)
    gen = torch.Generator(device=logits.device).manual_seed(position_seed(seed, position))
    noise = torch.empty_like(probs).exponential_(generator=gen)
    return int((probs / noise).argmax())


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]
                 ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits: [num_seqs, vocab], one row per sampling sequence; position = seq.num_tokens."""
        logits = logits.float()
        if all(s.params.greedy for s in seqs):
            tokens = argmax_rows(logits).tolist()
        else:
            tokens = [sample_row(logits[i], s.params, s.seed, s.num_tokens) for i, s in enumerate(seqs)]
        logprobs: list[TokenLogprobs | None] = [None] * len(seqs)
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if rows:
            lp = logits[rows].log_softmax(dim=-1)
            for j, i in enumerate(rows):
                n = seqs[i].params.logprobs
                top = lp[j].topk(n) if n else None
                logprobs[i] = TokenLogprobs(
                    token_id=tokens[i], logprob=float(lp[j, tokens[i]]),
                    top=dict(zip(top.indices.tolist(), top.values.tolist())) if top is not None else {})
        return tokens, logprobs
