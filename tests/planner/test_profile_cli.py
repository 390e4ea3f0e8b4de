"""`pdserve profile` on a tiny checkpoint (the real engine's steps, measured and fitted), `pdserve simulate`
on the profile it wrote (the JSON `pdserve bench` writes, read back by its own report and plots) and
`pdserve plan` over the layouts that profile covers."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from pdserve.bench_report import load_sweep
from pdserve.cli import main
from planner.cost import Profile


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # a pool's engine sets its own


def test_profile_then_simulate(tiny_checkpoints, tmp_path, capsys, torch_threads):
    model, out = str(tiny_checkpoints["llama"]), tmp_path / "profile.json"
    pools = ["--prefill-max-num-batched-tokens", "128", "--decode-max-num-batched-tokens", "128",
             "--decode-max-num-seqs", "16", "--prefill-num-kv-blocks", "64", "--decode-num-kv-blocks", "128"]
    assert main(["profile", "--model", model, "--quick", "--reps", "1", "--out", str(out), *pools]) == 0
    profile = Profile.load(str(out))
    assert list(profile.pools) == ["tp1-threads1-float32-cpu"]  # both pools have one config: measured once
    pool = profile.pools["tp1-threads1-float32-cpu"]
    assert {"dense", "decode", "context", "sampled"} <= set(pool.fit)
    assert pool.step.knots[-1] == 128 and pool.step.sample_knots[-1] == 64  # the prefill pool, measured first
    assert all(p["seconds"] > 0 for p in pool.points)
    # the tiny model's steps are sub-millisecond and noisy on a shared host: a loose bound, which a fit that
    # mixed up its terms (or a model of the wrong shape) still misses by far
    assert pool.fit["dense"]["median_rel_error"] < 0.5 and pool.fit["decode"]["median_rel_error"] < 0.5
    assert "dense" in capsys.readouterr().out
    # and what KV transfer costs here, per backend, for this model's shape (the simulator's kv_gbs)
    gbs = profile.service["kv_gbs"]
    assert set(gbs) == {"ipc", "collective"} and all(v > 0.01 for v in gbs.values())
    from engine.config import ModelConfig

    cfg = ModelConfig.from_hf(json.loads((tiny_checkpoints["llama"] / "config.json").read_text()))
    assert profile.service["kv_layer_bytes"] == 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # K and V, fp32
    # and the router's per-request and per-token costs, measured on a live colocated cluster of the decode pool
    svc, seen = profile.service, profile.service["service_measured"]
    assert all(svc[k] >= 0 for k in ("request_s", "step_s", "token_s")) and 0 < svc["hop_s"] < 0.5
    assert seen["seconds"]["ttft"] >= svc["request_s"] + svc["hop_s"]  # what it was taken from
    # (not that the fit's 16-row step exceeds its 1-row one: the tiny model's sub-millisecond steps are noise-sized,
    # and a quick profile's fit has read them the other way round)
    assert seen["seconds"]["batch"] > 0 and all(v > 0 for v in seen["engine_seconds"].values())

    # another layout's pool joins the same file
    assert main(["profile", "--model", model, "--quick", "--reps", "1", "--out", str(out), "--merge", *pools,
                 "--prefill-replicas", "0", "--decode-num-threads", "2"]) == 0
    assert set(Profile.load(str(out)).pools) == {"tp1-threads1-float32-cpu", "tp1-threads2-float32-cpu"}

    sweep = tmp_path / "sweep.json"
    assert main(["simulate", "--profile", str(out), "--model", model, *pools, "--workload", "fixed",
                 "--prompt-len", "100", "--output-len", "8", "--num-requests", "12", "--sweep", "2,50",
                 "--json", str(sweep), "--label", "sim"]) == 0
    result = load_sweep(str(sweep))
    assert result["label"] == "sim" and [r["rate"] for r in result["runs"]] == [2.0, 50.0]
    assert all(r["completed"] == 12 and r["backend"] == "simulated" for r in result["runs"])
    first, second = result["runs"]
    # its own prefill, and the service's measured costs around it
    alone = pool.step.prefill_seconds(100, 128) + svc["request_s"] + svc["hop_s"] + svc["step_s"] + svc["token_s"]
    assert first["ttft_ms"]["p50"] >= 1e3 * alone * (1 - 1e-9)
    # the sweep's runs share one simulated cluster, as pdserve bench's share a live one: the prompts sent again
    # find their prefixes in the decode replica's cache
    assert second["ttft_ms"]["p50"] < first["ttft_ms"]["p50"]
    assert "goodput" in capsys.readouterr().out
    assert json.loads(sweep.read_text())["profile"] == str(out)

    # slo_aware dispatch in the simulation predicts with the profile simulated on
    assert main(["simulate", "--profile", str(out), "--model", model, *pools, "--workload", "fixed",
                 "--prompt-len", "100", "--output-len", "8", "--num-requests", "12", "--rate", "20",
                 "--dispatch", "slo_aware", "--json", str(tmp_path / "slo.json")]) == 0
    slo_run = json.loads((tmp_path / "slo.json").read_text())
    assert slo_run["completed"] == 12 and sum(slo_run["paths"].values()) == 12

    planned = tmp_path / "plan.json"
    assert main(["plan", "--profile", str(out), "--model", model, *pools, "--devices", "2", "--workload", "fixed",
                 "--prompt-len", "100", "--output-len", "8", "--num-requests", "8", "--ttft-slo", "0.05",
                 "--json", str(planned)]) == 0
    layouts = json.loads(planned.read_text())
    assert {p["layout"] for p in layouts} >= {"colocated 1x(tp1, 2 thr)", "colocated 2x(tp1, 1 thr)",
                                              "1P(tp1, 1 thr) + 1D(tp1, 1 thr), disaggregated"}
    per_device = [p["goodput_per_device"] for p in layouts]
    assert per_device == sorted(per_device, reverse=True) and per_device[0] > 0
    assert layouts[0]["layout"] in capsys.readouterr().out


def test_simulate_names_the_pool_its_profile_lacks(tiny_checkpoints, tmp_path, capsys):
    from planner.cost import PoolProfile, StepModel

    step = StepModel((1, 2), (0.01, 0.02), (1, 2), (0.0, 0.0))
    opts = {"tensor_parallel_size": 1, "num_threads": 1, "dtype": "float32", "device": "cpu"}
    path = tmp_path / "p.json"
    path.write_text(Profile("m", {}, {"tp1-threads1-float32-cpu": PoolProfile(opts, step)}).to_json())
    assert main(["simulate", "--profile", str(path), "--decode-tp", "2", "--num-requests", "2"]) == 2
    err = capsys.readouterr().err
    assert "the decode pool: the profile has no step model for the pool configuration tp2-threads1-float32-cpu" in err
    assert "pdserve profile" in err


def test_service_batch_step_survives_coalesced_chunks():
    """The stream hands a client that fell behind several tokens in one chunk (same arrival time): the batch's step
    is the stretch where all decode over the tokens each got in it, never the zero gap inside a chunk."""
    from pdserve.service_costs import _step_together

    # a token every 10 ms, handed out three at a time (every 30 ms): two of every three gaps are zero
    bunched = [[start + 0.03 * (k // 3) for k in range(60)] for start in (0.1, 0.115)]
    assert statistics.median(b - a for times in bunched for a, b in zip(times, times[1:])) == 0.0
    assert _step_together(bunched) == pytest.approx(0.01, rel=0.1)
    assert _step_together(bunched[:1]) == pytest.approx(0.01, rel=0.1)  # one request alone (service_costs' alone)
    with pytest.raises(RuntimeError, match="never decoded together"):
        _step_together([[0.0, 0.01, 0.02], [0.5, 0.51, 0.52]])
    with pytest.raises(RuntimeError, match="streamed no token"):
        _step_together([[0.0, 0.01, 0.02], []])


def test_service_costs_of_a_pool_that_decodes_one_request_at_a_time(tiny_checkpoints, torch_threads):
    """max_num_seqs 1: no batch can be measured, so token_s is 0 and said to be unmeasured, not a failed profile."""
    from pdserve.config import ClusterConfig, PoolConfig
    from pdserve.service_costs import service_costs
    from planner.cost import StepModel

    config = ClusterConfig(model=str(tiny_checkpoints["llama"]),
                           decode=PoolConfig(max_num_seqs=1, max_num_batched_tokens=128, num_kv_blocks=64))
    step = StepModel((1, 128), (0.001, 0.002), (1, 2), (0.0, 0.0))
    svc = service_costs(config, step, vocab=256, log=lambda line: None)
    assert svc["token_s"] == 0.0 and set(svc["service_measured"]["seconds"]) == {"ttft", "alone"}
    assert set(svc["service_measured"]["engine_seconds"]) == {"ttft", "alone"}
    assert svc["hop_s"] > 0 and svc["service_measured"]["seconds"]["alone"] > 0
