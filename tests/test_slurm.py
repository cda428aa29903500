"""SLURM without a cluster: which process is rank 0, the run dir every srun task agrees on, and the
task layout Lightning needs, decided from the environment each launcher sets (asrbench/slurm.py).
The job script recipes/slurm/requeue.sbatch runs over a fake srun; one slow test runs recipes/slurm/check.sh
against a real SLURM where `sinfo` answers."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from asrbench import apps, checkpoint, experiment, slurm

ROOT = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d")


def srun_task(procid: int, ntasks: int = 2, *, per_node: bool = True, job: str = "42", step: str = "0",
              name: str = "asrbench") -> dict[str, str]:
    """The variables srun gives task `procid` of `srun [--ntasks-per-node=N | -n N] asrbench ...` (as
    SLURM 22.05 sets them, measured with `srun env`)."""
    env = {"SLURM_JOB_ID": job, "SLURM_STEP_ID": step, "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid),
           "SLURM_NODEID": "0", "SLURM_NTASKS": str(ntasks), "SLURM_NNODES": "1", "SLURM_JOB_NAME": name,
           "SLURM_TASKS_PER_NODE": str(ntasks), "SLURM_NODELIST": "localhost"}
    return env | ({"SLURM_NTASKS_PER_NODE": str(ntasks)} if per_node else {})


@pytest.fixture
def environ(monkeypatch):
    """Replace the process's launcher variables (RANK, LOCAL_RANK, NODE_RANK, SLURM_*) with a given set."""
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
            monkeypatch.delenv(key)

    def set_env(env: dict[str, str]) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)

    return set_env


@pytest.mark.parametrize(("env", "zero"), [
    ({}, True),                                               # one process, or the launcher's first
    ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),           # a process Lightning's launcher started
    ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),           # the launcher's first on a second machine
    ({"RANK": "1", "LOCAL_RANK": "1"}, False),                # torchrun
    ({"RANK": "0", "LOCAL_RANK": "0"}, True),
    (srun_task(0), True),                                     # srun --ntasks-per-node=2
    (srun_task(1), False),
    (srun_task(1) | {"RANK": "0"}, True),                     # torchrun inside srun numbers its own workers
    (srun_task(0, name="interactive") | {"LOCAL_RANK": "1"}, False),  # launcher's child in an interactive srun
    ({"SLURM_JOB_ID": "42", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, True),  # the batch script itself
])
def test_global_rank_zero_under_each_launcher(environ, env, zero):
    environ(env)
    assert slurm.is_global_zero(os.environ) is zero
    assert checkpoint.launching_process() is zero  # the rank-0 decisions of the run read this
    assert (apps._rank() == 0) is zero


def test_srun_tasks_agree_with_lightnings_slurm_environment(environ):
    """Rank 0 is the task Lightning's SLURMEnvironment makes global rank 0 (SLURM_PROCID), so srun's
    second task no longer prints progress or speaks for the run as the first (it did: LOCAL_RANK unset)."""
    for procid in (0, 1):
        environ(srun_task(procid))
        assert SLURMEnvironment.detect() and slurm.slurm_task()
        assert slurm.is_global_zero() is (SLURMEnvironment().global_rank() == 0)
        cfg = OmegaConf.create({"nodes": 2, "num_machines": 1, "accelerator": "cpu"})
        assert experiment.TrainerRunner(cfg, Path("unused")).progress is (procid == 0)


def test_run_stamp_is_the_job_in_a_slurm_step_and_the_time_elsewhere():
    assert slurm.run_stamp("%Y", srun_task(0)) == slurm.run_stamp("%Y", srun_task(1)) == "slurm42"
    assert slurm.run_stamp("%Y", srun_task(0, step="3")) == "slurm42.3"  # a second srun in the same job
    assert STAMP.fullmatch(slurm.run_stamp("%Y-%m-%d_%H-%M-%S", {}))
    batch = {k: v for k, v in srun_task(0).items() if k != "SLURM_STEP_ID"}  # the batch script, not a step
    assert STAMP.fullmatch(slurm.run_stamp("%Y-%m-%d_%H-%M-%S", batch))
    assert STAMP.fullmatch(slurm.run_stamp("%Y-%m-%d_%H-%M-%S", srun_task(0, name="bash")))  # Lightning ignores


def train_run_dir(overrides: list[str]) -> str:
    slurm.register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    return str(cfg.hydra.run.dir)


def test_train_run_dir_is_one_per_slurm_job(environ):
    """Every srun task resolves conf/train.yaml's hydra.run.dir to the same dir (each resolved its own
    timestamp before, and a task a second late made a second run dir); a requeued job gets it again."""
    environ(srun_task(1))
    assert train_run_dir(["strategy=sync", "nodes=2"]) == "outputs/train/slurm42_sync_n2"


def test_train_run_dir_outside_slurm_keeps_the_timestamp(environ):
    environ({})
    run_dir = train_run_dir(["strategy=sync", "nodes=2"])
    assert re.fullmatch(r"outputs/train/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_sync_n2", run_dir), run_dir


def test_bare_ntasks_is_refused_as_lightning_refuses_it(environ):
    environ(srun_task(0, per_node=False))  # srun -n 2
    with pytest.raises(RuntimeError, match="ntasks-per-node"):
        SLURMEnvironment()  # Lightning's rule, raised inside the Trainer with a traceback
    problem = slurm.task_layout_problem()
    assert problem and "srun -n 2" in problem and "--ntasks-per-node=2" in problem and "\n" not in problem
    environ(srun_task(0))
    SLURMEnvironment()
    assert slurm.task_layout_problem() is None
    environ(srun_task(0, ntasks=1, per_node=False))  # srun -n 1: one task is fine for Lightning too
    SLURMEnvironment()
    assert slurm.task_layout_problem() is None


def test_train_under_srun_n_stops_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | srun_task(1, per_node=False)
    env.pop("ASRBENCH_COMMAND", None)
    proc = subprocess.run([sys.executable, "-m", "asrbench.cli", "train", "strategy=sync", "nodes=2",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: srun -n 2 ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "--ntasks-per-node=2" in proc.stderr and not (tmp_path / "run").exists()


REQUEUE_SBATCH = ROOT / "recipes" / "slurm" / "requeue.sbatch"


def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """An environment whose `srun` runs its command as it is and whose `scontrol` only writes down its
    arguments (to scontrol.log), for running recipes/slurm/requeue.sbatch without a cluster."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42"}


def run_job_script(tmp_path: Path, code: int, sleep_s: float = 0.0, sigterm_after_s: float | None = None):
    """requeue.sbatch over a run that writes its arguments to argv.txt, sleeps and exits with `code`."""
    run = (f"import sys, time; open({str(tmp_path / 'argv.txt')!r}, 'w').write(' '.join(sys.argv[1:])); "
           f"time.sleep({sleep_s}); sys.exit({code})")
    proc = subprocess.Popen(["bash", str(REQUEUE_SBATCH), sys.executable, "-c", run, "strategy=sync"],
                            env=fake_slurm(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if sigterm_after_s is not None:
        time.sleep(sigterm_after_s)
        proc.send_signal(signal.SIGTERM)  # as scancel signals the batch script (the run gets its own)
    out, _ = proc.communicate(timeout=30)
    requeues = (tmp_path / "scontrol.log").read_text() if (tmp_path / "scontrol.log").exists() else ""
    return proc.returncode, out, (tmp_path / "argv.txt").read_text(), requeues


def test_job_script_requeues_its_job_after_a_sigusr1_stop(tmp_path):
    code, out, argv, requeues = run_job_script(tmp_path, 138)
    assert code == 138 and argv == "strategy=sync resume=auto", (out, argv)
    assert requeues == "requeue 42\n" and "== srun exit 138" in out


@pytest.mark.parametrize("code", [143, 2, 0])
def test_job_script_leaves_sigterm_faults_and_success_to_the_scheduler(tmp_path, code):
    """143 (plain scancel, preemption): scancel means stop, and preemption requeues by itself; 2: a fault."""
    assert run_job_script(tmp_path, code)[::3] == (code, "")


def test_job_script_waits_for_the_run_through_its_own_sigterm(tmp_path):
    """scancel sends SIGTERM to the batch script too: it waits for the run's checkpoint and exits with the
    run's status (143), where bash would die of the signal at once and leave srun behind."""
    code, out, _, requeues = run_job_script(tmp_path, 143, sleep_s=1.5, sigterm_after_s=0.5)
    assert code == 143 and requeues == "" and "== SIGTERM" in out and "== srun exit 143" in out, out


def slurm_answers() -> bool:
    if shutil.which("srun") is None or shutil.which("sinfo") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(2700)  # pytest's 600 s is less than the check takes on a loaded 2-core VM
def test_real_slurm_check(tmp_path):
    """recipes/slurm/check.sh: launcher, torchrun, srun and sbatch train the same parameters bit for bit,
    srun -n stops in one line, and a job stopped by scancel --signal=USR1 and one stopped by plain scancel
    (SIGTERM) are requeued and end as the uninterrupted run (minutes on a 2-core VM: docs/slurm.md). STAGES=3 in
    the environment runs only the requeue checks."""
    if not slurm_answers():
        pytest.skip("no SLURM here (srun not on PATH or sinfo fails); recipes/slurm/setup_local.sh starts one")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"EXP": str(tmp_path / "check"),
                                                                               "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "recipes" / "slurm" / "check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=2700)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    stages = env.get("STAGES", "1 2 3").split()  # STAGES=3: the requeue checks alone (check.sh's STAGES)
    passes = {"1": 9, "2": 1, "3": 2}  # 3 strategies x 3 launchers; srun -n; USR1 and SIGTERM requeues
    assert "FAIL" not in proc.stdout and proc.stdout.count("PASS") >= sum(passes[s] for s in stages), proc.stdout
