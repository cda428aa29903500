"""A full disk while last.ckpt is written: one line naming the file, exit 2, no results.json, and on
disk either the previous complete last.ckpt or none, never an empty or partial one, no temp file.

The disk fills in the writing process: os.fsync (where a real disk reports ENOSPC for data written
to the page cache) or os.replace raises OSError(ENOSPC) for a checkpoint from its n-th write on."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_pipeline import ROOT, corpus  # noqa: F401  (corpus is a fixture)

pytestmark = pytest.mark.slow  # trains through the command line

RUN = ("model=lstm_tiny", "batch_size=2", "eval_batch_size=16", "optim.lr=0.004", "logger=none",
       "trainer.max_epochs=3", "trainer.enable_progress_bar=false", "accelerator=cpu")
# Runs `asrbench train` with `call` (os.fsync or os.replace) failing from the FAIL_AT-th checkpoint write on.
FULL_DISK = """
import errno, os, sys
name, fail_at = sys.argv[1], int(sys.argv[2])
real, calls = getattr(os, name), [0]
def full(target, *rest):
    path = os.readlink(f"/proc/self/fd/{target}") if isinstance(target, int) else str(target)  # fsync: a descriptor
    if ".ckpt." in os.path.basename(path):  # save_atomic's temp file, .last.ckpt.XXXX.tmp
        calls[0] += 1
        if calls[0] >= fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(target, *rest)
setattr(os, name, full)
from asrbench.cli import main
main(["asrbench", "train", *sys.argv[3:]])
"""


def train_on_a_full_disk(call: str, fail_at: int, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("ASRBENCH_COMMAND", None)
    return subprocess.run([sys.executable, "-c", FULL_DISK, call, str(fail_at), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


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
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = run / "checkpoints" / "last.ckpt"
    assert lines[0].startswith(f"error: {last}: the checkpoint could not be written (No space left on device;")
    assert "free space on that disk" in lines[0]
    assert not (run / "results.json").exists()
    assert not list((run / "checkpoints").glob(".*.tmp")), "the temp file is removed"
    if fail_at == 1:
        assert "none was there before" in lines[0] and not last.exists()
    else:
        assert "the previous one is unchanged" in lines[0]
        ckpt = torch.load(last, map_location="cpu", weights_only=True)  # whole: the first epoch end's
        per_epoch = 24 // (2 * (2 if cluster == "simulated" else 1))
        assert ckpt["global_step"] == per_epoch and ckpt["state_dict"]
