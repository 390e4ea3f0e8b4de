"""slo_aware dispatch: the path it takes from the step models and the live load, in the cases where the answer
is plain: no prefill replica, an idle cluster, a busy decode replica, a prefill replica with a long queue, a
decode replica whose running requests a local prefill would push past the TPOT target, both paths missing; and
under a tuned rule (a size threshold, with or without the SLO predictions overriding it)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest

from pdserve.config import PoolConfig
from planner.cost import PoolProfile, Profile, StepModel, pool_key
from router.dispatch import Load, Rule, SloAware

# 5 ms a step and 1 ms a token; sampling and attention free
STEP = StepModel((1, 1000), (0.006, 1.005), (1, 2), (0.0, 0.0))


def policy(ttft=1.0, tpot=0.05, hop=0.0) -> SloAware:
    return SloAware(STEP, STEP, ttft, tpot, decode_budget=256, decode_chunk=256, prefill_chunk=512, hop_s=hop)


def test_without_a_prefill_replica_it_prefills_locally():
    got = policy().decide(100, 50, Load(), prefill_queued=None)
    assert got.local and got.reason == "no_prefill" and math.isinf(got.ttft_remote_s)


def test_an_idle_cluster_prefills_where_the_first_token_comes_sooner():
    got = policy(hop=0.01).decide(100, 50, Load(), prefill_queued=0)
    assert got.local and got.reason == "delay"  # nothing runs on the decode replica: one hop less
    assert got.ttft_remote_s == pytest.approx(0.005 + 0.100 + 2 * 0.01)
    assert got.ttft_local_s == pytest.approx(0.005 + 0.100 + 0.01)


def test_within_both_targets_the_path_that_delays_requests_less_in_all_wins():
    # 20 running decodes: a 200-token prompt locally is one step of 225 ms instead of 25, 200 ms more for each
    # of the 20; remotely, behind 50 queued tokens, the first token is 40 ms later and nobody else waits
    got = policy(ttft=5.0, tpot=1.0, hop=0.01).decide(200, 100, Load(running=20, context=100), prefill_queued=50)
    assert not got.local and got.reason == "delay" and got.ttft_local_s < got.ttft_remote_s


def test_a_long_prefill_queue_keeps_the_prompt_local():
    # 2000 tokens queued ahead on the prefill replica: over 2 s to the first token there
    got = policy().decide(100, 50, Load(running=2, context=100), prefill_queued=2000)
    assert got.local and got.reason == "slo" and got.ttft_remote_s > 1.0 > got.ttft_local_s


def test_running_decodes_a_local_prefill_would_push_past_tpot_send_it_away():
    # 20 decodes at 25 ms a step; a 600-token prompt prefilled locally puts them through three steps of 153-261
    # ms (chunks of the 236 tokens the budget leaves), 0.6 s more over an output of 20 tokens: 55 ms a token
    load = Load(running=20, context=300)
    got = policy(ttft=5.0, tpot=0.05).decide(600, 20, load, prefill_queued=200)
    assert not got.local and got.reason == "slo"
    assert got.tpot_s == pytest.approx(0.025)  # what the running decodes keep
    assert got.ttft_local_s < got.ttft_remote_s  # 200 tokens queued there: local would give the first token sooner
    local = policy(ttft=2.0, tpot=1.0).decide(600, 20, load, prefill_queued=2000)
    assert local.local and local.reason == "slo"  # with room under TPOT, the prefill queue's 2.6 s decides


def test_when_both_miss_as_many_the_earlier_first_token_wins_if_nothing_else_waits():
    got = policy(ttft=0.01).decide(500, 50, Load(), prefill_queued=3000)
    assert got.reason == "delay" and got.local and got.ttft_local_s < got.ttft_remote_s


def test_a_tuned_threshold_decides_where_the_predictions_do_not():
    split = replace(policy(hop=0.01), rule=Rule(threshold=256, override=True))
    # an idle cluster: least delay would keep a 300-token prompt local (one hop less); the size split sends it away
    assert policy(hop=0.01).decide(300, 50, Load(), prefill_queued=0).local
    got = split.decide(300, 50, Load(), prefill_queued=0)
    assert not got.local and got.reason == "tuned"
    # 20 decodes running: least delay sends a 200-token prompt away; under 256 tokens it stays
    busy = Load(running=20, context=100)
    assert not replace(policy(5.0, 1.0, 0.01)).decide(200, 100, busy, prefill_queued=50).local
    got = replace(policy(5.0, 1.0, 0.01), rule=Rule(256)).decide(200, 100, busy, prefill_queued=50)
    assert got.local and got.reason == "tuned"


def test_the_slo_predictions_override_a_tuned_threshold_only_where_the_rule_lets_them():
    # 2000 tokens queued on the prefill replica: a 300-token prompt's first token would come after 2 s there
    load = Load(running=2, context=100)
    got = replace(policy(), rule=Rule(256, override=True)).decide(300, 50, load, prefill_queued=2000)
    assert got.local and got.reason == "slo"
    got = replace(policy(), rule=Rule(256, override=False)).decide(300, 50, load, prefill_queued=2000)
    assert not got.local and got.reason == "tuned" and got.ttft_remote_s > 1.0
    assert str(Rule()) == "least delay" and str(Rule(256, True)) == ("local under 256 tokens, SLO predictions "
                                                                     "override")


def test_load_comes_from_a_stats_poll():
    load = Load.of({"running": 4, "kv_blocks_used": 50, "waiting_prefill_tokens": 70}, block_size=16)
    assert load == Load(running=4, waiting_prefill_tokens=70, context=200)
    # prompts sent there since the poll count as waiting: requests between two polls do not all see one load
    assert Load.of({"waiting_prefill_tokens": 70}, 16, sent_since=30).waiting_prefill_tokens == 100
    assert Load.of({}, 16) == Load()


def test_from_profile_takes_the_pools_step_models_and_the_fitted_costs_or_names_what_is_missing():
    opts = {"tensor_parallel_size": 1, "num_threads": 1, "dtype": "float32", "device": "cpu"}
    key = pool_key(opts)
    profile = Profile("m", {}, {key: PoolProfile(opts, STEP)}, {"hop_s": 0.02, "slowdown": {key: 1.3}})
    pool = PoolConfig(max_num_batched_tokens=256)
    got = SloAware.from_profile(profile, pool, pool, 1.0, 0.1)
    assert (got.hop_s, got.decode_slowdown, got.prefill_slowdown, got.decode_budget) == (0.02, 1.3, 1.3, 256)
    # a prefill pool that starts empty: predicted for where the profile has it (the autoscaler may add replicas)
    assert SloAware.from_profile(profile, PoolConfig(replicas=0, num_threads=1), pool, 1.0, 0.1).prefill is STEP
    assert SloAware.from_profile(profile, PoolConfig(replicas=0, num_threads=2), pool, 1.0, 0.1).prefill is None
    with pytest.raises(ValueError, match="tp1-threads2-float32-cpu"):
        SloAware.from_profile(profile, PoolConfig(num_threads=2), pool, 1.0, 0.1)
    with pytest.raises(ValueError, match="tp1-threads2-float32-cpu"):
        SloAware.from_profile(profile, pool, PoolConfig(num_threads=2), 1.0, 0.1)


def test_the_router_config_names_a_dispatch_it_does_not_know_and_a_missing_profile():
    from pdserve.config import RouterConfig

    with pytest.raises(ValueError, match="dispatch='fastest'; choose one of"):
        RouterConfig(dispatch="fastest")
    with pytest.raises(ValueError, match="set router.profile"):
        RouterConfig(dispatch="slo_aware")
    assert RouterConfig(dispatch="slo_aware", profile="p.json").profile == "p.json"


def test_a_local_prediction_walks_through_at_most_max_predicted_steps():
    # decodes fill the budget (a chunk of 1 token a step) and 4,000 tokens wait: the prediction took 4,000 steps
    # of 256 decodes each on the router's loop (~0.1 s); it widens the chunks instead, and still says "too late"
    from router.dispatch import MAX_PREDICTED_STEPS

    calls = []

    class Counting:
        def step_seconds(self, chunks):
            calls.append(len(chunks))
            return STEP.step_seconds(chunks)

        def prefill_seconds(self, tokens, chunk):
            return STEP.prefill_seconds(tokens, chunk)

    slo = replace(policy(), decode=Counting(), prefill=Counting())
    got = slo.decide(100, 50, Load(running=255, context=100, waiting_prefill_tokens=3900), prefill_queued=0)
    assert len(calls) <= MAX_PREDICTED_STEPS + 1 and got.ttft_local_s > 1.0 and not got.local
    calls.clear()
    slo.decide(100, 50, Load(running=20, context=100, waiting_prefill_tokens=300), prefill_queued=0)
    assert len(calls) == 1 + 2  # the decode-only step, then 400 tokens in chunks of 236: unchanged
