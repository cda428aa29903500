"""Ctrl-C through the command line: every rank stops at an agreed step and saves one checkpoint, the
run says so in one line, a changed world size or strategy is refused, and resuming reaches the
uninterrupted run's parameters. Its own file beside test_faults.py (whose helpers it uses), so that
`make test`'s two workers (one file each at a time) share the fault runs."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from tests.test_faults import (STEPS, TWO, assert_same_params, finish, side_by_side, start, stop, trained,
                               trained_steps, wait_for)
from tests.test_pipeline import corpus  # noqa: F401  (corpus is a fixture)

pytestmark = pytest.mark.slow  # every test here trains through the command line with two processes


@pytest.mark.parametrize("strategy", ["gtc", "bmuf"])
def test_ctrl_c_saves_a_checkpoint_and_resume_matches_the_uninterrupted_run(corpus, tmp_path, strategy):  # noqa: F811
    data = ("data=synth_tiny", f"data.root={corpus}", f"strategy={strategy}", *TWO)
    ref = tmp_path / "ref"  # trained beside the interrupted run: neither depends on the other
    ref_proc = start("train", *data, f"hydra.run.dir={ref}")
    try:
        ckpt = interrupt(tmp_path / "interrupted", data)
        # a changed world size or strategy is refused before any process starts, in one line (beside the resume)
        refused = ("train", *data, "nodes=1", "strategy=single", f"resume={ckpt}", f"hydra.run.dir={tmp_path / 'x'}")
        resumed = tmp_path / "resumed"
        bad, done = side_by_side(refused, ("train", *data, f"resume={ckpt}", f"hydra.run.dir={resumed}"), timeout=150)
        trained(finish(ref_proc, timeout=150))  # its budget and the others' add up to less than the test's 600 s
    finally:
        stop(ref_proc)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "written by a different run" in bad.stderr and f"strategy={strategy}" in bad.stderr and "nodes=2" in bad.stderr
    trained(done)
    assert json.loads((resumed / "results.json").read_text())["steps"] == STEPS
    assert_same_params(ref / "checkpoints" / "last.ckpt", resumed / "checkpoints" / "last.ckpt")


def interrupt(run: Path, data: tuple[str, ...]) -> Path:
    """Start a run, press Ctrl-C after a few steps, and check its one line; the checkpoint it saved."""
    proc = start("train", *data, f"hydra.run.dir={run}")
    wait_for(lambda: trained_steps(run) >= 3, proc, timeout=120)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: every rank gets SIGINT
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "stopped by Ctrl-C after step" in lines[0] and "Traceback" not in err
    ckpt = run / "checkpoints" / "interrupted.ckpt"
    assert ckpt.is_file() and f"resume={ckpt}" in lines[0]
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < step < STEPS and not (run / "results.json").exists()
    return ckpt
