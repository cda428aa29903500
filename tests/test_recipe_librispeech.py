"""recipes/librispeech/run.sh end to end on a tiny tree: all four stages, on CPU, with the user's
overrides reaching every stage."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import TINY_SUBSETS, make_librispeech_tree
from tests.data.corpus_forms import write_kaldi_dir
from tests.test_pipeline import ROOT

TINY = ["model=lstm_tiny", "trainer.max_epochs=1", "batch_size=2", "logger=csv", "features.num_workers=1"]


def run_recipe(root, exp, *overrides: str) -> str:
    env = os.environ | {"WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    env.pop("ASRBENCH_COMMAND", None)
    proc = subprocess.run(["bash", "recipes/librispeech/run.sh", "--root", str(root), "--launcher", "local",
                           "--exp", str(exp), "--workers", "2", "--strategies", "gtc", *TINY, *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for n in range(4):
        assert (exp / f".stage{n}.done").is_file()
    return proc.stdout


def check_runs(exp, stdout):
    single = json.loads((exp / "single" / "results.json").read_text())
    gtc = json.loads((exp / "gtc_n2" / "results.json").read_text())
    assert single["config"]["model"]["name"] == "lstm_tiny" and single["nodes"] == 1
    assert gtc["strategy"] == "gtc" and gtc["nodes"] == 2
    assert set(gtc["eval"]) == {"dev", "test-clean"}  # the user's test_subsets, not the recipe's
    assert (exp / "gtc_n2" / "eval" / "report.md").is_file()
    assert "| single | 1 |" in stdout and "| gtc | 2 |" in stdout  # stage 3's summary table


@pytest.mark.slow
def test_librispeech_recipe_runs_all_stages_on_cpu(tmp_path):
    root = make_librispeech_tree(tmp_path / "corpus", TINY_SUBSETS)
    exp = tmp_path / "exp"
    # the recipe's defaults list test-other too: the user's later word must win in stage 0 as well
    stdout = run_recipe(root, exp, "data.test_subsets=[test-clean]", "features.min_frames=2")
    check_runs(exp, stdout)
    assert json.loads((exp / "single" / "results.json").read_text())["config"]["features"]["min_frames"] == 2
    again = run_recipe(root, exp, "data.test_subsets=[test-clean]", "features.min_frames=2")
    assert again.count("done before, skipped") == 4


@pytest.mark.slow
def test_librispeech_recipe_on_kaldi_data_directories(tmp_path):
    tree = make_librispeech_tree(tmp_path / "corpus", TINY_SUBSETS)
    root = tmp_path / "data"
    for subset in TINY_SUBSETS:
        write_kaldi_dir(tree, subset, root / subset, segments=subset == "train-clean-100")
    exp = tmp_path / "exp"
    stdout = run_recipe(root, exp, "data=kaldi", "data.train_subsets=[train-clean-100]",
                        "data.dev_subsets=[dev-clean]", "data.test_subsets=[test-clean]")
    check_runs(exp, stdout)
    assert json.loads((exp / "single" / "results.json").read_text())["config"]["data"]["kind"] == "kaldi"
