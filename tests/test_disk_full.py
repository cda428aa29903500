"""A full disk while a run writes last.ckpt, interrupted.ckpt (the checkpoint of a stop signal) or
results.json: one line naming the file and the fix, exit 2, no results.json, and on disk either the
previous complete file or none, never an empty or partial one, no temp file.

The disk fills in the writing process: os.fsync (where a real disk reports ENOSPC for data written
to the page cache) or os.replace raises OSError(ENOSPC) for one file's temp file from its n-th write on."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_faults import trained_steps, wait_for
from tests.test_pipeline import ROOT, asrbench, corpus  # noqa: F401  (corpus is a fixture)

pytestmark = pytest.mark.slow  # trains through the command line

COMMON = ("model=lstm_tiny", "batch_size=2", "eval_batch_size=16", "optim.lr=0.004", "logger=none",
          "trainer.enable_progress_bar=false", "accelerator=cpu")
RUN = (*COMMON, "trainer.max_epochs=3")
# Runs `asrbench train` with `call` (os.fsync or os.replace) failing for the temp file of `name` (last.ckpt,
# interrupted.ckpt, results.json: save_atomic's and write_json_atomic's .<name>.XXXX.tmp) from its FAIL_AT-th
# write on.
FULL_DISK = """
import errno, os, sys
call, name, fail_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
real, calls = getattr(os, call), [0]
def full(target, *rest):
    path = os.readlink(f"/proc/self/fd/{target}") if isinstance(target, int) else str(target)  # fsync: a descriptor
    if os.path.basename(path).startswith(f".{name}."):
        calls[0] += 1
        if calls[0] >= fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(target, *rest)
setattr(os, call, full)
from asrbench.cli import main
main(["asrbench", "train", *sys.argv[4:]])
"""


def full_disk_command(call: str, name: str, fail_at: int, *args: str) -> dict:
    env = os.environ | {"WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("ASRBENCH_COMMAND", None)
    return {"args": [sys.executable, "-c", FULL_DISK, call, name, str(fail_at), *args], "cwd": ROOT, "env": env,
            "text": True}


def train_on_a_full_disk(call: str, fail_at: int, *args: str, name: str = "last.ckpt") -> subprocess.CompletedProcess:
    return subprocess.run(**full_disk_command(call, name, fail_at, *args), capture_output=True, timeout=240)


def one_error_line(proc: subprocess.CompletedProcess | subprocess.Popen, err: str) -> str:
    assert proc.returncode == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def no_temp_files(run: Path) -> bool:
    return not list(run.rglob(".*.tmp"))


@pytest.mark.parametrize("cluster, call, fail_at", [
    ("simulated", "replace", 1),  # the first epoch end's write: no last.ckpt before it
    ("simulated", "fsync", 2),    # the second: the first epoch's last.ckpt stays
    ("processes", "replace", 2),  # Lightning's path (AtomicCheckpointIO), one worker
])
def test_a_full_disk_at_last_ckpt_is_one_line_and_leaves_no_partial_file(corpus, tmp_path, cluster, call,  # noqa: F811
                                                                         fail_at):
    run = tmp_path / "run"
    nodes = ("nodes=2", "strategy=gtc") if cluster == "simulated" else ("nodes=1", "strategy=single")
    proc = train_on_a_full_disk(call, fail_at, "data=synth_tiny", f"data.root={corpus}", *RUN, *nodes,
                                f"cluster={cluster}", f"hydra.run.dir={run}")
    line = one_error_line(proc, proc.stderr)
    last = run / "checkpoints" / "last.ckpt"
    assert line.startswith(f"error: {last}: the checkpoint could not be written (No space left on device;")
    assert "free space on that disk" in line
    assert not (run / "results.json").exists()
    assert no_temp_files(run), "the temp file is removed"
    if fail_at == 1:
        assert "none was there before" in line and not last.exists()
    else:
        assert "the previous one is unchanged" in line
        ckpt = torch.load(last, map_location="cpu", weights_only=True)  # whole: the first epoch end's
        per_epoch = 24 // (2 * (2 if cluster == "simulated" else 1))
        assert ckpt["global_step"] == per_epoch and ckpt["state_dict"]


@pytest.mark.parametrize("cluster, call", [
    ("simulated", "fsync"),
    ("processes", "replace"),  # Lightning's path: Checkpointing's stop through AtomicCheckpointIO, one worker
])
def test_a_full_disk_at_interrupted_ckpt_is_one_line_and_leaves_no_partial_file(corpus, tmp_path, cluster,  # noqa: F811
                                                                                call):
    """SIGTERM after the first epoch end: interrupted.ckpt cannot be written, the line names it and the
    last.ckpt of that epoch end, which stays whole."""
    run = tmp_path / "run"
    nodes = ("nodes=2", "strategy=gtc") if cluster == "simulated" else ("nodes=1", "strategy=single")
    per_epoch = 24 // (2 * (2 if cluster == "simulated" else 1))
    args = ("data=synth_tiny", f"data.root={corpus}", *COMMON, "trainer.max_epochs=10", "trainer.log_every_n_steps=1",
            *nodes, f"cluster={cluster}", f"hydra.run.dir={run}")
    proc = subprocess.Popen(**full_disk_command(call, "interrupted.ckpt", 1, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    last = run / "checkpoints" / "last.ckpt"
    wait_for(lambda: last.is_file() and trained_steps(run) > per_epoch, proc, timeout=240)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    line = one_error_line(proc, err)
    stop = run / "checkpoints" / "interrupted.ckpt"
    assert line.startswith(f"error: {stop}: the checkpoint could not be written (No space left on device; none was "
                           f"there before); free space on that disk"), line
    assert f"resume={last}" in line, line  # the checkpoint a resume continues from, once there is space
    assert not stop.exists() and not (run / "results.json").exists()
    assert no_temp_files(run), "the temp file is removed"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # whole: an epoch end's
    assert ckpt["global_step"] % per_epoch == 0 and ckpt["global_step"] >= per_epoch and ckpt["state_dict"]


@pytest.mark.parametrize("cluster, call", [("simulated", "replace"), ("processes", "fsync")])
def test_a_full_disk_at_results_json_is_one_line_and_leaves_no_results(corpus, tmp_path, cluster, call):  # noqa: F811
    """The run trained to its end: results.json cannot be written, the line names it and the fix, and
    neither it nor its temp file is left; last.ckpt, written before it, holds the last step, and
    resume=auto, once the disk has room, writes the results without training again."""
    run = tmp_path / "run"
    nodes = ("nodes=2", "strategy=gtc") if cluster == "simulated" else ("nodes=1", "strategy=single")
    args = ("data=synth_tiny", f"data.root={corpus}", *RUN, *nodes, f"cluster={cluster}", f"hydra.run.dir={run}")
    proc = train_on_a_full_disk(call, 1, *args, name="results.json")
    line = one_error_line(proc, proc.stderr)
    results = run / "results.json"
    assert line.startswith(f"error: {results}: No space left on device; free space on that disk"), line
    assert "checkpoints already written stay valid for resume=" in line, line
    assert not results.exists()
    assert no_temp_files(run), "the temp file is removed"
    per_epoch = 24 // (2 * (2 if cluster == "simulated" else 1))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3 * per_epoch
    assert all(json.loads(p.read_text()) for p in (run / "hyps").glob("*.scores.json"))  # the evaluation's, whole
    asrbench("train", *args, "resume=auto", timeout=240)
    assert json.loads(results.read_text())["steps"] == 3 * per_epoch
