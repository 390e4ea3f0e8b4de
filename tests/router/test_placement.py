"""Placement policies are picked by name from a registry; each chooses as it says, and only
among the replicas that are up."""
from __future__ import annotations

import asyncio

import pytest

from blockkeys import prompt_block_hashes
from router.cache_index import CacheIndex, Prompt
from router.placement import DECODE_POLICIES, PREFILL_POLICIES, Placement, Replica

P = Prompt(list(range(100)))


def pools() -> tuple[list[Replica], list[Replica]]:
    prefill = [Replica("prefill", i, None, queued_tokens=q) for i, q in enumerate((300, 100, 200))]
    decode = [Replica("decode", i, None, free_blocks=f) for i, f in enumerate((10, 40, 20))]
    return prefill, decode


def test_the_registries_list_every_policy() -> None:
    assert sorted(PREFILL_POLICIES) == ["least_tokens", "prefix_aware", "round_robin"]
    assert sorted(DECODE_POLICIES) == ["most_free_blocks", "prefix_aware", "round_robin"]


def test_an_unknown_policy_is_refused_naming_the_known_ones() -> None:
    known = r"\['least_tokens', 'prefix_aware', 'round_robin'\]"
    with pytest.raises(ValueError, match=r"'fastest' is unknown; choose one of " + known):
        Placement(*pools(), "fastest", "most_free_blocks")
    with pytest.raises(ValueError, match="the decode pool needs at least one replica"):
        Placement(pools()[0], [], "least_tokens", "most_free_blocks")


def test_least_tokens_and_most_free_blocks_skip_replicas_that_are_down() -> None:
    prefill, decode = pools()
    place = Placement(prefill, decode, "least_tokens", "most_free_blocks")
    assert place.pick_prefill(P).index == 1
    assert [r.index for r in place.decode_order(P)] == [1, 2, 0]
    prefill[1].healthy = decode[1].healthy = False
    assert place.pick_prefill(P).index == 2
    assert [r.index for r in place.decode_order(P)] == [2, 0]
    for r in prefill:
        r.healthy = False
    assert place.pick_prefill(P) is None  # the router then prefills on the decode replica


def test_round_robin_turns_over_every_replica() -> None:
    prefill, decode = pools()
    place = Placement(prefill, decode, "round_robin", "round_robin")
    assert [place.pick_prefill(P).index for _ in range(4)] == [0, 1, 2, 0]
    assert [[r.index for r in place.decode_order(P)] for _ in range(3)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]


def holding(num_blocks: int, ids=tuple(range(100)), block_size: int = 16) -> CacheIndex:
    """An index that holds the first num_blocks blocks of ids (and an unrelated block)."""
    keys = prompt_block_hashes(list(ids), block_size)[:num_blocks]
    index = CacheIndex()
    index.apply(dict(epoch=1, base=0, full=True, keys=[*keys, b"x" * 16], events=[]))
    return index


def test_the_cache_index_follows_reports_in_order_and_asks_again_after_a_gap() -> None:
    a, b, c = b"a" * 16, b"b" * 16, b"c" * 16
    index = CacheIndex()
    index.apply(dict(epoch=3, base=0, full=True, keys=[a, b], events=[]))
    assert index.keys == {a, b} and index.epoch == 3
    # in order: c added then evicted, a evicted then cached again, b evicted
    index.apply(dict(epoch=4, base=3, full=False, keys=[], events=[(True, c), (False, c), (False, a), (True, a),
                                                                   (False, b)]))
    assert index.keys == {a} and index.epoch == 4
    index.apply(dict(epoch=6, base=5, full=False, keys=[], events=[(True, b)]))  # report 5 was lost
    assert index.epoch is None and index.keys == {a}  # the next poll asks for the whole set
    index.apply(dict(epoch=7, base=6, full=True, keys=[c], events=[]))
    index.apply(dict(epoch=5, base=4, full=True, keys=[a], events=[]))  # a late, older full report
    assert index.keys == {c} and index.epoch == 7
    index.clear()
    assert not index.keys and index.epoch is None


def test_a_prompt_matches_only_a_cached_run_from_its_start() -> None:
    ids = list(range(100))  # 6 full blocks of 16 can be taken (the last token is always computed)
    assert Prompt(ids).cached_tokens(holding(4), 16) == 64
    assert Prompt(ids).cached_tokens(holding(6), 16) == 96
    assert Prompt(ids[:97]).cached_tokens(holding(6), 16) == 96 and Prompt(ids[:96]).cached_tokens(holding(6), 16) == 80
    assert Prompt([1] + ids[1:]).cached_tokens(holding(6), 16) == 0  # another first token: another chain
    assert Prompt(ids).cached_tokens(holding(6), 8) == 0  # keys of another block size
    index = holding(6)
    index.keys.discard(prompt_block_hashes(ids, 16)[2])
    assert Prompt(ids).cached_tokens(index, 16) == 32  # a gap ends the match


def test_prefix_aware_prefers_the_cached_prefix_until_load_outweighs_it() -> None:
    decode = [Replica("decode", i, None, in_flight=n, cache=holding(k)) for i, (n, k) in enumerate(
        ((3, 1), (6, 5), (2, 0)))]
    place = Placement([], decode, "least_tokens", "prefix_aware")
    # replica 1 holds 80 of the 100 tokens and is within 4 requests of the least loaded; replica 0's 16
    # are less than half the prompt: no match, so the less loaded replica 2 goes first
    assert [r.index for r in place.decode_order(P)] == [1, 2, 0]
    decode[1].in_flight = 7  # 5 more than replica 2: load wins over its match
    assert [r.index for r in place.decode_order(P)] == [2, 0, 1]
    for r in decode:
        r.in_flight += 20  # the slack grows with the load: half the least loaded's requests
    assert [r.index for r in place.decode_order(P)] == [1, 2, 0]
    assert [r.index for r in place.decode_order(Prompt(list(range(200, 300))))] == [2, 0, 1]  # no match: least loaded
    decode[0].in_flight, decode[0].free_blocks, decode[2].free_blocks = 22, 50, 40  # equal load: more free blocks
    assert [r.index for r in place.decode_order(Prompt(list(range(200, 300))))] == [0, 2, 1]


def test_prefix_aware_prefill_counts_the_tokens_left_to_compute() -> None:
    prefill = [Replica("prefill", i, None, queued_tokens=q, cache=holding(k)) for i, (q, k) in enumerate(
        ((0, 0), (50, 6), (40, 1)))]
    place = Placement(prefill, [Replica("decode", 0, None)], "prefix_aware", "most_free_blocks")
    assert place.pick_prefill(P).index == 1  # 50 queued + 4 uncached beats 0 + 100 and 40 + 84
    prefill[1].queued_tokens = 120
    assert place.pick_prefill(P).index == 0



class _Stats:
    """An actor's `stats` method as the router calls it (stats.remote(...) -> awaitable), answering when told."""

    def __init__(self) -> None:
        self.answer: asyncio.Future = asyncio.get_running_loop().create_future()

    def remote(self, *args, **kwargs):
        return self.answer


class _Actor:
    def __init__(self) -> None:
        self.stats = _Stats()


def test_a_poll_of_a_replaced_actor_says_nothing_of_its_replacement() -> None:
    async def run() -> None:
        old, new = _Actor(), _Actor()
        d = Replica("decode", 0, old, free_blocks=5)
        place = Placement([], [d], "least_tokens", "most_free_blocks")
        poll = asyncio.ensure_future(place.refresh_stats(timeout_s=5))
        for _ in range(5):  # until the poll waits on the old actor
            await asyncio.sleep(0)
        d.actor, d.healthy = new, True  # the supervisor put a new actor in (Router.replaced) while the poll waited
        old.stats.answer.set_exception(RuntimeError("the old actor died"))
        await poll
        assert d.healthy and d.actor is new  # not marked down for what its dead predecessor said
        new.stats.answer.set_result({"kv_blocks_total": 8, "kv_blocks_used": 2})
        await place.refresh_stats(timeout_s=5)
        assert d.healthy and d.free_blocks == 6

    asyncio.run(run())


class _Reserve:
    def remote(self, ids, params, rid, local_below):
        from replica.contract import Reservation

        done = asyncio.get_running_loop().create_future()
        done.set_result(Reservation("pool", rid, (1,)))
        return done


def test_a_round_robin_looked_at_before_placing_turns_once_a_request() -> None:
    # slo_aware predicts for the first replica of decode_order, then places there: one turn of the round-robin
    # per request, so every replica gets its share (it turned twice a request: replica 0 never came first of 2)
    from router.placement import Placed

    async def run() -> list[int]:
        decode = [Replica("decode", i, _Actor(), free_blocks=100) for i in range(2)]
        for d in decode:
            d.actor.reserve = _Reserve()
        place = Placement([], decode, "least_tokens", "round_robin")
        got = []
        for i in range(4):
            order = place.decode_order(P)
            p = Placed(f"r{i}")
            await place.place_decode(p, list(range(100)), {}, False, 0, order)
            assert p.decode is order[0]
            got.append(p.decode.index)
        return got

    assert asyncio.run(run()) == [0, 1, 0, 1]
