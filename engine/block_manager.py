"""Paged KV: hands out fixed-size blocks of the cache by id. The scheduler never sees tensors."""
from __future__ import annotations

from collections import deque

from engine.sequence import Sequence


class BlockManager:
    """Free list plus reference counts (a block may later be shared by a common prefix)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks seq still needs so that its first num_tokens slots have a home."""
        return max(0, self.num_blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_missing_blocks(seq, num_tokens) <= len(self.free_block_ids)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to cover num_tokens slots (a prefill chunk or one decode token)."""
        missing = self.num_missing_blocks(seq, num_tokens)
        if missing > len(self.free_block_ids):
            raise RuntimeError(f"out of KV blocks: {seq} needs {missing}, {self.num_free_blocks} free")
        for _ in range(missing):
            block_id = self.free_block_ids.popleft()
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)
        seq.block_table = []
