"""BlockManager: a free list of KV block ids plus reference counts, and the prefix cache. CPU only, no model."""
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


# prefix cache ---------------------------------------------------------------------------------


def computed(tokens: list[int], bm: BlockManager, prefix: list[int] | None = None) -> Sequence:
    """A sequence of these tokens with blocks for all of them and its KV computed (offered to the cache)."""
    s = Sequence(tokens, SamplingParams(), seed=0)
    hits = bm.match_prefix(s) if prefix is None else prefix
    bm.allocate(s, len(tokens), hits)
    s.num_computed_tokens = len(tokens)
    bm.cache_full_blocks(s)
    return s


def test_a_full_block_is_findable_once_computed_and_shared_by_reference() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Sequence(list(range(10)), SamplingParams(), seed=0)  # 2 full blocks and 2 tokens
    bm.allocate(a, 10)
    a.num_computed_tokens = 6  # KV of 1.5 blocks: only the first is whole
    bm.cache_full_blocks(a)
    assert list(bm.cached_blocks.values()) == a.block_table[:1] and a.num_cached_blocks == 1
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)
    assert list(bm.cached_blocks.values()) == a.block_table[:2]  # never the partial third
    b = Sequence(list(range(10)) + [99], SamplingParams(), seed=0)
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:2]
    bm.allocate(b, 11, hits)
    assert b.block_table[:2] == hits and b.block_table[2] not in a.block_table and b.num_cached_blocks == 2
    assert [bm.ref_counts[x] for x in a.block_table] == [2, 2, 1]
    assert bm.num_free_blocks == 8 - 4
    bm.free(a)
    assert [bm.ref_counts[x] for x in hits] == [1, 1] and not set(hits) & set(bm.free_block_ids)
    bm.free(b)
    assert bm.num_free_blocks == 8 and sum(bm.ref_counts) == 0
    assert sorted(bm.cached_blocks.values()) == sorted(hits)  # free, and still findable
    c = Sequence(list(range(10)), SamplingParams(), seed=0)
    assert bm.match_prefix(c) == hits


def test_a_whole_cached_prompt_leaves_its_last_token_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = computed(list(range(12)), bm)  # 3 full blocks, all cached
    table = list(a.block_table)
    bm.free(a)
    assert sorted(bm.cached_blocks.values()) == sorted(table)
    # (num_tokens - 1) // block_size blocks at most: a shared block is never written
    assert bm.match_prefix(Sequence(list(range(12)), SamplingParams(), seed=0)) == table[:2]
    assert bm.match_prefix(Sequence(list(range(13)), SamplingParams(), seed=0)) == table
    assert bm.match_prefix(Sequence(list(range(4)), SamplingParams(), seed=0)) == []


def test_the_same_tokens_after_another_prefix_do_not_match() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    x = computed([1, 2, 3, 4, 5, 6, 7, 8, 0], bm)
    y = Sequence([9, 9, 9, 9, 5, 6, 7, 8, 0], SamplingParams(), seed=0)  # its second block is x's second
    assert bm.match_prefix(y) == []
    assert y.block_hashes[1] != x.block_hashes[1]  # the hash covers the parent's
    assert bm.match_prefix(Sequence([1, 2, 3, 4, 5, 6, 7, 9, 0], SamplingParams(), seed=0)) == x.block_table[:1]
    assert bm.match_prefix(Sequence([1, 2, 3, 4, 5, 6, 7, 8, 1], SamplingParams(), seed=0)) == x.block_table[:2]


def test_eviction_takes_unused_blocks_first_then_the_least_recently_used() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    a = computed(list(range(8)) + [0], bm)  # blocks a0 a1 cached, a2 partial
    b = computed(list(range(100, 108)) + [0], bm)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)
    # unused partial blocks are handed out first, then a's (freed first) from its tail, then b's
    order = [a_blocks[2], b_blocks[2], a_blocks[1], a_blocks[0], b_blocks[1], b_blocks[0]]
    assert sorted(bm.free_block_ids) == sorted(order) and list(bm.free_block_ids)[2:] == order[2:]
    c = Sequence([7] * 9, SamplingParams(), seed=0)
    bm.allocate(c, 9)  # 3 blocks: the two partial ones and a's tail
    assert sorted(c.block_table) == sorted(order[:3])
    assert a_blocks[1] not in bm.cached_blocks.values() and len(bm.cached_blocks) == 3
    assert bm.match_prefix(Sequence(list(range(8)) + [0], SamplingParams(), seed=0)) == a_blocks[:1]
    assert bm.match_prefix(Sequence(list(range(100, 108)) + [0], SamplingParams(), seed=0)) == b_blocks[:2]
    bm.free(c)  # its blocks hold nothing findable: they go to the front
    assert list(bm.free_block_ids)[3:] == [a_blocks[0], b_blocks[1], b_blocks[0]]
    # a hit makes a block recently used: a0, shared and given back, goes behind b's blocks
    d = computed(list(range(4)) + [5], bm)
    assert d.block_table[0] == a_blocks[0]
    bm.free(d)
    assert list(bm.free_block_ids)[3:] == [b_blocks[1], b_blocks[0], a_blocks[0]]
    e = Sequence([8] * 16, SamplingParams(), seed=0)
    bm.allocate(e, 16)  # 4 blocks: the 3 unused ones, then b's tail
    assert b_blocks[1] in e.block_table and sorted(bm.cached_blocks.values()) == sorted([b_blocks[0], a_blocks[0]])


def test_a_block_in_use_is_never_evicted() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = computed(list(range(8)), bm)  # holds 2 cached blocks
    assert bm.num_free_blocks == 2
    hog = Sequence([5] * 8, SamplingParams(), seed=0)
    bm.allocate(hog, 8)
    assert not bm.can_allocate(Sequence([6], SamplingParams(), seed=0), 1)
    assert sorted(bm.cached_blocks.values()) == sorted(a.block_table) and not set(a.block_table) & set(hog.block_table)
    # sharing a's blocks takes no free block; a missing one needs a free one
    new = Sequence(list(range(8)) + [1], SamplingParams(), seed=0)
    hits = bm.match_prefix(new)
    assert hits == a.block_table and not bm.can_allocate(new, 9, hits) and bm.can_allocate(new, 8, hits)


def test_sharing_a_free_cached_block_takes_it_off_the_free_list() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    a = computed(list(range(8)), bm)
    bm.free(a)
    b = Sequence(list(range(8)) + [1, 2, 3, 4, 5], SamplingParams(), seed=0)
    hits = bm.match_prefix(b)
    assert len(hits) == 2 and bm.num_free_blocks == 3
    assert bm.can_allocate(b, 12, hits) and not bm.can_allocate(b, 13, hits)  # 2 shared + 1 of the 3 free
    bm.allocate(b, 12, hits)
    assert bm.num_free_blocks == 0 and [bm.ref_counts[x] for x in b.block_table] == [1, 1, 1]
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(b, 13)


def test_a_duplicate_block_stays_unfindable_and_is_reused_first() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    a = computed(list(range(4)) + [0], bm)
    b = computed(list(range(4)) + [1], bm, prefix=[])  # the same first block, computed again (no lookup)
    assert bm.cached_blocks == {a.block_hashes[0]: a.block_table[0]}
    assert b.block_table[0] != a.block_table[0] and bm.block_hashes[b.block_table[0]] is None
    table = list(b.block_table)
    bm.free(b)
    assert set(list(bm.free_block_ids)[:2]) == set(table)  # the duplicate and the partial block
    assert b.num_cached_blocks == 0 and b.block_table == []


def test_caching_off_finds_nothing_and_keeps_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=4, enable_caching=False)
    a = computed(list(range(9)), bm)
    assert bm.cached_blocks == {} and a.block_hashes == [] and bm.match_prefix(a) == []
    bm.free(a)
    assert bm.num_free_blocks == 4


def test_reset_prefix_cache_forgets_every_block() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = computed(list(range(9)), bm)
    bm.reset_prefix_cache()
    assert bm.cached_blocks == {} and bm.match_prefix(Sequence(list(range(9)), SamplingParams(), seed=0)) == []
    bm.free(a)
    assert bm.num_free_blocks == 4
