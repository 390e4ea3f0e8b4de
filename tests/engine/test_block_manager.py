"""BlockManager: a free list of KV block ids plus reference counts. CPU only, no model."""
from __future__ import annotations

import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def seq(num_tokens: int = 1) -> Sequence:
    return Sequence(list(range(num_tokens)), SamplingParams(), seed=0)


def live_blocks(*seqs: Sequence) -> list[int]:
    return [b for s in seqs for b in s.block_table]


def test_allocate_covers_slots_block_by_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=16)
    s = seq(40)
    assert bm.num_missing_blocks(s, 17) == 2
    bm.allocate(s, 17)  # 17 slots need 2 blocks of 16
    assert len(s.block_table) == 2 and bm.num_free_blocks == 6
    bm.allocate(s, 32)  # still fits in 2 blocks: nothing new
    assert len(s.block_table) == 2 and bm.num_free_blocks == 6
    assert bm.num_missing_blocks(s, 33) == 1
    bm.allocate(s, 33)  # one more slot spills into a third block
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    bm.allocate(s, 1)  # shrinking is not a thing: the table never drops blocks on allocate
    assert len(s.block_table) == 3
    assert all(bm.ref_counts[b] == 1 for b in s.block_table)
    assert sum(bm.ref_counts) == 3


def test_can_allocate_counts_only_missing_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = seq(), seq()
    bm.allocate(a, 12)  # 3 blocks, 1 free
    assert bm.can_allocate(a, 16)  # needs 1 more
    assert not bm.can_allocate(a, 17)  # needs 2 more
    assert bm.can_allocate(b, 4) and not bm.can_allocate(b, 5)
    assert bm.num_blocks_for(0) == 0 and bm.num_blocks_for(4) == 1 and bm.num_blocks_for(5) == 2


def test_out_of_blocks_raises_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=16)
    a, b = seq(), seq()
    bm.allocate(a, 32)
    before = (list(bm.free_block_ids), list(bm.ref_counts))
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(b, 33)  # needs 3, only 1 free: no partial allocation
    assert b.block_table == []
    assert (list(bm.free_block_ids), list(bm.ref_counts)) == before


def test_free_returns_every_block_and_resets_table() -> None:
    bm = BlockManager(num_blocks=10, block_size=16)
    a, b = seq(), seq()
    bm.allocate(a, 50)
    bm.allocate(b, 20)
    a_blocks = list(a.block_table)
    assert bm.num_free_blocks == 10 - 4 - 2
    bm.free(a)
    assert a.block_table == []
    assert bm.num_free_blocks == 8
    assert set(a_blocks) <= set(bm.free_block_ids)
    assert all(bm.ref_counts[x] == 0 for x in a_blocks)
    assert all(bm.ref_counts[x] == 1 for x in b.block_table)
    bm.free(b)
    assert bm.num_free_blocks == 10 and sorted(bm.free_block_ids) == list(range(10))
    assert sum(bm.ref_counts) == 0
    bm.free(b)  # freeing an empty table is harmless
    assert bm.num_free_blocks == 10 and sum(bm.ref_counts) == 0


def test_no_double_allocation_across_churn() -> None:
    bm = BlockManager(num_blocks=32, block_size=8)
    seqs = [seq() for _ in range(6)]
    for i, s in enumerate(seqs):
        bm.allocate(s, 8 * (i + 1) - 3)  # 1..6 blocks: 21 of 32
    assert len(set(live_blocks(*seqs))) == len(live_blocks(*seqs)) == 21
    for s in seqs[::2]:
        bm.free(s)
    survivors = seqs[1::2]
    fresh = [seq() for _ in range(3)]
    for s in fresh:
        bm.allocate(s, 8 * 5)
    # grow survivors one block at a time, interleaved with the fresh ones
    for s in survivors:
        bm.allocate(s, len(s.block_table) * 8 + 1)
    ids = live_blocks(*survivors, *fresh)
    assert len(ids) == len(set(ids)), "a block id is owned by two live sequences"
    assert not set(ids) & set(bm.free_block_ids), "a live block is also on the free list"
    assert len(ids) + bm.num_free_blocks == bm.num_blocks
    assert all(bm.ref_counts[b] == 1 for b in ids)
    # exhaust the pool exactly: every id is handed out once
    hog = seq()
    bm.allocate(hog, bm.num_free_blocks * 8)
    assert bm.num_free_blocks == 0
    assert sorted(live_blocks(*survivors, *fresh, hog)) == list(range(32))
    assert not bm.can_allocate(seq(), 1)


def test_shared_block_is_freed_by_its_last_owner() -> None:
    # a prefix block shared by two sequences (ref count 2) survives the first free
    bm = BlockManager(num_blocks=4, block_size=16)
    a, b = seq(), seq()
    bm.allocate(a, 32)
    shared = a.block_table[0]
    b.block_table.append(shared)
    bm.ref_counts[shared] += 1
    bm.allocate(b, 32)  # b owns the shared block and one of its own
    assert len(b.block_table) == 2 and b.block_table[0] == shared and b.block_table[1] not in a.block_table
    bm.free(a)
    assert shared not in bm.free_block_ids and bm.ref_counts[shared] == 1
    assert bm.num_free_blocks == 2
    bm.free(b)
    assert shared in bm.free_block_ids and bm.ref_counts[shared] == 0
    assert sorted(bm.free_block_ids) == [0, 1, 2, 3]
