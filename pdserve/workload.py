"""What a benchmark sends: the workloads (how long each prompt and output is), the seeded requests they make, and
the Poisson arrival times. Torch- and numpy-free; `pdserve bench` and benchmarks.serving build on it."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

WORKLOADS = ("fixed", "uniform", "longtail")
Request = tuple[list[int], int]  # (prompt token ids, output length)


@dataclass(frozen=True)
class LongtailMix:
    """The longtail workload: mostly short chats, some long documents. Lengths in tokens, ranges inclusive."""
    document_fraction: float = 0.2
    chat_prompt: tuple[int, int] = (32, 256)
    chat_output: tuple[int, int] = (32, 128)
    document_prompt: tuple[int, int] = (1024, 3072)
    document_output: tuple[int, int] = (16, 64)


@dataclass(frozen=True)
class Workload:
    """How long each request's prompt and output are. `kind` picks which fields apply."""
    kind: str = "fixed"  # "fixed", "uniform" or "longtail"
    prompt_len: int = 256  # fixed
    output_len: int = 128  # fixed
    prompt_range: tuple[int, int] = (32, 512)  # uniform, inclusive
    output_range: tuple[int, int] = (16, 256)  # uniform, inclusive
    longtail: LongtailMix = LongtailMix()

    def __post_init__(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(f"workload {self.kind!r}; choose one of {', '.join(WORKLOADS)}")
        if min(self.prompt_len, self.output_len, *self.prompt_range, *self.output_range) < 1:
            raise ValueError("prompt and output lengths must be at least 1 token")
        for name in ("prompt_range", "output_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} ({lo}, {hi}): the minimum must not exceed the maximum")

    def draw(self, rng: random.Random) -> tuple[int, int]:
        """One (prompt_len, output_len)."""
        if self.kind == "fixed":
            return self.prompt_len, self.output_len
        if self.kind == "uniform":
            return rng.randint(*self.prompt_range), rng.randint(*self.output_range)
        mix = self.longtail
        if rng.random() < mix.document_fraction:
            return rng.randint(*mix.document_prompt), rng.randint(*mix.document_output)
        return rng.randint(*mix.chat_prompt), rng.randint(*mix.chat_output)


def make_requests(workload: Workload | str, n: int, seed: int, vocab: int, max_len: int) -> list[Request]:
    """n (prompt_ids, output_len) pairs: ids uniform in [0, vocab), prompt + output clipped to max_len (the context)
    by shortening the prompt, so the output length stays what the workload asked. Same arguments, same requests."""
    workload = Workload(workload) if isinstance(workload, str) else workload
    if max_len < 2:
        raise ValueError(f"max_len={max_len}: the context must hold at least one prompt and one output token")
    rng = random.Random(seed)
    # All lengths first, so clipping (which changes how many ids are drawn) never changes another request's lengths.
    lengths = [workload.draw(rng) for _ in range(n)]
    requests = []
    for prompt_len, output_len in lengths:
        output_len = min(output_len, max_len - 1)
        prompt_len = min(prompt_len, max_len - output_len)
        requests.append((rng.choices(range(vocab), k=prompt_len), output_len))
    return requests


def arrival_times(n: int, rate: float | None, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: a Poisson process of `rate` requests/s (exponential
    gaps), or all at 0 when rate is None or inf."""
    if rate is None or math.isinf(rate):
        return [0.0] * n
    rng = random.Random(f"arrivals-{seed}")  # its own stream: the prompts stay the same whatever the rate
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times
