"""recipes/synth/run.sh (`make demo`) in its smoke form: every stage, every strategy from one shared
start, step budgets, one report with the headline table first and both figures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_pipeline import ROOT


@pytest.mark.slow
def test_demo_recipe_runs_every_stage_with_step_budgets(tmp_path):
    exp = tmp_path / "demo"
    env = os.environ | {"WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "DATA": "synth_tiny",
                        "MODEL": "lstm_tiny", "LOGGER": "csv", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("ASRBENCH_COMMAND", None)
    proc = subprocess.run(["bash", "recipes/synth/run.sh", "--exp", str(exp), "--nodes", "2", "--steps", "8",
                           "--continue-steps", "8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all((exp / f".stage{n}.done").is_file() for n in range(4))
    start = json.loads((exp / "start" / "results.json").read_text())
    assert start["steps"] == 8
    for strategy, nodes, steps in (("single", 1, 32), ("sync", 2, 8), ("gtc", 2, 8), ("bmuf", 2, 8),
                                   ("gtc_bmuf", 2, 8)):
        res = json.loads((exp / strategy / "results.json").read_text())
        assert (res["strategy"], res["nodes"], res["steps"]) == (strategy, nodes, steps)
        assert res["config"]["init_from"] == f"{exp}/start" and res["fer"] is not None
        assert res["config"]["data"]["phone_labels"] is True and res["config"]["data"]["alignments"] is None
        assert res["train_frames"] > 0
    md = (exp / "report" / "report.md").read_text()
    table = md.split("\n## ")[0]  # the headline table comes before any per-split section
    for strategy, nodes in (("single", 1), ("sync", 2), ("gtc", 2), ("bmuf", 2), ("gtc_bmuf", 2)):
        assert f"| {strategy} | {nodes} |" in table
    assert "per speaker" in md
    for png in ("curves.png", "tradeoff.png"):
        assert (exp / "report" / png).stat().st_size > 1000
    history = [json.loads(line) for line in (exp / "gtc" / "metrics.jsonl").read_text().splitlines()]
    assert sum("val/wer" in h for h in history) >= 2 and all("time_s" in h for h in history)
    # run again: every stage is done and skipped
    again = subprocess.run(["bash", "recipes/synth/run.sh", "--exp", str(exp), "--nodes", "2", "--steps", "8",
                            "--continue-steps", "8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    assert again.returncode == 0 and again.stdout.count("done before, skipped") == 4
