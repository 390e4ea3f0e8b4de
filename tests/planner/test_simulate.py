"""The simulator: the real scheduler and block manager on a simulated clock. With a step model whose times
are known, a lone request's latencies are exact sums of its steps and hops; under load every request ends,
every block comes back, and the router's rules (the local-prefill threshold, max_ongoing_requests, waiting
for decode blocks) show in what it reports."""
from __future__ import annotations

from dataclasses import replace

import pytest

from pdserve.bench_report import format_run
from pdserve.config import ClusterConfig, PoolConfig, RouterConfig
from pdserve.workload import Workload, make_requests
from planner.calibrate import Case, calibrate
from planner.cost import PoolProfile, Profile, StepModel, pool_key
from planner.simulate import Service, Simulator, simulate

# every step: 10 ms, plus 1 ms per token in it; sampling and attention free
STEP = StepModel((1, 1000), (0.011, 1.01), (1, 2), (0.0, 0.0))


def profile(threads=(1, 2)) -> Profile:
    pools = {}
    for t in threads:
        opts = {"tensor_parallel_size": 1, "num_threads": t, "dtype": "float32", "device": "cpu"}
        pools[pool_key(opts)] = PoolProfile(opts, STEP)
    return Profile("tiny", {}, pools)


def cluster(prefill: int = 1, decode: int = 1, threshold: int = 0, **router) -> ClusterConfig:
    pool = dict(max_num_batched_tokens=512, num_kv_blocks=256, num_threads=1)
    return ClusterConfig(prefill=PoolConfig(replicas=prefill, **pool), decode=PoolConfig(replicas=decode, **pool),
                         router=RouterConfig(local_prefill_threshold=threshold, **router))


def test_a_lone_disaggregated_request_takes_its_prefill_the_hops_and_one_step_per_token():
    svc = Service(request_s=0.005, hop_s=0.002)
    run = simulate(cluster(), profile(), [([1] * 100, 5)], rate=None, service=svc)
    prefill = STEP.seconds(100, 1, 0, 0)  # one chunk of 100 that samples the first token
    assert run["ttft_ms"]["p50"] == pytest.approx(1e3 * (0.005 + prefill + 0.002))
    # the commit reaches decode a hop after the router got the first token; each decode step (1 token) is 11 ms
    # and its token reaches the client a hop later: the first hop counts once, the second for every token
    assert run["tpot_ms"]["p50"] == pytest.approx(1e3 * (2 * 0.002 + 4 * 0.011) / 4)
    assert run["paths"] == {"disaggregated": 1} and run["completed"] == 1


def test_the_decode_start_waits_for_the_last_layers_kv_at_the_backends_measured_speed():
    # 100 tokens x 1 kB a token-layer at 0.01 GB/s: 10 ms exposed before the commit; the first token is not
    # held (it streams from the prefill), the second is, by exactly that
    svc = Service(request_s=0.005, hop_s=0.002, kv_gbs={"ipc": 0.01, "collective": 0.001}, kv_layer_bytes=1000.0)
    assert svc.kv_exposed_s("ipc", 100) == pytest.approx(0.01) and svc.kv_exposed_s("nccl", 100) == 0.0
    plain = simulate(cluster(), profile(), [([1] * 100, 5)], rate=None, service=Service(request_s=0.005, hop_s=0.002))
    run = simulate(cluster(), profile(), [([1] * 100, 5)], rate=None, service=svc)
    assert run["ttft_ms"]["p50"] == pytest.approx(plain["ttft_ms"]["p50"])
    assert run["tpot_ms"]["p50"] == pytest.approx(plain["tpot_ms"]["p50"] + 1e3 * 0.01 / 4)
    slow = simulate(replace(cluster(), kv_backend="collective"), profile(), [([1] * 100, 5)], rate=None, service=svc)
    assert slow["tpot_ms"]["p50"] == pytest.approx(plain["tpot_ms"]["p50"] + 1e3 * 0.1 / 4)


def test_a_lone_colocated_request_prefills_and_decodes_on_its_decode_replica():
    run = simulate(cluster(prefill=0), profile(), [([1] * 100, 3)], rate=None, service=Service())
    assert run["ttft_ms"]["p50"] == pytest.approx(1e3 * STEP.seconds(100, 1, 0, 0))
    assert run["tpot_ms"]["p50"] == pytest.approx(11.0)
    assert run["paths"] == {"local": 1}


def test_the_threshold_sends_short_prompts_to_the_decode_replica_and_long_ones_to_prefill():
    requests = [([1 + i] * 20, 4) for i in range(5)] + [([100 + i] * 300, 4) for i in range(3)]
    run = simulate(cluster(threshold=100), profile(), requests, rate=4.0, service=Service())
    assert run["paths"] == {"local": 5, "disaggregated": 3}


def test_under_load_every_request_ends_and_every_block_comes_back():
    requests = make_requests(Workload("longtail"), 60, seed=3, vocab=1000, max_len=2048)
    sim = Simulator(cluster(prefill=2, decode=2, threshold=64), profile(), Service(hop_s=0.001))
    from pdserve.workload import arrival_times

    reqs = sim.run(requests, arrival_times(len(requests), 20.0, 0))
    assert all(len(r.times) == r.output_len for r in reqs)
    for r in (*sim.prefill, *sim.decode):
        bm = r.actor.block_manager
        assert bm.num_free_blocks == bm.num_blocks, r.name
        assert not r.actor.scheduler.has_unfinished() and not r.actor.owner
        assert r.in_flight == 0 and r.queued_tokens == 0
    assert {r.decode.name for r in reqs} == {"decode/0", "decode/1"}
    assert {r.prefill.name for r in reqs if r.prefill} == {"prefill/0", "prefill/1"}


def test_max_ongoing_requests_queues_the_rest_in_arrival_order():
    requests = [([1 + i] * 50, 2) for i in range(4)]
    one = simulate(cluster(prefill=0, max_ongoing_requests=1), profile(), requests, rate=None, service=Service())
    four = simulate(cluster(prefill=0, max_ongoing_requests=4), profile(), requests, rate=None, service=Service())
    # one at a time: the last starts when three have ended
    assert one["ttft_ms"]["p99"] > 3 * 1e3 * STEP.seconds(50, 1, 0, 0)
    assert four["ttft_ms"]["p99"] < one["ttft_ms"]["p99"]


def test_requests_wait_for_decode_blocks_and_still_all_finish():
    # 16 blocks of 16 tokens: one request of 200 + 40 tokens holds 15, so they go one at a time
    cfg = cluster().replace(**{"decode.num_kv_blocks": 16})
    requests = [([1 + i] * 200, 40) for i in range(3)]
    run = simulate(cfg, profile(), requests, rate=None, service=Service())
    assert run["completed"] == 3
    assert run["ttft_ms"]["p99"] > 2 * 40 * 11  # the third waited for two decodes of 40 tokens


def test_a_pool_the_profile_lacks_is_named():
    with pytest.raises(ValueError, match="the decode pool: the profile has no step model for the pool configuration "
                                         "tp1-threads2"):
        simulate(cluster(prefill=0).replace(**{"decode.num_threads": 2}), profile(threads=(1,)), [([1] * 10, 2)],
                 None, service=Service())


def test_the_run_is_the_dict_pdserve_bench_writes():
    run = simulate(cluster(), profile(), [([1] * 30, 4)] * 3, rate=2.0, service=Service())
    for key in ("num_requests", "completed", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "slo", "paths", "rate"):
        assert key in run
    assert "TTFT" in format_run(run)


def test_calibration_recovers_the_service_that_made_the_measurements():
    truth = Service(hop_s=0.02, step_s=0.002, token_s=0.0005, slowdown={"tp1-threads1-float32-cpu": 1.2})
    requests = make_requests(Workload("fixed", 200, 30), 24, seed=0, vocab=1000, max_len=2048)
    cases = []
    for threshold in (0, 1000):
        cfg = cluster(threshold=threshold)
        runs = [simulate(cfg, profile(), requests, rate, service=truth) for rate in (2.0, 6.0)]
        cases.append(Case(cfg, requests, {"runs": runs}))
    start = simulate(cases[0].config, profile(), requests, 6.0, service=Service())
    assert start["tpot_ms"]["p50"] < 0.8 * cases[0].runs[1]["tpot_ms"]["p50"]  # uncalibrated: far off
    measured = {"kv_gbs": {"ipc": 5.0}, "kv_layer_bytes": 64.0}  # what `pdserve profile` measured stays as it was
    fitted, rows = calibrate(replace(profile(), service=measured), cases)
    # slowdown x step and token_s x sampled rows nearly coincide on decode steps (tokens = rows), so the grid
    # may trade one for the other; the hop and what the runs show must come back
    assert fitted.hop_s == truth.hop_s
    assert (fitted.kv_gbs, fitted.kv_layer_bytes) == (measured["kv_gbs"], measured["kv_layer_bytes"])
    assert set(fitted.slowdown) == {"tp1-threads1-float32-cpu"}
    for row in rows:
        for key, value in row.items():
            if key != "rate":
                measured, simulated = value
                assert simulated == pytest.approx(measured, rel=0.05), (row["rate"], key)


def test_slo_aware_dispatch_runs_in_the_simulator_as_in_the_router():
    # a burst of long prompts: the prefill replica's queue soon holds more than the TTFT target, and the
    # prompts behind it are better off prefilled on the decode replica
    cfg = cluster().replace(**{"router.dispatch": "slo_aware", "router.profile": "unused: the simulator's",
                               "router.ttft_slo_s": 1.0, "router.tpot_slo_s": 0.5})
    requests = [([1 + i] * 300, 8) for i in range(12)]
    sim = Simulator(cfg, profile(), Service(hop_s=0.002))
    from planner.simulate import results

    reqs = sim.run(requests, [0.05 * i for i in range(12)])
    assert all(len(r.times) == 8 for r in reqs)
    reasons = {(r.local, r.prediction.reason) for r in reqs}
    assert (True, "slo") in reasons and any(not local for local, _ in reasons), reasons
    assert {res.server["dispatch_reason"] for res in results(reqs)} <= {"slo", "delay"}


def test_the_prefill_pools_scheduling_policy_orders_a_burst_on_the_simulated_clock():
    # one prompt prefills at a time (a 100-token budget, 112 ms a prompt); the first starts alone as it arrives, then
    # lof orders the rest by the request's output, as a prefill replica does, and max_queue_wait_s counts simulated
    # seconds: at 0.15 s the two still waiting when the second ends (at 0.224 s) go in arrival order
    requests = [([1 + i] * 100, n) for i, n in enumerate((5, 20, 50, 35))]

    def prefill_order(**pool) -> list[int]:
        cfg = cluster().replace(**{"prefill.max_num_batched_tokens": 100,
                                   **{f"prefill.{k}": v for k, v in pool.items()}})
        reqs = Simulator(cfg, profile(), Service()).run(requests, [0.0] * len(requests))
        return [r.output_len for r in sorted(reqs, key=lambda r: r.prefilled_at)]

    assert prefill_order() == [5, 20, 50, 35]
    assert prefill_order(scheduling_policy="lof") == [5, 50, 35, 20]
    assert prefill_order(scheduling_policy="lof", max_queue_wait_s=0.15) == [5, 50, 20, 35]
