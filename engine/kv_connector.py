"""The engine's side of a KV connector: the seam kv_transfer/ plugs into. The engine
knows nothing of where KV goes; a sequence carries an opaque `kv_target`, and the model
calls `save_kv_layer` right after each layer's K/V for the step are in the local cache."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from engine.sequence import Sequence


@dataclass
class StepLayout:
    """Where each sequence's tokens sit in this step's flat batch. Filled by the ModelRunner."""
    seqs: list[Sequence]  # in flat-batch order
    num_scheduled_tokens: list[int]  # per seq, this step
    query_start_loc: list[int]  # [num_seqs + 1]: seq i's tokens are rows [qsl[i], qsl[i+1])


class KVSaver(ABC):
    """Worker half of a connector on the sending (prefill) side."""

    @abstractmethod
    def begin_step(self, layout: StepLayout) -> None:
        """Plan this step's sends: which rows of the batch go to which remote slots."""

    @abstractmethod
    def save_kv_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [num_tokens, num_kv_heads, head_dim], this step's new K/V of one layer."""

    def end_step(self) -> None:
        """Called after the step's forward: every layer's K/V for the step has been handed over."""

    def unreachable(self) -> dict[str, str]:
        """Destination pools this saver can no longer send to, with why (a peer died): requests
        bound there are lost, the rest go on."""
        return {}
