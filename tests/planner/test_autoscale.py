"""The autoscaler's decisions (planner/autoscale.py) on a simulated clock: the planner's sizes are the fewest
replicas the simulator says meet the SLOs (one fewer does not), grow with the arrival rate, and cost no
simulation when the load stays in its bucket; the delays keep a short burst or a noisy load from moving a pool,
and a pool follows a load stepped up then down. Then what the router observes (router/traffic.py) and the
config's refusals."""
from __future__ import annotations

import pytest

from pdserve.config import AutoscaleConfig, ClusterConfig, PoolConfig, RouterConfig
from pdserve.workload import mix_requests, steady_count
from planner.autoscale import SIM_REQUESTS, SIM_SECONDS, Autoscaler, Observation
from planner.cost import PoolProfile, Profile, StepModel, pool_key
from planner.simulate import simulate
from router.traffic import Traffic

# every step: 5 ms, plus 1 ms per token in it: a 200-token prompt prefills in ~0.2 s on one replica
STEP = StepModel((1, 1000), (0.006, 1.005), (1, 2), (0.0, 0.0))
MIX = [(200, 20)] * 8


def profile() -> Profile:
    opts = {"tensor_parallel_size": 1, "num_threads": 1, "dtype": "float32", "device": "cpu"}
    return Profile("m", {}, {pool_key(opts): PoolProfile(opts, STEP)})


def cluster(prefill=(1, 4), decode=(1, 4), **autoscale) -> ClusterConfig:
    pool = dict(max_num_batched_tokens=512, num_kv_blocks=1024, num_threads=1)
    a = AutoscaleConfig(enabled=True, prefill=prefill, decode=decode, **autoscale)
    return ClusterConfig(prefill=PoolConfig(replicas=prefill[0], **pool), decode=PoolConfig(replicas=decode[0], **pool),
                         router=RouterConfig(ttft_slo_s=1.0, tpot_slo_s=0.1, profile="p.json", autoscale=a))


def attainment(config, scaler, rate, prefill, decode) -> float:
    sized = config.replace(**{"prefill.replicas": prefill, "decode.replicas": decode})
    n = steady_count(rate, SIM_SECONDS, *SIM_REQUESTS)
    run = simulate(sized, scaler.profile, mix_requests(MIX, n, scaler.vocab, scaler.seed), rate, 0, 1.0, 0.1)
    return run["slo"]["both"]


def test_the_planner_wants_the_fewest_replicas_that_meet_the_slos():
    config = cluster(headroom=1.0)
    scaler = Autoscaler(config, profile())
    sizes = {rate: scaler.plan(rate, MIX) for rate in (0.5, 3.0, 8.0, 14.0)}
    assert sizes[0.5] == {"prefill": 1, "decode": 1}
    prefill = [sizes[r]["prefill"] for r in sorted(sizes)]
    assert prefill == sorted(prefill) and prefill[-1] >= 3, sizes  # ~0.2 s a prompt: one replica, < 5 req/s
    for rate, size in sizes.items():
        assert attainment(config, scaler, rate, size["prefill"], size["decode"]) >= 0.9
        if size["prefill"] > 1:  # one prefill replica fewer falls short
            assert attainment(config, scaler, rate, size["prefill"] - 1, size["decode"]) < 0.9


def test_headroom_plans_for_more_than_the_observed_rate():
    assert Autoscaler(cluster(headroom=2.0), profile()).plan(4.0, MIX) == \
        Autoscaler(cluster(headroom=1.0), profile()).plan(8.0, MIX)


def test_a_steady_load_costs_no_simulation():
    scaler = Autoscaler(cluster(), profile())
    first = scaler.plan(6.0, MIX)
    ran = scaler.simulations
    assert ran > 0
    assert scaler.plan(6.2, [(205, 20)] * 8) == first and scaler.simulations == ran  # the same 10% buckets
    scaler.plan(12.0, MIX)
    assert scaler.simulations > ran


def test_nothing_arriving_wants_the_minimum_and_a_load_past_the_maximum_wants_the_maximum():
    scaler = Autoscaler(cluster(prefill=(0, 2), decode=(1, 3)), profile())
    assert scaler.plan(0.0, MIX) == {"prefill": 0, "decode": 1}
    assert scaler.plan(500.0, MIX) == {"prefill": 2, "decode": 3}


def test_a_colocated_cluster_sizes_its_decode_pool_only():
    scaler = Autoscaler(cluster(prefill=(0, 0), decode=(1, 4), headroom=1.0), profile())
    assert scaler.plan(0.5, MIX) == {"prefill": 0, "decode": 1}
    big = scaler.plan(8.0, MIX)
    assert big["prefill"] == 0 and big["decode"] >= 2


def follow(scaler, loads, have, every_s=1.0):
    """Run decisions each every_s over `loads` (ongoing decode requests per tick); apply each resize. Returns
    (tick, new size) of every resize."""
    moves = []
    for tick, ongoing in enumerate(loads):
        d = scaler.decide(tick * every_s, Observation(0.0, MIX, {"decode": ongoing, "prefill": 0}), have)
        if "decode" in d.resize:
            have = {**have, "decode": d.resize["decode"]}
            moves.append((tick, d.resize["decode"]))
    return moves


def by_load(**delays) -> Autoscaler:
    config = cluster(prefill=(0, 0), decode=(1, 4), target_ongoing_requests=2, **delays)
    return Autoscaler(config.replace(**{"router.profile": None}), None)


def test_load_stepped_up_then_down_is_followed_after_the_delays():
    scaler = by_load(upscale_delay_s=3, downscale_delay_s=5)
    loads = [2] * 5 + [8] * 10 + [1] * 12
    # up: wanted 4 from tick 5; after 3 s (tick 8) the pool grows to it. Down: wanted 1 from tick 15; at 20
    assert follow(scaler, loads, {"prefill": 0, "decode": 1}) == [(8, 4), (20, 1)]


def test_a_burst_shorter_than_the_delay_and_a_noisy_load_move_nothing():
    assert follow(by_load(upscale_delay_s=3, downscale_delay_s=5), [2, 2, 8, 8, 8, 2, 2, 2],
                  {"prefill": 0, "decode": 1}) == []
    noisy = [4, 3, 4, 2, 4, 3, 1, 4, 4, 3] * 3  # around 2 replicas' worth, dipping below every few seconds
    assert follow(by_load(upscale_delay_s=3, downscale_delay_s=5), noisy, {"prefill": 0, "decode": 2}) == []


def test_the_pool_grows_to_what_was_wanted_throughout_and_shrinks_to_the_most_wanted():
    scaler = by_load(upscale_delay_s=2, downscale_delay_s=2)
    assert follow(scaler, [6, 8, 4], {"prefill": 0, "decode": 1}) == [(2, 2)]  # wanted 3, 4, 2: grows to 2
    scaler = by_load(upscale_delay_s=2, downscale_delay_s=2)
    assert follow(scaler, [0, 3, 0], {"prefill": 0, "decode": 4}) == [(2, 2)]  # wanted 1, 2, 1: shrinks to 2


def test_the_traffic_window_counts_arrivals_and_keeps_the_mix():
    t = Traffic()
    t.started = 0.0
    for i in range(30):  # 3 req/s for 10 s
        t.arrived(100 + i, 64, now=i / 3)
    w = t.window(5.0, now=10.0)
    assert w.rate == pytest.approx(3.0, abs=0.21) and w.mix[-1] == (129, 64)  # (prompt, max_tokens) until one ends
    assert t.window(60.0, now=10.0).rate == pytest.approx(3.0)  # not 30 / 60: the router is 10 s old
    t.finished(100, 17)
    t.finished(120, 0)  # nothing generated: not part of the mix
    assert t.window(5.0, now=10.0, min_done=2).mix[-1] == (129, 64)  # one finished: still what was asked
    t.finished(101, 18)
    assert t.window(5.0, now=10.0, min_done=2).mix == ((100, 17), (101, 18))
    assert t.window(5.0, now=100.0).rate == 0.0
    steady = Traffic(horizon_s=60.0, started=0.0)
    for i in range(200):  # 1 req/s for 200 s, of which it remembers the last 60
        steady.arrived(10, 10, now=float(i))
    assert steady.window(150.0, now=200.0).rate == pytest.approx(1.0, abs=0.02)  # not 60 / 150


@pytest.mark.parametrize("config, says", [
    ({"router": {"autoscale": {"enabled": True}}}, "router.profile"),
    ({"router": {"autoscale": {"enabled": True, "decode": [0, 2], "target_ongoing_requests": 4}}}, "autoscale.decode"),
    ({"router": {"autoscale": {"prefill": [3, 2]}}}, "autoscale.prefill"),
    ({"router": {"autoscale": {"enabled": True, "decode": [2, 3], "target_ongoing_requests": 4}}},
     "decode.replicas=1 is outside"),
    ({"router": {"autoscale": {"enabled": True, "headroom": 0, "target_ongoing_requests": 4}}}, "headroom"),
])
def test_a_config_it_cannot_follow_is_refused_naming_why(config, says):
    with pytest.raises(ValueError, match=says):
        ClusterConfig.from_dict(config)


def test_yaml_reaches_the_autoscale_keys():
    c = ClusterConfig.from_dict({"router": {"autoscale": {"enabled": True, "decode": [1, 3],
                                                          "target_ongoing_requests": 2}}})
    assert c.router.autoscale.decode == (1, 3) and c.router.autoscale.target_ongoing_requests == 2
    with pytest.raises(ValueError, match="unknown keys.*router.autoscale"):
        ClusterConfig.from_dict({"router": {"autoscale": {"enable": True}}})


def test_a_profile_without_the_pools_configuration_is_named():
    config = cluster().replace(**{"decode.num_threads": 2})
    with pytest.raises(ValueError, match="autoscale.*decode pool.*tp1-threads2"):
        Autoscaler(config, profile())


def test_the_planner_runs_in_another_process_with_the_same_answers():
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as pool:
        there = Autoscaler(cluster(), profile(), executor=pool)
        here = Autoscaler(cluster(), profile())
        for rate in (0.5, 8.0):
            assert there.plan(rate, MIX) == here.plan(rate, MIX)
        assert there.simulations == here.simulations > 0


def test_under_slo_aware_the_planner_sizes_for_the_rule_the_router_has(monkeypatch):
    from planner import simulate as sim
    from router.dispatch import Rule

    def tuned(*args, **kwargs):
        raise AssertionError("an autoscaling simulation tuned slo_aware's rule again")

    monkeypatch.setattr(sim.Tuner, "pick", tuned)
    config = cluster(headroom=1.0).replace(**{"router.dispatch": "slo_aware"})
    scaler = Autoscaler(config, profile())
    mix = MIX * 4  # enough requests for a tuner to pick from, were one asked
    local, remote = scaler.plan(3.0, mix, Rule(threshold=1 << 20)), scaler.plan(3.0, mix, Rule(threshold=0))
    # every prompt prefilled on the decode replicas leaves the prefill pool nothing to do: its fewest replicas
    assert local["prefill"] == 1 and remote["prefill"] >= local["prefill"]
    assert scaler.plan(3.0, mix, Rule(threshold=0)) == remote  # kept per rule
