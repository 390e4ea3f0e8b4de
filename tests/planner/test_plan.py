"""`pdserve plan`: the layouts it tries, and the one it picks when the answer is known from first principles:
with long prompts and a tight TPOT target, colocated decodes stall behind prefill chunks and a split wins;
with a TTFT target only a prompt prefilled on both cores meets (here 1.8x faster than on one), one
replica with both cores wins."""
from __future__ import annotations

from pdserve.config import ClusterConfig, PoolConfig, RouterConfig
from planner.cost import PoolProfile, Profile, StepModel, pool_key
from planner.plan import Layout, format_plan, layouts, plan


def profile() -> Profile:
    pools = {}
    for threads, speed in ((1, 1.0), (2, 1.8)):
        # 5 ms a step and 1 ms a token on one thread
        step = StepModel((1, 1000), (0.006 / speed, 1.005 / speed), (1, 2), (0.0, 0.0))
        opts = {"tensor_parallel_size": 1, "num_threads": threads, "dtype": "float32", "device": "cpu"}
        pools[pool_key(opts)] = PoolProfile(opts, step)
    return Profile("m", {}, pools)


BASE = ClusterConfig(prefill=PoolConfig(max_num_batched_tokens=512, num_kv_blocks=1024),
                     decode=PoolConfig(max_num_batched_tokens=512, num_kv_blocks=1024),
                     router=RouterConfig(max_ongoing_requests=64))
REQUESTS = [([1 + i % 50] * 2000, 50) for i in range(24)]


def test_the_layouts_of_two_cores():
    found = {layout.describe() for layout in layouts(profile(), 2, thresholds=(256,))}
    assert found == {"colocated 1x(tp1, 1 thr)", "colocated 2x(tp1, 1 thr)", "colocated 1x(tp1, 2 thr)",
                     "1P(tp1, 1 thr) + 1D(tp1, 1 thr), disaggregated",
                     "1P(tp1, 1 thr) + 1D(tp1, 1 thr), conditional < 256",
                     "1P(tp1, 1 thr) + 1D(tp1, 1 thr), slo_aware"}
    assert Layout((1, 1, 1), (1, 1, 1), 256).config(BASE).router.local_prefill_threshold == 256
    assert Layout((0, 1, 1), (1, 1, 2), 0).config(BASE).decode.num_threads == 2
    slo = Layout((1, 1, 1), (1, 1, 1), 0, "slo_aware").config(BASE).router
    assert (slo.dispatch, bool(slo.profile)) == ("slo_aware", True)
    assert not any(x.dispatch == "slo_aware" for x in layouts(profile(), 2, (256,), dispatches=("threshold",)))


def test_a_tight_tpot_target_with_long_prompts_picks_a_split():
    found = plan(BASE, profile(), REQUESTS, 2, ttft_slo=30.0, tpot_slo=0.02, thresholds=(256,))
    best = found[0]
    assert best.layout.prefill[0] == 1 and best.layout.threshold == 0, format_plan(found, 10)
    colocated = max(p.goodput for p in found if not p.layout.prefill[0])
    assert best.goodput > colocated
    assert best.run["slo"]["both"] >= 0.9 and best.run["tpot_ms"]["p90"] <= 20


def test_a_ttft_target_one_core_cannot_meet_picks_one_replica_on_both_cores():
    # a 2000-token prompt: 2.0 s of prefill on one thread, 1.1 s on two
    found = plan(BASE, profile(), REQUESTS, 2, ttft_slo=1.5, tpot_slo=5.0, thresholds=(256,))
    assert found[0].layout == Layout((0, 1, 1), (1, 1, 2)), format_plan(found, 10)
    assert "colocated 1x(tp1, 2 thr)" in format_plan(found, 1)
    assert all(p.goodput == 0 for p in found[1:])


def test_documents_among_chats_under_both_targets_pick_slo_aware_dispatch():
    """A 1500-token document among three 60-token chats, under a 3 s TTFT and a 50 ms TPOT target. A fixed
    dispatch queues every document on the one prefill core (and, all to the prefill pool, the chats behind them);
    slo_aware sends a document to the decode replica while its predictions say the prefill replica is behind and
    the running decodes can take its chunks: a fifth more goodput than any fixed split, and the planner's pick."""
    mix = [([1 + i % 50] * (1500 if i % 4 == 0 else 60), 40) for i in range(64)]
    found = plan(BASE, profile(), mix, 2, ttft_slo=3.0, tpot_slo=0.05, thresholds=(256,))
    best = found[0]
    assert best.layout.dispatch == "slo_aware", format_plan(found, 10)
    fixed = max(p.goodput for p in found if p.layout.prefill[0] and p.layout.dispatch == "threshold")
    assert best.goodput > 1.2 * fixed and best.run["slo"]["both"] >= 0.9
