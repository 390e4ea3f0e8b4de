"""scripts/chaos.py's pure helpers: the seeded plans (variants, arrivals, kills) and the per-request figures. The
run itself starts a cluster for minutes and is not a test."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("chaos", Path(__file__).parents[2] / "scripts" / "chaos.py")
chaos = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(chaos)


def test_variants_are_seeded_and_cover_greedy_and_sampled() -> None:
    vs = chaos.variants(0, None)
    assert vs == chaos.variants(0, None) and vs != chaos.variants(1, None)
    assert len(vs) == 24 and sum("messages" in v for v in vs) == 12  # 6 chats, each greedy and sampled
    greedy, sampled = vs[:12], vs[12:]
    assert all(v["sampling"]["temperature"] == 0 and "seed" not in v["sampling"] for v in greedy)
    assert all(v["sampling"]["temperature"] == 0.8 for v in sampled)
    assert len({v["sampling"]["seed"] for v in sampled}) == 12
    assert all(32 <= v["sampling"]["max_tokens"] <= 96 and v["sampling"]["ignore_eos"] for v in vs)
    assert [v.get("prompt", v.get("messages")) for v in greedy] == [v.get("prompt", v.get("messages")) for v in sampled]


def test_variants_without_a_tokenizer_or_chat_template() -> None:
    ids = chaos.variants(3, 512, max_tokens=(400, 900))
    assert all(isinstance(v["prompt"], list) and all(0 <= t < 512 for t in v["prompt"]) for v in ids)
    assert all(400 <= v["sampling"]["max_tokens"] <= 900 for v in ids)
    assert all("prompt" in v and isinstance(v["prompt"], str) for v in chaos.variants(0, None, chat=False))


def test_schedule_is_poisson_within_the_duration() -> None:
    plan = chaos.schedule(100, 2.0, 0, 24)
    assert plan == chaos.schedule(100, 2.0, 0, 24)
    times = [t for t, _ in plan]
    assert times == sorted(times) and times[-1] < 100 and 150 < len(plan) < 250
    assert {k for _, k in plan} <= set(range(24))


@pytest.mark.parametrize("seed", range(5))
def test_kill_plan(seed: int) -> None:
    plan = chaos.kill_plan(180, 20, seed, {"prefill": 2, "decode": 2})
    assert plan == chaos.kill_plan(180, 20, seed, {"prefill": 2, "decode": 2})
    times = [t for t, _, _ in plan]
    assert 15 <= times[0] <= 25 and times[-1] <= 170 and 6 <= len(plan) <= 11
    assert all(15 <= b - a <= 25 for a, b in zip(times, times[1:]))
    assert all(pool in ("prefill", "decode") and index in (0, 1) for _, pool, index in plan)
    assert chaos.kill_plan(5, 20, seed, {"prefill": 2, "decode": 2}) == []


def test_longest_gap_counts_the_wait_for_the_first_chunk() -> None:
    assert chaos.longest_gap([10.0, 13.0, 13.5, 14.0]) == (3.0, 13.0)
    assert chaos.longest_gap([10.0, 10.5, 12.5]) == (2.0, 12.5)
    assert chaos.longest_gap([10.0]) == (0.0, 10.0)


def test_first_difference() -> None:
    assert chaos.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert chaos.first_difference([1, 5, 3], [1, 2, 3]) == 1
    assert chaos.first_difference([1, 2], [1, 2, 3]) == 2
    assert chaos.first_difference([1, 2, 3, 4], [1, 2, 3]) == 3
