"""Preemption through the command line: SIGTERM (what a scheduler sends, and torchrun forwards) stops a
run after a step with interrupted.ckpt and exit 143, and `resume=auto` in the same run dir reaches the
uninterrupted run's parameters: bit for bit on the simulated cluster, within 1e-6 over two gloo
processes; a torchrun restart after a killed worker continues from last.ckpt; a diverged run (simulated,
or a compressing hook over processes) stops in one line with exit 2 and no results.json."""
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

from tests.test_faults import children, params, start, trained_steps, wait_for
from tests.test_pipeline import ROOT, asrbench, corpus  # noqa: F401  (corpus is a fixture)

pytestmark = pytest.mark.slow  # every test here trains through the command line

STEPS = 60  # 10 epochs of 6 steps: 24 utterances, 2 workers x 2 utterances per step
PER_EPOCH = 6
RUN = ("model=lstm_tiny", "batch_size=2", "eval_batch_size=16", "optim.lr=0.004", "logger=none",
       "trainer.max_epochs=10", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
       "accelerator=cpu", "nodes=2", "collective_timeout_s=60", "strategy=gtc")
# results.json entries an interrupted and resumed run shares with the uninterrupted one (times differ)
SAME = ("steps", "epochs", "train_frames", "wer", "cer", "fer", "eval", "bytes_sent_per_worker_per_step",
        "bytes_received_per_worker_per_step")


def data(corpus: Path, *more: str) -> tuple[str, ...]:
    return ("data=synth_tiny", f"data.root={corpus}", *RUN, *more)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def step_of(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def sigterm_mid_run(run: Path, args: tuple[str, ...], after_steps: int) -> tuple[str, int]:
    """Start `asrbench train`, SIGTERM its first process (rank 0) once `after_steps` steps are logged;
    returns the one error line and the step interrupted.ckpt holds, after checking exit 143."""
    proc = start("train", *args, f"hydra.run.dir={run}")
    wait_for(lambda: trained_steps(run) >= after_steps, proc, timeout=240)
    os.kill(proc.pid, signal.SIGTERM)  # rank 0 alone: the ranks agree on it at the next agreement point
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    line = one_error_line(err)
    ckpt = run / "checkpoints" / "interrupted.ckpt"
    assert "stopped by SIGTERM after step" in line and f"resume={ckpt}" in line and ckpt.is_file(), line
    assert not (run / "results.json").exists()
    assert not list((run / "checkpoints").glob(".*.tmp"))  # every write went through a temp file and a rename
    step = step_of(ckpt)
    assert after_steps <= step < STEPS and f"after step {step}:" in line
    return line, step


def test_sigterm_on_the_simulated_cluster_then_resume_auto_is_bit_exact(corpus, tmp_path):  # noqa: F811
    args = data(corpus, "cluster=simulated", "checkpoint_every_n_steps=4")
    ref = tmp_path / "ref"
    asrbench("train", *args, f"hydra.run.dir={ref}", timeout=240)

    run = tmp_path / "run"
    _, step = sigterm_mid_run(run, args, after_steps=5)
    # last.ckpt: the newest epoch end (every 6 steps) or 4th step before the stop (the stop step saves interrupted.ckpt)
    assert step_of(run / "checkpoints" / "last.ckpt") == max(s for s in range(1, step) if s % 4 == 0 or s % 6 == 0)

    proc = asrbench("train", *args, "resume=auto", f"hydra.run.dir={run}", timeout=240)
    logs = proc.stdout + proc.stderr
    assert f"resume=auto: continuing from {run / 'checkpoints' / 'interrupted.ckpt'} (step {step})" in logs
    a, b = params(ref / "checkpoints" / "last.ckpt"), params(run / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (ref, run))
    assert {k: ra[k] for k in SAME} == {k: rb[k] for k in SAME} and rb["steps"] == STEPS


@pytest.mark.parametrize("signum, name", [(signal.SIGINT, "Ctrl-C"), (signal.SIGUSR1, "SIGUSR1")])
def test_ctrl_c_and_sigusr1_stop_the_simulated_cluster_with_their_exit_status(corpus, tmp_path, signum,  # noqa: F811
                                                                            name):
    run = tmp_path / "run"
    proc = start("train", *data(corpus, "cluster=simulated"), f"hydra.run.dir={run}")
    wait_for(lambda: trained_steps(run) >= 3, proc, timeout=240)
    os.kill(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    line = one_error_line(err)
    ckpt = run / "checkpoints" / "interrupted.ckpt"
    assert f"stopped by {name} after step {step_of(ckpt)}: checkpoint {ckpt}" in line, line
    assert not (run / "results.json").exists()


def test_a_checkpoint_resumes_only_on_the_cluster_that_wrote_it(corpus, tmp_path):  # noqa: F811
    sim = tmp_path / "simulated"
    args = data(corpus, "strategy=sync", "trainer.max_epochs=1")
    asrbench("train", *args, "cluster=simulated", f"hydra.run.dir={sim}", timeout=240)
    proc = asrbench("train", *args, "trainer.max_epochs=2", f"resume={sim}", f"hydra.run.dir={tmp_path / 'p'}",
                    check=False, timeout=240)
    assert proc.returncode == 2 and "written by cluster=simulated; resume it with cluster=simulated" in \
        one_error_line(proc.stderr), proc.stderr[-2000:]
    processes = tmp_path / "processes"
    asrbench("train", *args, f"hydra.run.dir={processes}", timeout=240)
    proc = asrbench("train", *args, "trainer.max_epochs=2", "cluster=simulated", f"resume={processes}",
                    f"hydra.run.dir={tmp_path / 's'}", check=False, timeout=240)
    assert proc.returncode == 2 and "holds no simulated cluster's state" in one_error_line(proc.stderr)
    # the simulated run's own checkpoint continues it
    asrbench("train", *args, "trainer.max_epochs=2", "cluster=simulated", f"resume={sim}",
             f"hydra.run.dir={tmp_path / 'more'}", timeout=240)
    assert json.loads((tmp_path / "more" / "results.json").read_text())["steps"] == 2 * PER_EPOCH


# What a diverged run's line says about optim.lr=1e6 (the same words on both clusters): the value as
# configured and, where optim.lr_scaling changed it for the 2 workers, the peak lr they stepped with.
LR_ADVICE = {"none": "lower optim.lr (this run: 1e+06), warm it up (optim.warmup_steps) or clip gradients harder "
                     "(trainer.gradient_clip_val)",
             "linear": "lower optim.lr (this run: 1e+06, peak 2e+06 after optim.lr_scaling=linear), warm it up"}


@pytest.mark.parametrize("strategy, scaling", [("bmuf", "none"), ("gtc", "linear")])
def test_a_diverged_simulated_run_stops_with_one_line_and_no_results(corpus, tmp_path, strategy,  # noqa: F811
                                                                     scaling):
    run = tmp_path / strategy
    proc = asrbench("train", *data(corpus, "cluster=simulated", "optim.lr=1e6", f"optim.lr_scaling={scaling}",
                                   f"strategy={strategy}"), f"hydra.run.dir={run}", check=False, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_error_line(proc.stderr)
    assert "training hit NaN or inf at step" in line and "worker" in line, line
    assert LR_ADVICE[scaling] in line and "without results.json" in line, line
    assert not (run / "results.json").exists()


def test_one_non_finite_gradient_error_is_found_through_its_wrappings():
    """GTC's and 1-bit SGD's error is one class, found by isinstance along the chain a traceback shows, and
    read back from its text where autograd kept only that (raised in a comm hook's future callback): its
    method and its hook's step are fields, and the command line's line puts the run's step in place of it."""
    from asrbench.experiment import hook_divergence, non_finite_gradient
    from asrbench.strategies import errors, gtc, gtc_codec, onebit

    assert gtc.NonFiniteGradientError is gtc_codec.NonFiniteGradientError is onebit.NonFiniteGradientError \
        is errors.NonFiniteGradientError
    error = onebit.NonFiniteGradientError("NaN/inf in the gradient of rank(s) 0, 1", method="1-bit SGD", step=1)
    assert str(error) == "1-bit SGD step 1: NaN/inf in the gradient of rank(s) 0, 1"
    assert non_finite_gradient(error) is error
    for cause in (True, False):
        try:
            try:
                raise error
            except FloatingPointError as err:
                if cause:
                    raise RuntimeError("a wrapper") from err
                raise RuntimeError("raised while handling it")  # noqa: B904  (its context)
        except RuntimeError as wrapped:
            assert non_finite_gradient(wrapped) is error
    try:
        try:
            raise error
        except FloatingPointError:
            raise ValueError("another fault") from None
    except ValueError as other:
        assert non_finite_gradient(other) is None  # suppressed: not what the traceback shows
    by_autograd = RuntimeError(f"NonFiniteGradientError: {error}\n\nAt:\n  onebit.py(190): check_finite")
    found = non_finite_gradient(by_autograd)
    assert (str(found), found.method, found.step, found.where) == (str(error), "1-bit SGD", 1, error.where)
    assert hook_divergence(found, 2) == "training hit NaN or inf at step 2 (1-bit SGD: NaN/inf in the gradient of " \
                                        "rank(s) 0, 1)"
    codec = gtc_codec.NonFiniteGradientError("3 non-finite gradient elements")  # no method, no step: the text alone
    assert non_finite_gradient(RuntimeError(f"NonFiniteGradientError: {codec}")).where == str(codec)
    assert hook_divergence(codec, 4) == "training hit NaN or inf at step 4 (3 non-finite gradient elements)"
    assert non_finite_gradient(RuntimeError("Connection closed by peer")) is None


@pytest.mark.parametrize("strategy, scaling", [("gtc", "linear"), ("onebit", "none")])
def test_a_diverged_compressing_hook_over_two_processes_is_one_line(corpus, tmp_path, strategy,  # noqa: F811
                                                                   scaling):
    """GTC's and 1-bit SGD's hooks find the NaN gradient on every rank: rank 0 alone prints it (1-bit SGD's,
    raised in the hook's future callback, reached the console as a RuntimeError traceback), in the simulated
    cluster's words, naming optim.lr's value (the hook's own said "lower the learning rate")."""
    run = tmp_path / strategy
    proc = asrbench("train", *data(corpus, "optim.lr=1e6", f"optim.lr_scaling={scaling}", f"strategy={strategy}"),
                    f"hydra.run.dir={run}", check=False, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_error_line(proc.stderr)
    assert "training hit NaN or inf at step" in line and "NaN/inf in the gradient of rank(s) 0" in line, line
    assert LR_ADVICE[scaling] in line and "without results.json" in line, line
    assert "lower the learning rate" not in line, line  # the hook's advice, replaced by the one naming the value
    assert not (run / "results.json").exists()


@pytest.fixture(scope="module")
def processes_ref(corpus, tmp_path_factory) -> Path:  # noqa: F811
    """The uninterrupted gtc run over 2 gloo processes (Lightning's launcher)."""
    ref = tmp_path_factory.mktemp("processes") / "ref"
    asrbench("train", *data(corpus), f"hydra.run.dir={ref}", timeout=300)
    return ref


def counts(run: Path) -> dict:
    """results.json's counts that continue across a resume: steps, comm_steps, train_frames, every bytes figure."""
    results = json.loads((run / "results.json").read_text())
    return {k: v for k, v in results.items() if k in ("steps", "comm_steps", "train_frames") or "bytes" in k}


def assert_within_1e_6(ref: Path, run: Path) -> None:
    a, b = params(ref / "checkpoints" / "last.ckpt"), params(run / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert json.loads((run / "results.json").read_text())["steps"] == STEPS


def test_sigterm_on_two_processes_then_resume_auto_matches(corpus, tmp_path, processes_ref):  # noqa: F811
    run = tmp_path / "run"
    _, step = sigterm_mid_run(run, data(corpus), after_steps=3)
    asrbench("train", *data(corpus), "resume=auto", f"hydra.run.dir={run}", timeout=300)
    assert_within_1e_6(processes_ref, run)
    # GTC's bytes come back with its residuals, the frames with the run's counts (checkpoint.RunCounts)
    ref = counts(processes_ref)
    assert counts(run) == ref and ref["comm_steps"] == STEPS and ref["bytes_sent_per_worker_per_step"] > 0, ref


def test_torchrun_restarts_after_a_killed_worker_and_resumes_from_last_ckpt(corpus, tmp_path,  # noqa: F811
                                                                            processes_ref):
    run = tmp_path / "run"
    # torch 2.14's agent shares its TCPStore with the workers across restarts without a per-restart prefix:
    # the restarted rank 0 read the killed worker's gloo address from it and failed to connect (exit 2).
    # Opting out of the sharing gives each restart a store of its own.
    env = os.environ | {"WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    env.pop("ASRBENCH_COMMAND", None)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "--max-restarts", "1", "-m", "asrbench.cli", "train", *data(corpus),
                             f"hydra.run.dir={run}"], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    last = run / "checkpoints" / "last.ckpt"
    wait_for(lambda: last.is_file() and trained_steps(run) >= PER_EPOCH + 2, proc, timeout=240)
    saved = step_of(last)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)  # one worker dies; the agent stops the other and starts both again
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    logs = out + err
    assert "torchrun restart 1: resume=auto" in logs and "resume=auto: continuing from" in logs, logs[-3000:]
    assert saved % PER_EPOCH == 0 and saved >= PER_EPOCH and time.monotonic() - t0 < 400
    assert_within_1e_6(processes_ref, run)


def test_a_checkpoint_at_an_epoch_end_resumes_bit_exact_over_two_processes(corpus, tmp_path):  # noqa: F811
    """last.ckpt written at the end of epoch 3 (step 18) and resumed to step 36 equals 36 steps straight, every
    parameter bit for bit: a checkpoint saved in on_train_epoch_end resumed (Lightning 2.6) to a model up to
    1.7e-3 away, which made a stop that fell on an epoch end inexact (recipes/slurm/check.sh stage 3). Its
    results.json counts as 36 steps straight do (sync's CommStats and the frames come back with the run's
    counts); a checkpoint written without them still resumes, counting from the resume, with a warning."""
    args = (*data(corpus), "strategy=sync", "trainer.max_epochs=100")
    ref, run, old = tmp_path / "ref", tmp_path / "run", tmp_path / "old"
    asrbench("train", *args, "trainer.max_steps=36", f"hydra.run.dir={ref}", timeout=300)
    asrbench("train", *args, "trainer.max_steps=18", f"hydra.run.dir={run}", timeout=300)
    assert step_of(run / "checkpoints" / "last.ckpt") == 3 * PER_EPOCH
    (old / "checkpoints").mkdir(parents=True)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt["callbacks"]["RunCounts"]  # as a checkpoint written before the counts were saved
    torch.save(ckpt, old / "checkpoints" / "last.ckpt")
    asrbench("train", *args, "trainer.max_steps=36", "resume=auto", f"hydra.run.dir={run}", timeout=300)
    a, b = params(ref / "checkpoints" / "last.ckpt"), params(run / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        {k: float((a[k] - b[k]).abs().max()) for k in a}
    assert json.loads((run / "results.json").read_text())["eval"] == json.loads((ref / "results.json").read_text())["eval"]
    assert counts(run) == counts(ref) and counts(ref)["comm_steps"] == 36, counts(ref)

    proc = asrbench("train", *args, "trainer.max_steps=24", "resume=auto", f"hydra.run.dir={old}", timeout=300)
    assert "was written without the run's counts" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    resumed = counts(old)
    assert resumed["steps"] == 24 and resumed["comm_steps"] == 24 - 18, resumed  # counted from the resume
