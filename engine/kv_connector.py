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
    # this rank's own KV cache, [layers, k|v, num_blocks, block_size, kv_heads, head_dim] (bind_local): a
    # prompt's blocks that came from the prefix cache are sent from there, not computed
    local_kv: torch.Tensor | None = None
    # True where save_kv_layer copies on the stepping thread (nothing overlaps the forward anyway): a step may then
    # run the model whole (a CPU model's C decoder stack) and hand each layer's K/V over after it, read back from
    # the local cache (save_from_cache); False: each layer's K/V leaves while the later layers compute
    after_step: bool = False

    def bind_local(self, kv_cache: torch.Tensor) -> None:
        self.local_kv = kv_cache

    def rows(self, layer: int, kv: int, x: torch.Tensor, rows: torch.Tensor | None,
             cached: torch.Tensor | None) -> torch.Tensor:
        """The rows to send of K (kv 0) or V (1) of `layer`: x, this step's [num_tokens, kv_heads, head_dim],
        followed by this rank's cache at the `cached` slots (None: none), then `rows` of that (None: all)."""
        if cached is not None:
            _, _, _, _, heads, dim = self.local_kv.shape
            x = torch.cat((x, self.local_kv[layer, kv].view(-1, heads, dim).index_select(0, cached)))
        return x if rows is None else x.index_select(0, rows)

    @abstractmethod
    def begin_step(self, layout: StepLayout) -> None:
        """Plan this step's sends: which rows of the batch go to which remote slots."""

    @abstractmethod
    def save_kv_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [num_tokens, num_kv_heads, head_dim], this step's new K/V of one layer."""

    def save_from_cache(self, slots: torch.Tensor) -> None:
        """After a step's whole forward (after_step savers): every layer's K/V of the step's tokens, read from the
        local cache at their slots (the step's slot mapping), as save_kv_layer would have been given them."""
        raise NotImplementedError(f"{type(self).__name__} says after_step but cannot save from the cache")

    def end_step(self) -> None:
        """Called after the step's forward: every layer's K/V for the step has been handed over."""

    @abstractmethod
    def reaches(self, pool: str) -> bool:
        """Whether requests bound for destination `pool` can be taken: it is attached here."""

    def unreachable(self) -> dict[str, str]:
        """Destination pools this saver can no longer send to, with why (a peer died): requests
        bound there are lost, the rest go on."""
        return {}
