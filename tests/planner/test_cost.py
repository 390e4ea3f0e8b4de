"""The step model: its piecewise-linear terms, its features of a batch, its JSON, and the fit that
recovers a known model from the points it generates (the fit's own arithmetic, free of timing noise)."""
from __future__ import annotations

import json

import pytest

from planner.cost import PoolProfile, Profile, StepModel, knot_weights, pool_key, step_features
from planner.profile import Point, fit, plan_points

MODEL = StepModel(knots=(1, 2, 4, 8, 64), dense_s=(0.010, 0.011, 0.012, 0.014, 0.060),
                  sample_knots=(1, 8, 32), sample_s=(0.001, 0.002, 0.006),
                  prefill_pair_s=2e-7, decode_context_s=3e-6)


def test_knot_weights_interpolate_inside_scale_below_and_extend_the_last_segment_past_the_end():
    knots = (1, 2, 4, 8, 64)
    assert knot_weights(knots, 0) == []
    assert knot_weights(knots, 0.5) == [(0, 0.5)]
    assert knot_weights(knots, 2) == [(1, 1.0), (2, 0.0)]
    assert knot_weights(knots, 3) == [(1, 0.5), (2, 0.5)]
    assert knot_weights(knots, 120) == [(3, -1.0), (4, 2.0)]  # the line through (8, .) and (64, .)
    assert MODEL.dense(3) == pytest.approx(0.0115)
    assert MODEL.dense(120) == pytest.approx(0.060 + (0.060 - 0.014))
    assert MODEL.sample(16) == pytest.approx(0.002 + 0.004 * 8 / 24)


def test_step_features_count_prefill_pairs_and_decode_context():
    # a chunk of 4 after 10 cached tokens: 4 queries see 11, 12, 13, 14 tokens; a decode at context 20 reads 21;
    # the chunk ends its prompt (sampled), the decode samples too
    t, s, p, k = step_features([(4, 10, True), (1, 20, True)])
    assert (t, s, p, k) == (5, 2, 11 + 12 + 13 + 14, 21)
    seconds = MODEL.dense(5) + MODEL.sample(2) + 2e-7 * 50 + 3e-6 * 21
    assert MODEL.step_seconds([(4, 10, True), (1, 20, True)]) == pytest.approx(seconds)
    assert MODEL.step_seconds([]) == 0.0
    # a prompt of 100 in chunks of 64: one chunk of 64 from 0, one of 36 after 64 that samples
    assert MODEL.prefill_seconds(100, 64) == pytest.approx(
        MODEL.step_seconds([(64, 0, False)]) + MODEL.step_seconds([(36, 64, True)]))


def test_a_step_model_refuses_knots_that_do_not_increase():
    with pytest.raises(ValueError, match="must increase"):
        StepModel((1, 4, 4), (0.1, 0.2, 0.3), (1, 2), (0.0, 0.0))
    with pytest.raises(ValueError, match="at least two knots"):
        StepModel((1,), (0.1,), (1, 2), (0.0, 0.0))


def test_the_fit_recovers_the_model_that_made_the_points():
    knots, points = plan_points(budget=128, chunk=128, max_seqs=32, capacity=4096, max_len=2048, block_size=16)
    assert knots == [1, 2, 4, 8, 16, 32, 64, 128]
    assert {p.kind for p in points} == {"dense", "context", "sampled", "decode", "mixed"}
    truth = StepModel(tuple(knots), tuple(0.01 + 0.0005 * k for k in knots), (1, 2, 4, 8, 16, 32),
                      (0.001, 0.0011, 0.0013, 0.0016, 0.002, 0.003), 2e-7, 3e-6)
    seconds = [truth.step_seconds(p.chunks) for p in points]
    model, report = fit(knots, points, seconds)
    for p in points + [Point("mixed", ((1, 100, True),) * 7 + ((20, 300, True),))]:
        assert model.step_seconds(p.chunks) == pytest.approx(truth.step_seconds(p.chunks), rel=1e-6)
    assert all(r["max_rel_error"] < 1e-6 for r in report.values())
    assert report["mixed"]["held_out"] and not report["dense"]["held_out"]


def test_a_term_the_data_puts_below_zero_is_dropped_not_kept_negative():
    knots, points = plan_points(budget=64, chunk=64, max_seqs=32, capacity=4096, max_len=2048, block_size=16)
    # steps whose time falls as their prefill context grows: no physical cost does that
    seconds = [0.02 + 0.0001 * step_features(p.chunks)[0] - 1e-9 * step_features(p.chunks)[2] for p in points]
    model, _ = fit(knots, points, seconds)
    assert model.prefill_pair_s == 0.0


def test_a_profile_reads_back_what_it_wrote_and_names_a_version_it_cannot_read(tmp_path):
    opts = {"tensor_parallel_size": 2, "num_threads": 1, "dtype": "float32", "device": "cpu"}
    assert pool_key(opts) == "tp2-threads1-float32-cpu"
    profile = Profile("default", {"cpu": "x"}, {pool_key(opts): PoolProfile(opts, MODEL, {"dense": {}})},
                      {"hop_s": 0.01})
    path = tmp_path / "p.json"
    path.write_text(profile.to_json())
    back = Profile.load(str(path))
    assert back == profile
    path.write_text(json.dumps({**json.loads(profile.to_json()), "version": 99}))
    with pytest.raises(ValueError, match="profile version 99"):
        Profile.load(str(path))
    path.write_text(json.dumps({"version": 1}))
    with pytest.raises(ValueError, match="is not a pdserve profile"):
        Profile.load(str(path))
