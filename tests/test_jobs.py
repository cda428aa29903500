"""asrbench.jobs: a reproduce job's results are reused only when they can be trusted (valid JSON,
the report's keys, a finished run, this job's own overrides), one invocation holds a directory, and
the invocation's ETA. Training is faked in-process: these tests train nothing."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from asrbench import jobs
from asrbench.errors import OutputError, RunFailed
from asrbench.jobs import Job, Runner


def fake_results(overrides: list[str], wer: float = 0.25) -> dict:
    over = dict(o.split("=", 1) for o in overrides)
    return {"strategy": over["strategy"], "nodes": int(over["nodes"]), "seed": int(over["seed"]), "steps": 10,
            "wer": wer, "cer": 0.1, "fer": None, "eval": {"dev": {"wer": wer, "loss": 1.5}}, "wall_s": 3.0,
            "config": {"strategy": {"name": over["strategy"], "block_size": 4}, "nodes": int(over["nodes"]),
                       "seed": int(over["seed"]), "optim": {"lr": float(over.get("optim.lr", 0.0015))}}}


@pytest.fixture
def trained(monkeypatch):
    """Runs jobs in threads with a fake `_train_job`; returns the run dirs it trained, in order."""
    calls: list[Path] = []

    def train(conf_dir, overrides, run_dir, threads):
        path = Path(run_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / jobs.JOB_FILE).write_text(json.dumps({"overrides": overrides}))
        calls.append(path)
        if "optim.lr=1e6" in overrides:  # a diverged run: RunFailed, no results.json
            raise RunFailed("the training loss is NaN or inf at step 3: the run diverged and was stopped")
        res = fake_results(overrides)
        (path / "results.json").write_text(json.dumps(res))
        return res

    monkeypatch.setattr(jobs, "_train_job", train)
    monkeypatch.setattr(jobs, "ProcessPoolExecutor", lambda max_workers, mp_context: ThreadPoolExecutor(max_workers))
    return calls


def grid(tmp_path: Path) -> list[Job]:
    return [Job("single", ["strategy=single", "nodes=1", "seed=0"], tmp_path / "single"),
            Job("gtc x2", ["strategy=gtc", "nodes=2", "seed=0", "optim.lr=0.001"], tmp_path / "gtc_n2"),
            Job("bmuf x2", ["strategy=bmuf", "nodes=2", "seed=0"], tmp_path / "bmuf_n2")]


def test_finished_jobs_are_reused_and_nothing_is_trained_twice(tmp_path, trained):
    first = Runner("conf", parallel=2).run(grid(tmp_path))
    assert len(trained) == 3
    again = Runner("conf", parallel=2)
    assert again.run(grid(tmp_path)) == first and len(trained) == 3 and not again.trained


def test_a_run_finished_before_job_json_existed_is_reused(tmp_path, trained):
    Runner("conf", parallel=1).run(grid(tmp_path))
    for job in grid(tmp_path):
        (job.path / jobs.JOB_FILE).unlink()
    assert all(jobs.why_not_reusable(j) is None for j in grid(tmp_path))
    Runner("conf", parallel=1).run(grid(tmp_path))
    assert len(trained) == 3


@pytest.mark.parametrize("damage, why", [
    (lambda p: p.write_text(p.read_text()[:40]), "not valid JSON"),  # a truncated file
    (lambda p: p.write_text("{}"), "lacks strategy, nodes, seed, steps, wer, eval, config"),
    (lambda p: p.write_text("[1, 2]"), "no results object"),
    (lambda p: p.write_text(json.dumps(json.loads(p.read_text()) | {"wer": math.nan})), "wer=nan"),
    (lambda p: p.write_text(json.dumps(json.loads(p.read_text()) | {"eval": {"dev": {"wer": 0.2, "loss": math.inf}}})),
     "eval.dev.loss=inf"),
])
def test_a_bad_results_file_is_trained_again_with_one_line_saying_why(tmp_path, trained, caplog, damage, why):
    Runner("conf", parallel=1).run(grid(tmp_path))
    gtc = grid(tmp_path)[1]
    damage(gtc.path / "results.json")
    assert why in jobs.why_not_reusable(gtc)
    with caplog.at_level(logging.WARNING, logger="asrbench.jobs"):
        done = Runner("conf", parallel=1).run(grid(tmp_path))
    assert trained[3:] == [gtc.path]  # that job alone, once
    assert done["gtc x2"]["wer"] == 0.25 and done["gtc x2"]["strategy"] == "gtc"
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(gtc.path / "results.json") in line and why in line and "trained again" in line


@pytest.mark.parametrize("with_job_json", [True, False])
def test_another_jobs_results_copied_in_are_not_reused(tmp_path, trained, with_job_json):
    Runner("conf", parallel=1).run(grid(tmp_path))
    single, gtc, bmuf = grid(tmp_path)
    (bmuf.path / "results.json").write_text((gtc.path / "results.json").read_text())  # one cell lost, one twice
    if not with_job_json:
        (bmuf.path / jobs.JOB_FILE).unlink()
    why = jobs.why_not_reusable(bmuf)
    assert "another run's" in why and "strategy='gtc'" in why and "strategy=bmuf" in why
    done = Runner("conf", parallel=1).run(grid(tmp_path))
    assert trained[3:] == [bmuf.path] and done["bmuf x2"]["strategy"] == "bmuf"


def test_results_with_job_json_of_other_overrides_are_not_reused(tmp_path, trained):
    Runner("conf", parallel=1).run(grid(tmp_path))
    gtc = grid(tmp_path)[1]
    changed = Job(gtc.name, [*gtc.overrides[:3], "optim.lr=0.002"], gtc.path)
    assert "other overrides" in jobs.why_not_reusable(changed) or "another run's" in jobs.why_not_reusable(changed)
    # a key the recorded config does not hold is caught by job.json alone
    extra = Job(gtc.name, [*gtc.overrides, "+trainer.gradient_clip_val=1.0"], gtc.path)
    assert "other overrides" in jobs.why_not_reusable(extra)
    # the same overrides in another order, or a key given twice with its last value, are the same job
    same = Job(gtc.name, ["optim.lr=0.1", *reversed(gtc.overrides)], gtc.path)
    assert jobs.why_not_reusable(same) is None


def test_a_second_invocation_on_the_same_directory_is_refused_naming_it_and_the_pid(tmp_path):
    runner = Runner("conf", parallel=1, lock=tmp_path)
    with pytest.raises(OutputError) as err:
        Runner("conf", parallel=1, lock=tmp_path)
    assert str(err.value).startswith(f"{tmp_path}: another asrbench reproduce (pid {os.getpid()})")
    assert "\n" not in str(err.value)
    # another process is refused too, and gets the directory once the holder lets it go
    probe = [sys.executable, "-c", "import sys; from asrbench.jobs import lock_directory\n"
             "try: lock_directory(sys.argv[1])\nexcept Exception as e: print(e); sys.exit(2)", str(tmp_path)]
    out = subprocess.run(probe, capture_output=True, text=True)
    assert out.returncode == 2 and f"pid {os.getpid()}" in out.stdout
    runner.close()
    assert subprocess.run(probe, capture_output=True, text=True).returncode == 0
    Runner("conf", parallel=1, lock=tmp_path).close()


@pytest.mark.parametrize("wall, remaining, parallel, eta", [
    ([], 5, 2, None),            # nothing finished yet: no estimate
    ([10.0, 20.0], 0, 2, 0.0),   # all done
    ([10.0, 20.0], 4, 2, 30.0),  # mean 15 s x 4 jobs / 2 at a time
    ([10.0, 20.0], 4, 1, 60.0),
    ([30.0], 1, 4, 30.0),        # one job left runs alone: parallel is capped by what is left
    ([12.0], 6, 4, 18.0),
])
def test_eta_is_the_mean_wall_time_times_the_remaining_jobs_over_parallel(wall, remaining, parallel, eta):
    assert jobs.eta_s(wall, remaining, parallel) == eta


def test_progress_line_and_a_log_line_per_finished_job_without_a_terminal(tmp_path, trained, caplog):
    assert jobs.progress_line(2, 5, 75.0, 3725.0) == "2/5 jobs trained, 1:15 elapsed, ETA 1:02:05"
    assert jobs.progress_line(0, 5, 1.0, None).endswith("ETA ?")
    runner = Runner("conf", parallel=1)
    with caplog.at_level(logging.INFO, logger="asrbench.jobs"):
        runner.run(grid(tmp_path)[:2])
        runner.run(grid(tmp_path))  # the third job: the count covers the invocation, not one call
    lines = [r.getMessage() for r in caplog.records if "jobs trained" in r.getMessage()]
    assert [line.split("; ")[1].split(",")[0] for line in lines] == ["1/2 jobs trained", "2/2 jobs trained",
                                                                     "3/3 jobs trained"]
    assert lines[0].endswith("ETA 0:03") and lines[-1].endswith("ETA 0:00")  # 3 s per fake job


def test_a_job_allowed_to_fail_is_recorded_and_not_trained_again_any_other_stops_in_one_line(tmp_path, trained):
    diverges = Job("lr search x2 #1", ["strategy=sync", "nodes=2", "seed=0", "optim.lr=1e6"], tmp_path / "sync_n2_1")
    runner = Runner("conf", parallel=2)
    done = runner.run([*grid(tmp_path), diverges], may_fail={diverges.name})
    assert set(done) == {"single", "gtc x2", "bmuf x2"} and "at step 3" in runner.failed[diverges.name]
    recorded = json.loads((diverges.path / jobs.FAILED_FILE).read_text())
    assert recorded["overrides"] == diverges.overrides and "diverged" in recorded["error"]
    again = Runner("conf", parallel=2)
    assert set(again.run([*grid(tmp_path), diverges], may_fail={diverges.name})) == set(done)
    assert len(trained) == 4 and diverges.name in again.failed  # reused, failure included
    # a grid job (not allowed to fail) stops the invocation, one line naming the job and its directory
    with pytest.raises(RunFailed) as err:
        Runner("conf", parallel=1).run([diverges])
    assert str(err.value).startswith(f"lr search x2 #1 ({diverges.path}): the training loss is NaN")
    assert "\n" not in str(err.value)


def test_a_moved_reproduce_directory_keeps_its_runs(tmp_path, trained):
    """The W&B group (experiment=) names the directory and init_from= points into it: a copied
    directory is the same experiment, and its runs are reused."""
    def jobs_in(root: Path) -> list[Job]:
        return [Job(j.name, [*j.overrides, f"experiment=reproduce-{root.name}", f"init_from={root}/seed0/warm_start"],
                    root / j.path.name) for j in grid(tmp_path)]

    old, new = tmp_path / "old", tmp_path / "copy"
    Runner("conf", parallel=1, lock=old).run(jobs_in(old))
    import shutil
    shutil.copytree(old, new)
    again = Runner("conf", parallel=1, lock=new)
    again.run(jobs_in(new))
    assert len(trained) == 3 and not again.trained
    # a path that is not the same one under the directory is another run
    other = [Job(j.name, [*j.overrides[:-1], f"init_from={new}/seed1/warm_start"], j.path) for j in jobs_in(new)]
    assert "other overrides" in jobs.why_not_reusable(other[0], new)


def test_a_diverged_simulated_run_is_run_failed_in_one_line(tmp_path, monkeypatch):
    """The simulated cluster raises Diverged (a FloatingPointError) in the job's process: the job turns it
    into RunFailed, which reaches the invocation whole (a Diverged does not unpickle)."""
    from asrbench.cluster.simulated import Diverged

    def diverge(cfg, path):
        raise Diverged(7, "the loss of worker 1 is nan")

    monkeypatch.setattr(jobs.experiment, "train", diverge)
    conf = Path(jobs.__file__).resolve().parent.parent / "conf"
    with pytest.raises(RunFailed) as err:
        jobs._train_job(str(conf), ["strategy=sync", "nodes=2"], str(tmp_path / "run"), None)
    assert str(err.value).startswith("the run diverged at step 7: the loss of worker 1 is nan, without results.json")
    assert not (tmp_path / "run" / "results.json").exists()
