"""A run's console says each fact once, from rank 0; other packages' lines go to the run's log file."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from asrbench.apps import PACKAGE_DIR, on_console

ROOT = Path(__file__).resolve().parents[1]


def _record(name: str, level: int, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_the_console_keeps_asrbench_and_errors_and_leaves_the_rest_to_the_log_file():
    assert on_console(_record("asrbench.strategies.gtc", logging.INFO, "GTC config: tau = %s", 0.001))
    assert not on_console(_record("lightning.pytorch.utilities.rank_zero", logging.INFO, "GPU available: False"))
    assert not on_console(_record("lightning.fabric.utilities.distributed", logging.INFO, "Initializing distributed"))
    assert not on_console(_record("torch.utils.cpp_extension", logging.WARNING, "No CUDA runtime is found"))
    assert on_console(_record("lightning.pytorch.trainer", logging.ERROR, "a failure"))
    assert on_console(_record("torchmetrics", logging.INFO, "x"))  # "torch" names torch and its modules only
    # Python warnings (logging.captureWarnings): raised at a line of asrbench or not.
    assert on_console(_record("py.warnings", logging.WARNING, "%s", f"{PACKAGE_DIR}/strategies/bmuf.py:93: K = 3"))
    assert not on_console(_record("py.warnings", logging.WARNING, "%s", "/site-packages/lightning/x.py:21: deprecated"))


@pytest.mark.slow
def test_a_two_rank_gtc_run_says_its_config_once_and_keeps_third_party_lines_in_its_log(tmp_path,
                                                                                     make_librispeech_tree):
    corpus = make_librispeech_tree(tmp_path / "corpus", {"train-clean-100": (2, 2, 3), "dev-clean": (1, 1, 2),
                                                         "test-clean": (1, 1, 2)}, nested=False)
    run = tmp_path / "run"
    env = os.environ | {"WANDB_MODE": "offline"}
    env.pop("ASRBENCH_COMMAND", None)
    env.pop("PYTHONWARNINGS", None)  # the warnings' routing is part of what is tested
    proc = subprocess.run([sys.executable, "-m", "asrbench.cli", "train", "strategy=gtc", "nodes=2", "batch_size=2",
                           "trainer.max_steps=2", "model=lstm_tiny", "logger=none", "data=librispeech",
                           f"data.root={corpus}", "data.train_subsets=[train-clean-100]", "data.dev_subsets=[dev-clean]",
                           "data.test_subsets=[test-clean]", "trainer.enable_progress_bar=false",
                           f"hydra.run.dir={run}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert console.count("GTC config: tau = ") == 1
    for noise in ("No CUDA runtime", "litlogger", "GPU available", "Initializing distributed", "distributed_backend",
                  "LeafSpec", "sync_dist"):
        assert noise not in console, noise
    logs = {p.name: p.read_text() for p in run.glob("*.log")}
    rank0 = next(text for name, text in logs.items() if "ddp_process" not in name)
    rank1 = next(text for name, text in logs.items() if name.endswith("ddp_process_1.log"))
    assert rank0.count("GTC config: tau = ") == 1 and "GTC config" not in rank1
    assert "litlogger" in rank0 and "Initializing distributed: GLOBAL_RANK: 0" in rank0
    assert "Initializing distributed: GLOBAL_RANK: 1" in rank1
