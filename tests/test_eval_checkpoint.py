"""`asrbench eval`/`align` load a run's checkpoint: its own checkpoints/ first, a path results.json
names outside the run dir only if it exists, and a corrupt file is one line naming it, no traceback."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asrbench import apps
from asrbench.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def run_dir(tmp_path: Path, checkpoint: str | None = None) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"config": {"data": {}}, "checkpoint": checkpoint}))
    return run


def noise(seed: int) -> bytes:
    return torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).numpy().tobytes()


# bytes of noise raise UnpicklingError or KeyError in torch's unpickler, an empty file EOFError, a cut zip RuntimeError
@pytest.mark.parametrize("content", [noise(0), noise(1), noise(2), noise(3), b"", b"not a checkpoint", b"PK\x03\x04cut"])
def test_a_corrupt_checkpoint_is_one_line_naming_the_file_and_the_fix(tmp_path, content):
    run = run_dir(tmp_path)
    (run / "checkpoints" / "last.ckpt").write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        apps.load_model(run, json.loads((run / "results.json").read_text()))
    msg = str(err.value)
    assert msg.startswith(f"{run / 'checkpoints' / 'last.ckpt'}: not a loadable asrbench checkpoint")
    assert "re-run training" in msg and "\n" not in msg


def test_the_run_dirs_own_checkpoint_is_preferred_to_the_path_results_json_names(tmp_path):
    elsewhere = tmp_path / "other" / "last.ckpt"
    elsewhere.parent.mkdir()
    torch.save({"state_dict": {}}, elsewhere)
    run = run_dir(tmp_path, str(elsewhere))
    own = run / "checkpoints" / "last.ckpt"
    own.write_bytes(b"x")
    assert apps.checkpoint_of(run, {"checkpoint": str(elsewhere)}) == own
    own.unlink()  # no checkpoint of its own: the named one, which exists, is taken
    assert apps.checkpoint_of(run, {"checkpoint": str(elsewhere)}) == elsewhere
    assert apps.checkpoint_of(run, {}) == own


def test_a_missing_checkpoint_outside_the_run_dir_is_refused(tmp_path):
    run = run_dir(tmp_path)
    gone = tmp_path / "moved_away" / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError) as err:
        apps.checkpoint_of(run, {"checkpoint": str(gone)})
    assert str(err.value) == (f"{run / 'results.json'}: names checkpoint {gone}, outside the run dir and missing; "
                              f"put the run's checkpoint at {run / 'checkpoints' / 'last.ckpt'} or re-run training")
    inside = run / "checkpoints" / "epoch3.ckpt"  # inside the run dir: the ordinary "missing" line
    with pytest.raises(CheckpointError, match="checkpoint missing"):
        apps.load_model(run, {"checkpoint": str(inside)})


def test_eval_of_a_corrupt_checkpoint_exits_2_with_one_line(tmp_path):
    run = run_dir(tmp_path)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"\x80\x02garbage")
    out = subprocess.run([sys.executable, "-m", "asrbench.cli", "eval", f"run={run}",
                          f"hydra.run.dir={tmp_path / 'eval'}"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert "last.ckpt: not a loadable asrbench checkpoint (UnpicklingError)" in line
