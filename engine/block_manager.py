"""Paged KV: hands out fixed-size blocks of the cache by id, and keeps full blocks findable by
their content (the prefix cache). The scheduler never sees tensors."""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence as Seq

from blockkeys import ROOT, BlockHash, hash_block
from engine.sequence import Sequence

__all__ = ["ROOT", "BlockHash", "BlockManager", "hash_block"]


class BlockManager:
    """A free list plus reference counts, and the prefix cache: a full block whose KV has been
    computed is findable by its hash while some sequence holds it and after, until its space is
    handed out again. The free list is in eviction order: blocks that hold nothing findable first,
    then cached ones, least recently used first; a block in use is never on it."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        # an ordered set, front first out: taking a cached block off it when a sequence shares it is O(1)
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_hashes: list[BlockHash | None] = [None] * num_blocks  # the key a block is findable by
        self.cached_blocks: dict[BlockHash, int] = {}  # key -> block id; block_hashes is its inverse
        # (True, key) as a block becomes findable, (False, key) as it stops being: for whoever mirrors the
        # cache's contents (a replica's router); None until record_events() asks for them
        self.events: deque[tuple[bool, BlockHash]] | None = None

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds: unused, or cached and evictable."""
        return len(self.free_block_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks seq still needs so that its first num_tokens slots have a home."""
        return max(0, self.num_blocks_for(num_tokens) - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks that hold seq's longest cached run of full blocks from its start: at most
        (num_tokens - 1) // block_size of them, so at least one token is left to compute (its logits
        give the next token) and no shared block is ever written. Hashes seq's full blocks once."""
        if not self.enable_caching:
            return []
        n = (seq.num_tokens - 1) // self.block_size
        hashes = self._hashes(seq, n)
        hits: list[int] = []
        for i in range(n):
            block_id = self.cached_blocks.get(hashes[i])
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence, num_tokens: int, prefix: Seq[int] = ()) -> bool:
        """prefix: cached blocks (match_prefix) a sequence with no blocks yet would share first."""
        missing = self.num_missing_blocks(seq, num_tokens)
        if prefix:  # the shared blocks that are free now are free no more
            missing = max(0, missing - len(prefix)) + sum(1 for b in prefix if not self.ref_counts[b])
        return missing <= len(self.free_block_ids)

    def allocate(self, seq: Sequence, num_tokens: int, prefix: Seq[int] = ()) -> None:
        """Grow seq's block table to cover num_tokens slots (a prefill chunk or one decode token);
        a sequence with no blocks yet first shares prefix, the blocks match_prefix found."""
        if prefix:
            assert not seq.block_table, "only a sequence with no blocks shares a cached prefix"
            if not self.can_allocate(seq, num_tokens, prefix):
                raise RuntimeError(f"out of KV blocks: {seq} needs {self.num_blocks_for(num_tokens)} with "
                                   f"{len(prefix)} cached, {self.num_free_blocks} free")
            for block_id in prefix:
                if not self.ref_counts[block_id]:
                    del self.free_block_ids[block_id]
                self.ref_counts[block_id] += 1
            seq.block_table.extend(prefix)
            seq.num_cached_blocks = len(prefix)
        missing = self.num_missing_blocks(seq, num_tokens)
        if missing > len(self.free_block_ids):
            raise RuntimeError(f"out of KV blocks: {seq} needs {missing}, {self.num_free_blocks} free")
        for _ in range(missing):
            block_id, _ = self.free_block_ids.popitem(last=False)
            if (h := self.block_hashes[block_id]) is not None:  # evicted: its space is needed
                del self.cached_blocks[h]
                self.block_hashes[block_id] = None
                if self.events is not None:
                    self.events.append((False, h))
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Make seq's full blocks whose KV is computed (num_computed_tokens) findable; each block is
        hashed once. A block whose content is already cached under another id stays unfindable."""
        num_full = seq.num_computed_tokens // self.block_size
        if not self.enable_caching or num_full <= seq.num_cached_blocks:
            return
        hashes = self._hashes(seq, num_full)
        for i in range(seq.num_cached_blocks, num_full):
            h, block_id = hashes[i], seq.block_table[i]
            if self.block_hashes[block_id] is None and h not in self.cached_blocks:
                self.cached_blocks[h] = block_id
                self.block_hashes[block_id] = h
                if self.events is not None:
                    self.events.append((True, h))
        seq.num_cached_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Drop seq's hold on its blocks. A block no one holds goes on the free list: a cached one
        at the end (used most recently; the last block first, so a prefix loses its tail first), one
        holding nothing findable at the front, to be handed out before any cached one."""
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids[block_id] = None
                if self.block_hashes[block_id] is None:
                    self.free_block_ids.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_cached_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (e.g. to time a cold cache); blocks in use stay allocated."""
        if self.events is not None:
            self.events.extend((False, h) for h in self.cached_blocks)
        self.cached_blocks.clear()
        self.block_hashes = [None] * self.num_blocks

    def record_events(self) -> deque[tuple[bool, BlockHash]]:
        """Start logging what becomes findable and what stops being (self.events, appended on the
        engine's thread; a deque, so another thread may pop from its left while it grows)."""
        if self.events is None:
            self.events = deque()
        return self.events

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[BlockHash]:
        """seq.block_hashes grown to cover its first num_blocks full blocks."""
        hashes, bs, tokens = seq.block_hashes, self.block_size, seq.token_ids
        parent = hashes[-1] if hashes else ROOT
        for i in range(len(hashes), num_blocks):
            parent = hash_block(parent, tokens[i * bs:(i + 1) * bs])
            hashes.append(parent)
        return hashes
