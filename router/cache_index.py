"""The router's index of what each replica's prefix cache holds: a copy of its block keys, kept
current by the changes each stats poll carries (replica.actor.ReplicaShell.cache_report), and the
prompt's side of a lookup (its block keys, computed once per block size). Placement policies
score replicas by how much of a prompt's prefix they hold (router/placement.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blockkeys import BlockHash, prompt_block_hashes


@dataclass
class CacheIndex:
    """One replica's prefix-cache keys as the router last heard them. `epoch` is the replica's
    count of reports the index has applied in order; a report the index cannot apply in order (a
    poll was lost, or two crossed) makes the next poll ask for the whole set."""
    keys: set[BlockHash] = field(default_factory=set)
    epoch: int | None = None  # None: ask for everything

    def apply(self, report: dict[str, Any]) -> None:
        """report: {"epoch": e, "base": b, "full": bool, "keys": [...], "events": [(added, key), ...]}
        (see ReplicaShell.cache_report): a full report replaces the set (unless the index is at a later
        epoch already); the changes of a delta apply in order, to the set at their base epoch only."""
        if report["full"]:
            if self.epoch is not None and report["epoch"] <= self.epoch:
                return
            self.keys = set(report["keys"])
        elif report["base"] == self.epoch:
            for added, key in report["events"]:
                if added:
                    self.keys.add(key)
                else:
                    self.keys.discard(key)
        else:
            self.epoch = None
            return
        self.epoch = report["epoch"]

    def clear(self) -> None:
        """The replica is gone (or was replaced): nothing of its cache is known."""
        self.keys, self.epoch = set(), None

    def matched(self, hashes: list[BlockHash]) -> int:
        """How many of the leading block keys are held (a prefix: the first miss ends it)."""
        n = 0
        for h in hashes:
            if h not in self.keys:
                break
            n += 1
        return n


@dataclass
class Prompt:
    """A prompt as a placement policy sees it: its token ids, and its block keys per block size,
    computed the first time a policy asks."""
    ids: list[int]
    _hashes: dict[int, list[BlockHash]] = field(default_factory=dict)

    def cached_tokens(self, index: CacheIndex, block_size: int) -> int:
        """Tokens of the prompt's prefix that a replica with this index and block size holds."""
        if not index.keys:
            return 0
        if (hashes := self._hashes.get(block_size)) is None:
            hashes = self._hashes[block_size] = prompt_block_hashes(self.ids, block_size)
        return index.matched(hashes) * block_size
