"""A request as the scheduler sees it: tokens, how many are computed, its KV blocks."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from itertools import count

from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass
class TokenLogprobs:
    """Logprobs of one sampled token: its own and the top-n alternatives."""
    token_id: int
    logprob: float
    top: dict[int, float]  # token id -> logprob, the n most likely


class Sequence:
    _ids = count()

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, seed: int,
                 request_id: str | None = None) -> None:
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # prefix-cache keys of token_ids' full blocks, as far as hashed
        self.num_cached_blocks = 0  # leading blocks of block_table the prefix cache already knows
        self.num_cached_tokens = 0  # tokens found in the prefix cache when first scheduled
        self.status = SequenceStatus.WAITING
        self.params = params
        self.seed = seed  # the sampler's seed: params.seed, or drawn once when none is given
        self.logprobs: list[TokenLogprobs] = []
        self.finish_reason: str | None = None  # "stop" or "length"
        self.num_preemptions = 0
        self.kv_target: object | None = None  # prefill side of a disaggregated pair: where this KV goes
        self.kv_sent = 0  # prefill side of a pair: positions [0, kv_sent) of its KV are at the decode side
        self.order = 0.0  # scheduler: its key in the waiting queue under a scheduling policy (smallest first)
        self.arrival = 0.0  # scheduler: when it was queued (time.monotonic), under a scheduling policy

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(id={self.request_id}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.name})")
