"""Faults through the command line: Ctrl-C saves a checkpoint, a killed worker names the rank and
the last checkpoint, resuming reaches the uninterrupted run's parameters, and bad checkpoints or
output directories give one line each."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_pipeline import ROOT, asrbench, corpus  # noqa: F401  (corpus is a fixture)

pytestmark = pytest.mark.slow  # every test here trains through the command line, most with two processes

STEPS = 60  # 10 epochs of 24 utterances, 2 workers x 2 utterances per step
COLLECTIVE_TIMEOUT_S = 60  # the runs' collective_timeout_s
ANSWER_WAIT_S = 3  # asrbench.strategies.comm.collective_error's wait for every peer to answer
EXIT_ALLOWANCE_S = 30  # rank 0 writing its error and the launcher tearing down, on a loaded machine
TWO = ("model=lstm_tiny", "batch_size=2", "eval_batch_size=16", "optim.lr=0.004", "logger=csv",
       "trainer.max_epochs=10", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
       "accelerator=cpu", "nodes=2", f"collective_timeout_s={COLLECTIVE_TIMEOUT_S}")


def start(*args: str) -> subprocess.Popen:
    env = os.environ | {"WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("ASRBENCH_COMMAND", None)
    return subprocess.Popen([sys.executable, "-m", "asrbench.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)  # every rank: the run is its own session (start()), rank 1 included
            proc.wait(10)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def trained_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return max((r.get("step", 0) for r in rows if "train/loss" in r), default=0)


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def params(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_params(a: Path, b: Path) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("strategy", ["gtc", "bmuf"])
def test_ctrl_c_saves_a_checkpoint_and_resume_matches_the_uninterrupted_run(corpus, tmp_path, strategy):  # noqa: F811
    data = ("data=synth_tiny", f"data.root={corpus}", f"strategy={strategy}", *TWO)
    ref = tmp_path / "ref"  # three trainings and a refusal: their budgets add up to less than the test's 600 s
    asrbench("train", *data, f"hydra.run.dir={ref}", timeout=150)

    run = tmp_path / "interrupted"
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

    # a changed world size or strategy is refused before any process starts, in one line
    bad = asrbench("train", *data, "nodes=1", "strategy=single", f"resume={ckpt}", f"hydra.run.dir={tmp_path / 'x'}",
                   check=False, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "written by a different run" in bad.stderr and f"strategy={strategy}" in bad.stderr and "nodes=2" in bad.stderr

    resumed = tmp_path / "resumed"
    asrbench("train", *data, f"resume={ckpt}", f"hydra.run.dir={resumed}", timeout=150)
    assert json.loads((resumed / "results.json").read_text())["steps"] == STEPS
    assert_same_params(ref / "checkpoints" / "last.ckpt", resumed / "checkpoints" / "last.ckpt")


def test_killed_worker_names_rank_and_checkpoint_and_resume_matches(corpus, tmp_path):  # noqa: F811
    data = ("data=synth_tiny", f"data.root={corpus}", "strategy=sync", *TWO, "checkpoint_every_n_steps=4")
    ref = tmp_path / "ref"
    asrbench("train", *data, f"hydra.run.dir={ref}")

    run = tmp_path / "killed"
    proc = start("train", *data, f"hydra.run.dir={run}")
    last = run / "checkpoints" / "last.ckpt"
    wait_for(lambda: last.is_file() and trained_steps(run) >= 6, proc)
    ranks = children(proc.pid)
    assert ranks, "rank 1 runs as a child process of rank 0"
    t_kill = time.monotonic()
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    bound = COLLECTIVE_TIMEOUT_S + ANSWER_WAIT_S + EXIT_ALLOWANCE_S  # a run that waits forever fails here
    _, err = proc.communicate(timeout=bound + 30)
    assert time.monotonic() - t_kill < bound
    assert proc.returncode == 2, err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("error:")][0]
    assert "rank 1" in line and "last checkpoint" in line and "resume=" in line, line
    ckpt = Path(line.split("resume=")[1].split()[0])
    assert ckpt.is_file()

    resumed = tmp_path / "resumed"
    asrbench("train", *data, f"resume={ckpt}", f"hydra.run.dir={resumed}")
    assert_same_params(ref / "checkpoints" / "last.ckpt", resumed / "checkpoints" / "last.ckpt")


def test_bad_checkpoints_are_one_line_errors(corpus, tmp_path):  # noqa: F811
    data = ("data=synth_tiny", f"data.root={corpus}", "model=lstm_tiny", "batch_size=4", "logger=none",
            "trainer.max_steps=2", "trainer.enable_progress_bar=false")
    good_run = tmp_path / "good"
    asrbench("train", *data, f"hydra.run.dir={good_run}")
    good = good_run / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint\n" * 100)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "global_step": 1}, foreign)
    cases = {
        str(tmp_path / "missing.ckpt"): "no such checkpoint",
        str(tmp_path): "directory without checkpoints/last.ckpt",
        str(truncated): "not a readable checkpoint",
        str(garbage): "not a readable checkpoint",
        str(foreign): "without asrbench's run identity",
    }
    for resume, expected in cases.items():
        proc = asrbench("train", *data, f"resume={resume}", f"hydra.run.dir={tmp_path / 'out'}", check=False)
        assert proc.returncode == 2 and expected in proc.stderr, (resume, proc.stderr[-1500:])
        assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    proc = asrbench("train", *data, "model=lstm_small", f"resume={good_run}", f"hydra.run.dir={tmp_path / 'out'}",
                    check=False)
    assert proc.returncode == 2 and "written by a different run: model=" in proc.stderr
    # the run dir itself resumes from its last.ckpt
    asrbench("train", *data, "trainer.max_steps=4", f"resume={good_run}", f"hydra.run.dir={tmp_path / 'more'}")
    assert json.loads((tmp_path / "more" / "results.json").read_text())["steps"] == 4


def test_soak_records_rss_of_every_process(corpus, tmp_path):  # noqa: F811
    from asrbench import soak

    out = tmp_path / "soak"
    env = os.environ | {"WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("ASRBENCH_COMMAND", None)
    proc = subprocess.run([sys.executable, "-m", "asrbench.soak", "--out", str(out), "--interval", "0.5",
                           "--warmup", "0", "--", "data=synth_tiny", f"data.root={corpus}", "strategy=sync", *TWO,
                           "trainer.max_epochs=6"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "soak.json").read_text())
    assert summary["returncode"] == 0 and summary["samples"] >= 3
    assert len(summary["processes"]) >= 2  # rank 0 and the rank it started
    assert summary["total_start"] > 50 * 2**20 and "soak:" in proc.stdout
    rows = [json.loads(x) for x in (out / "soak.jsonl").read_text().splitlines()]
    assert len(rows) == summary["samples"]
    assert soak.summarize([{"t": 0, "rss": {"1": 100}}, {"t": 5, "rss": {"1": 150}}], 0)["growth"] == 0.5
    zombie = [{"t": 0, "rss": {"1": 100, "2": 100}}, {"t": 5, "rss": {"1": 110, "2": 120}}, {"t": 9, "rss": {"1": 90, "2": 0}}]
    assert soak.summarize(zombie, 0)["total_end"] == 230  # the end is the last sample with every worker alive
