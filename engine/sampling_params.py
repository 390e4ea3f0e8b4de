"""What a request asks of the sampler; shaped like vLLM's so users know it."""
from __future__ import annotations

import math
from dataclasses import dataclass

# temperatures below this sample greedily (as vLLM's): logits / 1e-40 overflow to inf, and a softmax of infs is NaN
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 (or anything below GREEDY_BELOW) means greedy
    top_k: int = 0  # 0 (or -1) means all tokens
    top_p: float = 1.0  # nucleus: keep the smallest set whose probability reaches top_p
    seed: int | None = None  # None: a fresh seed per request; sampling is a pure function of (seed, position, logits)
    max_tokens: int = 16
    stop: tuple[str, ...] = ()  # stop strings; the output text ends before the first of them
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; n >= 0: the sampled token's logprob and the top n

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature} must be finite and >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError(f"top_k={self.top_k} must be -1 or 0 (off: all tokens) or >= 1")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be at least 1")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs={self.logprobs} must be >= 0 or None")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
