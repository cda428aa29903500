"""Time to target (MLPerf's time-to-train on the cost model) and the Pareto front of the comparison."""
from __future__ import annotations

import math

import pytest

from asrbench import report

HISTORY = [{"step": 10, "train/loss": 2.0}, {"step": 100, "val/wer": 0.80}, {"step": 200, "val/wer": 0.52},
           {"step": 300, "val/wer": 0.49}, {"step": 400, "val/wer": 0.51}]


def test_time_to_target_is_the_first_validation_at_or_below_the_target_times_the_step_time():
    assert report.time_to_target(HISTORY, 0.5, 0.52) == {"steps": 200, "projected_s": 100.0}
    assert report.time_to_target(HISTORY, 0.5, 0.50) == {"steps": 300, "projected_s": 150.0}
    assert report.time_to_target(HISTORY, 0.5, 0.40) is None  # never reached
    assert report.time_to_target(HISTORY, None, 0.9) is None  # no step time: nothing projected


def test_the_target_is_the_baselines_final_dev_wer_within_a_margin():
    baseline = {"eval": {"dev": {"wer": 0.49}}}
    row = report.add_time_to_target({"predicted_step_s": 2.0, "steps": 400}, HISTORY, baseline, 0.05)
    assert row["target_dev_wer"] == pytest.approx(0.5145)
    assert row["time_to_target_s"] == 600.0 and row["time_to_target_steps"] == 300  # 0.49 <= 0.5145; 0.52 is not
    assert row["projected_train_s"] == 800.0
    base_row = report.add_time_to_target({"predicted_step_s": 1.0, "steps": 400}, HISTORY, baseline, 0.0)
    assert base_row["time_to_target_s"] == 300.0  # the baseline reaches its own final WER by its last validation


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    points = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0), (2.0, 3.0)]
    assert report.pareto_front(points) == [0, 1, 3, 4]  # (3, 4) is beaten by (2, 3); ties both stay


def test_plot_pareto_draws_both_panels(tmp_path):
    points = [{"label": "gtc x4", "rel_wer": 0.01, "rel_wer_low": -0.01, "rel_wer_high": 0.03,
               "bytes_sent_per_worker_per_step": 1e4, "projected_train_s": 30.0},
              {"label": "sync x4", "rel_wer": -0.02, "bytes_sent_per_worker_per_step": 1e6, "projected_train_s": 60.0},
              {"label": "bad", "rel_wer": math.nan}]
    path = report.plot_pareto(points, tmp_path / "pareto.png")
    assert path is not None and path.stat().st_size > 10_000
