"""Profiles on paper (planner/roofline.py): a step's time is the roofline of the spec sheet with the fitted
efficiencies, the bound switching from memory to compute where the arithmetic says; the fit reproduces
TensorRT-LLM's published figures; a TP degree whose weights do not fit is left out, and the KV room grows
with TP; `pdserve profile --paper` writes a profile that `pdserve plan` sizes GPU pools with."""
from __future__ import annotations

import json
import statistics

import pytest

from pdserve.cli import main
from pdserve.config import ClusterConfig
from planner.cost import Profile
from planner.plan import kv_sized
from planner.roofline import (
    H100,
    H200,
    LLAMA31_8B,
    LLAMA31_70B,
    Efficiency,
    Roofline,
    calibrate,
    gpu_config,
    paper_profile,
    predictions,
)

EFF = Efficiency(matmul=0.7, memory=0.8, attention=0.5, layer_overhead_s=100e-6, allreduce_latency_s=10e-6)


def test_a_decode_step_reads_the_weights_and_a_long_chunk_is_compute_bound():
    r = Roofline(LLAMA31_8B, H100, 1, "bfloat16", EFF)
    n = LLAMA31_8B.layer_params
    assert 6.9e9 < n < 7.0e9  # Llama-3.1-8B: 8.03B, less the 1.05B of embedding and LM head
    overhead = 32 * 100e-6
    assert r.dense(1) == pytest.approx(overhead + 2 * n / (0.8 * 3.35e12))  # the weights' bytes over bandwidth
    assert r.dense(8192) == pytest.approx(overhead + 2 * n * 8192 / (0.7 * 989e12))  # the FLOPs over the peak
    knee = 0.7 * 989e12 / (0.8 * 3.35e12)  # tokens a step where one bound meets the other (2 bytes, 2 FLOPs)
    assert r.dense(knee * 0.9) == pytest.approx(r.dense(1)) and r.dense(knee * 1.1) > r.dense(1)
    # decode attention: each context token's K and V of 8 KV heads, 128 wide, 32 layers, bf16
    assert r.decode_context_s == pytest.approx(2 * 32 * 8 * 128 * 2 / (0.8 * 3.35e12))
    assert Roofline(LLAMA31_8B, H200, 1, "bfloat16", EFF).dense(1) < r.dense(1)  # the H200's faster memory


def test_tensor_parallelism_splits_the_work_and_adds_all_reduces():
    one, four = (Roofline(LLAMA31_70B, H100, tp, "bfloat16", EFF) for tp in (1, 4))
    assert four.dense(8192) < one.dense(8192) / 3  # a quarter of the FLOPs a rank, plus the all-reduces
    assert four.dense(8192) > one.dense(8192) / 4
    assert four.prefill_pair_s == pytest.approx(one.prefill_pair_s / 4)


def test_a_tp_degree_whose_weights_do_not_fit_is_left_out_and_kv_room_grows_with_tp():
    on_h100 = paper_profile(LLAMA31_70B, H100, (1, 2, 4, 8), eff=EFF)
    # 141 GB of bf16 weights: not on one 80 GB GPU, and on two ~3 GB are left, ~10k tokens of KV: too few
    assert sorted(p.options["tensor_parallel_size"] for p in on_h100.pools.values()) == [4, 8]
    on_h200 = paper_profile(LLAMA31_70B, H200, (1, 2, 4, 8), eff=EFF)
    assert sorted(p.options["tensor_parallel_size"] for p in on_h200.pools.values()) == [2, 4, 8]
    rooms = [p.fit["kv_tokens"] for p in on_h100.pools.values()]
    assert rooms == sorted(rooms) and rooms[0] > 0
    base = gpu_config(ClusterConfig(), on_h100)
    colocated = base.replace(**{"prefill.replicas": 0})
    blocks = [kv_sized(colocated.replace(**{"decode.tensor_parallel_size": tp}), on_h100).decode.num_kv_blocks
              for tp in (4, 8)]
    assert blocks == sorted(blocks) and blocks[0] > 1000
    assert base.decode.device == "cuda" and base.decode.dtype == "bfloat16"


def test_the_fit_reproduces_the_published_figures():
    eff = calibrate()
    errors = [abs(r["predicted"] / r["published"] - 1) for r in predictions(eff)]
    assert statistics.median(errors) < 0.12, predictions(eff)
    assert 0.3 < eff.matmul <= 0.9 and 0.5 < eff.memory <= 0.9  # what hardware allows
    default = [abs(r["predicted"] / r["published"] - 1) for r in predictions(Efficiency())]
    assert sum(e * e for e in errors) < sum(e * e for e in default)


def test_pdserve_profile_paper_and_plan_size_gpu_pools(tmp_path, capsys):
    out = tmp_path / "h200.json"
    assert main(["profile", "--paper", "llama-3.1-8b", "--gpu", "h200", "--out", str(out)]) == 0
    profile = Profile.load(str(out))
    assert profile.host["gpu"] == "H200-SXM" and "tp1-threads1-bfloat16-cuda" in profile.pools
    capsys.readouterr()
    plan = tmp_path / "plan.json"
    assert main(["plan", "--profile", str(out), "--devices", "2", "--workload", "fixed", "--prompt-len", "512",
                 "--output-len", "64", "--num-requests", "40", "--seconds", "1", "--ttft-slo", "0.5",
                 "--tpot-slo", "0.05", "--json", str(plan)]) == 0
    found = json.loads(plan.read_text())
    assert {f["layout"] for f in found} >= {"colocated 1x(tp1, 1 thr)", "colocated 1x(tp2, 1 thr)",
                                            "1P(tp1, 1 thr) + 1D(tp1, 1 thr), disaggregated"}
    assert found[0]["goodput_rps"] > 5  # an H200 serves an 8B model's 512/64 requests at several per second
    assert found[0]["goodput_per_device"] == max(f["goodput_per_device"] for f in found)
