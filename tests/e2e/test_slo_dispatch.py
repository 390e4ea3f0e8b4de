"""router.dispatch "slo_aware" in a real cluster (the tiny model, its profile measured here): the same tokens
as the offline engine on whichever path each prompt took, every request's Timings and the router's metrics say
where it prefilled, why, and what was predicted; and once it has seen enough traffic, the supervisor's tuner
hands the router the rule the simulator picked for it, and the metrics show it."""
from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from pdserve import Client
from pdserve.launch import start_cluster
from planner.profile import profile_config
from tests.e2e.conftest import small_cluster
from tests.kv_transfer.test_shm_transfer import prompts_of


@pytest.fixture(scope="module")
def profile_path(tiny_model, tmp_path_factory):
    threads = torch.get_num_threads()
    profile = profile_config(small_cluster(tiny_model), reps=1, quick=True, log=lambda msg: None)
    torch.set_num_threads(threads)  # the pool's engine set its own
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    path.write_text(profile.to_json())
    return str(path)


def test_slo_aware_dispatch_serves_exact_tokens_and_says_why(ray_local, tiny_model, profile_path) -> None:
    prompts = prompts_of([5, 40, 120, 300], seed=3)
    with LLM(tiny_model, max_num_batched_tokens=128, num_kv_blocks=256) as llm:
        want = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24,
                                                                           ignore_eos=True))]
    config = small_cluster(tiny_model, dispatch="slo_aware", profile=profile_path, ttft_slo_s=2.0, tpot_slo_s=0.5,
                           local_prefill_threshold=0,  # no short-tail rule: every prompt as slo_aware decides
                           dispatch_retune_s=1.0)
    with start_cluster(config, progress=None) as cluster, Client(cluster.address, timeout=120) as client:
        got = [client.generate(p, temperature=0, max_tokens=24, ignore_eos=True) for p in prompts]
        assert {g.timings["dispatch_reason"] for g in got} <= {"slo", "delay"}  # the rule before any traffic
        traffic = [client.generate(p, temperature=0, max_tokens=8, ignore_eos=True)  # for the tuner to pick from
                   for p in prompts_of([16, 60, 200, 400] * 8, seed=4)]
        tuner, deadline = cluster.supervisor.tuner, time.monotonic() + 120
        while tuner.last is None and time.monotonic() < deadline:
            time.sleep(0.5)
        rule = tuner.last
        assert rule is not None and cluster.server.router.slo_aware.rule == rule
        assert type(tuner.answers.executor).__name__ == "ProcessPoolExecutor"  # its simulations off the router's GIL
        again = [client.generate(p, temperature=0, max_tokens=24, ignore_eos=True) for p in prompts]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{cluster.server.metrics_port}/metrics").read().decode()
    assert [g.token_ids for g in got] == want and [g.token_ids for g in again] == want
    said = {line.split("{")[0]: float(line.split()[-1]) for line in metrics.splitlines()
            if line.startswith("pdserve_dispatch_rule_")}
    assert said == {"pdserve_dispatch_rule_threshold_tokens": -1 if rule.threshold is None else rule.threshold,
                    "pdserve_dispatch_rule_override": float(rule.override or rule.threshold is None)}
    if rule.threshold is not None:  # under a size split, a prompt goes the way its size says unless an SLO says not
        for p, g in zip(prompts, again):
            assert g.timings["dispatch_reason"] == "slo" or (g.timings["path"] == "local") == (len(p) < rule.threshold)
    got = got + traffic + again
    for g in got:
        t = g.timings
        assert t["dispatch_reason"] in ("slo", "delay", "tuned"), t
        assert t["predicted_ttft_ms"] > 0 and t["predicted_tpot_ms"] >= 0
    # the router counts each request under the path it took and the reason it gave
    counted = {}
    for line in metrics.splitlines():
        if line.startswith("pdserve_dispatch_total{"):
            labels = dict(kv.split("=") for kv in line[line.index("{") + 1:line.index("}")].split(","))
            counted[labels["path"].strip('"'), labels["reason"].strip('"')] = float(line.split()[-1])
    want_counts = {}
    for g in got:
        key = (g.timings["path"], g.timings["dispatch_reason"])
        want_counts[key] = want_counts.get(key, 0) + 1
    assert counted == want_counts


def test_slo_aware_without_a_profile_of_the_pools_fails_before_anything_starts(tiny_model, tmp_path) -> None:
    from planner.cost import Profile

    path = tmp_path / "empty.json"
    path.write_text(Profile(tiny_model, {}, {}).to_json())
    config = small_cluster(tiny_model, dispatch="slo_aware", profile=str(path))
    with pytest.raises(ValueError, match="slo_aware.: the profile has no step model for the pool configuration tp1"):
        start_cluster(config, progress=None)
    with pytest.raises(ValueError, match="set router.profile"):
        small_cluster(tiny_model, dispatch="slo_aware")


def test_auto_dispatch_runs_slo_aware_on_a_profile_measured_at_start(ray_local, tiny_model, tmp_path,
                                                                      monkeypatch) -> None:
    """router.profile "measure": a quick profile of the pools, measured in a process of its own before the replicas
    start and kept for the next start of the same pools; with it the default dispatch (auto) is slo_aware, and
    the tokens are the offline engine's."""
    from pdserve.launch import _profile_key, measure_profile
    from planner.cost import Profile

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    prompts = prompts_of([5, 120], seed=6)
    with LLM(tiny_model, max_num_batched_tokens=128, num_kv_blocks=256) as llm:
        want = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8,
                                                                           ignore_eos=True))]
    config = small_cluster(tiny_model, profile="measure", local_prefill_threshold=0, dispatch_retune_s=0)
    assert config.router.dispatch == "auto" and config.router.policy == "slo_aware"
    with start_cluster(config, progress=None) as cluster, Client(cluster.address, timeout=120) as client:
        measured = cluster.config.router.profile
        got = [client.generate(p, temperature=0, max_tokens=8, ignore_eos=True) for p in prompts]
        assert cluster.server.router.slo_aware is not None
    assert [g.token_ids for g in got] == want
    assert {g.timings["dispatch_reason"] for g in got} <= {"slo", "delay"}
    assert list(Profile.load(measured).pools) == ["tp1-threads1-float32-cpu"]  # both pools' one configuration
    assert measure_profile(config) == (tmp_path / "pdserve" / "profiles" / Path(measured).name, True)  # reused
    other = config.replace(**{"decode.max_num_seqs": 8})  # other pools: another profile
    assert _profile_key(other) != _profile_key(config) == Path(measured).stem
