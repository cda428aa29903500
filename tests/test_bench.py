"""`asrbench bench` end to end on the smoke preset, and the pieces its figures are made of."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asrbench import bench, strategies
from asrbench.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# one codec figure per registered strategy's codec setting (the smoke preset sets GTC's densities)
CODEC_FIGURES = {"codec_gtc_0.1%", "codec_gtc_1%"} | {
    f"codec_{name}_{entry.codec_label(setting)}" for name, entry in strategies.registry().items() if name != "gtc"
    for setting in entry.codec_settings}
CPU_FIGURES = {"sync_step", "gtc_step", *CODEC_FIGURES, "simulated_epoch_gtc_bmuf", "data_wait", "model_cpu"}
GPU_FIGURES = {"gtc_step_gpu", "model_gpu"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """`asrbench bench bench=smoke` through its Hydra app, in a fresh interpreter."""
    out = tmp_path_factory.mktemp("bench")
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    env.pop("ASRBENCH_COMMAND", None)
    code = ("import sys; sys.argv = ['asrbench', 'bench=smoke', 'hydra.run.dir=" + str(out) + "']\n"
            "from asrbench import apps; apps.bench()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| figure | what | ours | peer | ratio | goal | result |" in proc.stdout
    return out


@pytest.mark.slow
def test_bench_json_has_every_figure_with_numeric_ratios(smoke_run):
    results = json.loads((smoke_run / "bench.json").read_text())
    figures = {f["name"]: f for f in results["figures"]}
    assert set(figures) == CPU_FIGURES | GPU_FIGURES
    for name in CPU_FIGURES | (GPU_FIGURES if torch.cuda.device_count() >= 2 else set()):
        f = figures[name]
        assert f["skipped"] is None, name
        for key in ("ours", "peer", "ratio"):
            assert isinstance(f[key], float) and math.isfinite(f[key]) and f[key] > 0, (name, key)
        assert f["ratio"] == statistics.median(a / b for a, b in zip(f["samples"]["ours"], f["samples"]["peer"]))
        assert f["passed"] == (f["ratio"] >= f["goal"] if f["higher_is_better"] else f["ratio"] <= f["goal"])
        assert f["threads"] == 1 and f["repetitions"] == 1
    if not torch.cuda.is_available():
        assert "CUDA" in figures["model_gpu"]["skipped"] and figures["model_gpu"]["ratio"] is None
        assert "CUDA" in figures["gtc_step_gpu"]["skipped"]
    assert figures["sync_step"]["processes"] == 2
    assert "ratio_ddp_again" in figures["sync_step"]["detail"]
    assert 0 < figures["gtc_step"]["detail"]["density"] <= 1
    assert {"host", "versions", "git_commit", "threads"} <= set(results)
    assert results["host"]["cpus"] >= 1 and results["versions"]["torch"] and results["git_commit"]
    assert results["threads"] == {"in_process": 1, "per_worker_process": 1}


@pytest.mark.slow
def test_bench_md_is_the_table_with_machine_threads_and_commit(smoke_run):
    md = (smoke_run / "bench.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| figure")]
    assert len(rows) == len(CPU_FIGURES | GPU_FIGURES)
    results = json.loads((smoke_run / "bench.json").read_text())
    for f in results["figures"]:  # each row's verdict is its figure's ratio against its goal, recomputed here
        (line,) = [row for row in rows if row.startswith(f"| {f['name']} |")]
        if f["skipped"]:
            assert "skipped:" in line
            continue
        met = f["ratio"] >= f["goal"] if f["higher_is_better"] else f["ratio"] <= f["goal"]
        assert line.rstrip().endswith("pass |" if met else "FAIL |"), line
        assert f"| {f['ratio']:.3f} |" in line
    assert "- machine:" in md and "- torch threads: 1" in md and "- git commit:" in md
    assert not list(smoke_run.glob(".bench-data-*"))  # the synthetic shards are removed


def test_sides_alternate_and_the_figure_is_the_median_of_paired_ratios():
    order = []
    samples = bench.alternate({"a": lambda: order.append("a") or 2.0, "b": lambda: order.append("b") or 1.0}, 3)
    assert order == ["a", "b", "b", "a", "a", "b"] and samples == {"a": [2.0] * 3, "b": [1.0] * 3}
    fig = bench.summarize(bench.Figure("x", "", "s", goal=1.02, higher_is_better=False), [3.0, 1.0, 2.0],
                          [1.0, 1.0, 4.0])
    assert (fig.ours, fig.peer, fig.ratio) == (2.0, 1.0, 1.0) and fig.passed is True
    fig.ratio = 1.03
    assert fig.passed is False and fig.goal_text == "<= 1.02"
    assert bench.Figure("y", "", "frames/s", goal=0.95, higher_is_better=True).passed is None


def test_synthetic_features_are_cache_shaped_and_deterministic(tmp_path):
    a = bench.synthetic_features(tmp_path / "a", 6, [8, 12], seed=3)
    b = bench.synthetic_features(tmp_path / "b", 6, [8, 12], seed=3)
    assert len(a) == 6 and a.dim == bench.INPUT_DIM and bool(((a.lengths >= 8) & (a.lengths <= 12)).all())
    assert all(torch.equal(a.feats(i), b.feats(i)) for i in range(6))
    assert a.feats(0).dtype == torch.float32 and a.feats(0).shape == (int(a.lengths[0]), bench.INPUT_DIM)
    assert all(len(t) == n // 4 for t, n in zip(a.texts, a.lengths.tolist()))
    with pytest.raises(ConfigError, match="frames"):
        bench.synthetic_features(tmp_path, 2, [2, 1])


def test_unknown_figures_and_models_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="bench.figures"):
        bench.run({"figures": ["nope"], "threads": 1}, tmp_path)
    with pytest.raises(ConfigError, match="lstm_tiny"):
        bench.model_config("lstm_huge")


def _rank_one_raises(rank: int, world: int, spec: dict) -> int:
    if rank == 1:
        raise RuntimeError("injected")
    return rank


@pytest.mark.slow
def test_a_failing_worker_is_named(tmp_path):
    with pytest.raises(bench.BenchError, match="rank 1 of 2 failed: RuntimeError: injected"):
        bench.run_processes(_rank_one_raises, 2, {}, timeout_s=60)
