"""Output directories that cannot take a run (a file in the way, read-only, full) and disk faults
while writing: one line each, nothing half-written."""
from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from asrbench import checkpoint, cli, runinfo
from asrbench.errors import CheckpointError
from tests.test_pipeline import asrbench


def test_output_root_reads_the_overrides():
    assert cli.output_root("train", []) == "outputs"
    assert cli.output_root("train", ["-m", "nodes=2,4"]) == "multirun"
    assert cli.output_root("train", ["hydra.run.dir=/x/y/${now:%H}_z"]) == "/x/y/"
    assert cli.output_root("eval", ["run=/runs/a"]) == "/runs/a"
    assert cli.output_root("train", ["-m", "hydra.sweep.dir=/s", "hydra.run.dir=/r"]) == "/s"


def test_a_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    msg = cli.check_output_dir(str(tmp_path / "f" / "run"))
    assert "is a file, not a directory" in msg and str(tmp_path / "f") in msg
    assert cli.check_output_dir(str(tmp_path / "new" / "deeper")) is None


def test_read_only_and_full(tmp_path, monkeypatch):
    import shutil
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    assert "cannot write in" in cli.check_output_dir(str(tmp_path)) and "Read-only" in cli.check_output_dir(str(tmp_path))
    monkeypatch.undo()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 99, 2**20))
    assert "only 1 MiB free" in cli.check_output_dir(str(tmp_path))


def test_cli_refuses_unwritable_output_before_starting(tmp_path):
    (tmp_path / "f").write_text("x")
    for target, expected in ((tmp_path / "f" / "run", "is a file"), ("/sys/asrbench-run", "cannot write in /sys")):
        proc = asrbench("train", f"hydra.run.dir={target}", check=False)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
        assert proc.stderr.startswith("error: ") and proc.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("code,advice", [(errno.ENOSPC, "free space on that disk"), (errno.EROFS, "make it writable")])
def test_disk_faults_are_one_line(capsys, code, advice):
    from asrbench.apps import user_errors

    @user_errors
    def job(cfg):
        raise OSError(code, os.strerror(code), "/runs/x/results.json")

    with pytest.raises(SystemExit) as exit_info:
        job(None)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: /runs/x/results.json: ") and advice in err and "hydra.run.dir" in err
    assert err.strip().count("\n") == 0


def test_other_os_errors_keep_their_traceback():
    from asrbench.apps import user_errors

    @user_errors
    def job(cfg):
        raise OSError(errno.ECONNREFUSED, "refused")

    with pytest.raises(OSError):
        job(None)


def test_results_are_never_half_written_on_a_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    runinfo.write_json_atomic(target, {"old": 1})

    def full(obj, f, **kw):
        f.write('{"partial": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", full)
    with pytest.raises(OSError):
        runinfo.write_json_atomic(target, {"new": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind


def _ident(**kw):
    base = {"strategy": "gtc", "nodes": 4, "model": {"hidden_size": 8, "num_layers": 1, "proj_size": 0,
                                                     "dropout": 0.0}, "criterion": "ctc", "input_dim": 6, "format": 1}
    return base | kw


def test_init_from_copies_weights_and_checks_the_model(tmp_path):
    from asrbench.model.module import AcousticModule

    ident = _ident()
    src = AcousticModule(6, {"name": "m", **ident["model"]}, {"name": "adam", "lr": 1e-3})
    path = tmp_path / "a.ckpt"
    torch.save({"state_dict": src.state_dict(), "global_step": 7, checkpoint.KEY: ident}, path)
    dst = AcousticModule(6, {"name": "m", **ident["model"]}, {"name": "adam", "lr": 1e-3})
    assert not torch.equal(dst.model.output.weight, src.model.output.weight)
    # any strategy and worker count may start from it
    checkpoint.load_initial_weights(dst, path, _ident(strategy="bmuf", nodes=128))
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="init_from needs the same model"):
        checkpoint.load_initial_weights(dst, path, _ident(model={**ident["model"], "hidden_size": 9}))
    with pytest.raises(CheckpointError, match="init_from=.*no such checkpoint"):
        checkpoint.load_initial_weights(dst, tmp_path / "none.ckpt", ident)


def test_check_resume_compares_identity(tmp_path):
    path = tmp_path / "a.ckpt"
    torch.save({"state_dict": {}, checkpoint.KEY: _ident()}, path)
    assert checkpoint.check_resume(path, _ident()) == path
    with pytest.raises(CheckpointError, match=r"nodes=4 \(this run: 8\)"):
        checkpoint.check_resume(path, _ident(nodes=8))


def test_last_checkpoint_is_named(tmp_path):
    assert "no checkpoint was written yet" in checkpoint.describe_last_checkpoint(tmp_path / "none")
    torch.save({"state_dict": {}, "global_step": 12}, tmp_path / "last.ckpt")
    text = checkpoint.describe_last_checkpoint(tmp_path)
    assert "(step 12)" in text and f"resume={tmp_path / 'last.ckpt'}" in text


def test_json_written_atomically_takes_the_umasks_mode_not_mkstemps(tmp_path):
    """results.json (runinfo.write_json_atomic) is readable by the run's group and others as a plain open()
    would make it under this umask; mkstemp alone gives 0600."""
    import os
    import stat

    from asrbench import runinfo

    old = os.umask(0o027)
    try:
        runinfo.write_json_atomic(tmp_path / "results.json", {"wer": 0.5})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o640
    assert json.loads((tmp_path / "results.json").read_text()) == {"wer": 0.5}


def test_a_torchrun_restart_or_a_slurm_requeue_counts_as_resume_auto(tmp_path, monkeypatch):
    """checkpoint.restarts names who started the process again; experiment.resume_checkpoint then takes the
    run dir's newest checkpoint as resume=auto does (none here: a fresh start), and without a restart nothing."""
    from omegaconf import OmegaConf

    from asrbench import checkpoint, experiment

    for key in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    assert checkpoint.restarts() == ("", 0)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert checkpoint.restarts() == ("SLURM requeue", 2) and checkpoint.restart_count() == 2
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert checkpoint.restarts() == ("torchrun restart", 1)
    seen = []
    monkeypatch.setattr(checkpoint, "auto_resume", lambda run_dir, ident: seen.append(run_dir))
    assert experiment.resume_checkpoint(OmegaConf.create({"resume": None}), tmp_path, {}) is None
    assert seen == [tmp_path]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert experiment.resume_checkpoint(OmegaConf.create({"resume": None}), tmp_path, {}) is None and len(seen) == 1
