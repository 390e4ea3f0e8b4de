"""Placement policies are picked by name from a registry; each chooses as it says, and only
among the replicas that are up."""
from __future__ import annotations

import pytest

from router.placement import DECODE_POLICIES, PREFILL_POLICIES, Placement, Replica


def pools() -> tuple[list[Replica], list[Replica]]:
    prefill = [Replica("prefill", i, None, queued_tokens=q) for i, q in enumerate((300, 100, 200))]
    decode = [Replica("decode", i, None, free_blocks=f) for i, f in enumerate((10, 40, 20))]
    return prefill, decode


def test_the_registries_list_every_policy() -> None:
    assert sorted(PREFILL_POLICIES) == ["least_tokens", "round_robin"]
    assert sorted(DECODE_POLICIES) == ["most_free_blocks", "round_robin"]


def test_an_unknown_policy_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'fastest' is unknown; choose one of \['least_tokens', 'round_robin'\]"):
        Placement(*pools(), "fastest", "most_free_blocks")
    with pytest.raises(ValueError, match="the decode pool needs at least one replica"):
        Placement(pools()[0], [], "least_tokens", "most_free_blocks")


def test_least_tokens_and_most_free_blocks_skip_replicas_that_are_down() -> None:
    prefill, decode = pools()
    place = Placement(prefill, decode, "least_tokens", "most_free_blocks")
    assert place.pick_prefill().index == 1
    assert [r.index for r in place.decode_order()] == [1, 2, 0]
    prefill[1].healthy = decode[1].healthy = False
    assert place.pick_prefill().index == 2
    assert [r.index for r in place.decode_order()] == [2, 0]
    for r in prefill:
        r.healthy = False
    assert place.pick_prefill() is None  # the router then prefills on the decode replica


def test_round_robin_turns_over_every_replica() -> None:
    prefill, decode = pools()
    place = Placement(prefill, decode, "round_robin", "round_robin")
    assert [place.pick_prefill().index for _ in range(4)] == [0, 1, 2, 0]
    assert [[r.index for r in place.decode_order()] for _ in range(3)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
