"""The job machinery of `asrbench reproduce`: each `train` run as a job in its own directory and process.

A :class:`Job` names one run (its overrides and directory); a :class:`Runner` trains jobs `parallel`
at a time, each in a fresh process, and reuses a job whose directory already holds its results, but
only results it can trust (:func:`why_not_reusable`). One invocation at a time holds a directory
(:func:`lock_directory`).
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from asrbench import experiment, runinfo
from asrbench.errors import OutputError, RunFailed

log = logging.getLogger(__name__)


def _train_job(conf_dir: str, overrides: list[str], run_dir: str, threads: int | None) -> dict:
    """One `asrbench train` run in a fresh process, logging to <run_dir>/train.log."""

    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("WANDB_SILENT", "true")  # W&B's banner per run stays in the run's own files
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        # the overrides the run is trained with, beside its results: reuse checks them (why_not_reusable)
        runinfo.write_json_atomic(path / JOB_FILE, {"overrides": list(overrides)})
        try:
            return experiment.train(cfg, path)
        except FloatingPointError as err:  # the simulated cluster's Diverged: a non-finite loss, gradient or parameter
            raise RunFailed(f"the run diverged at {err}, without results.json; lower optim.lr, warm it up "
                            f"(optim.warmup_steps) or clip gradients harder (trainer.gradient_clip_val)") from None
    finally:
        root.removeHandler(handler)
        handler.close()


@dataclass
class Job:
    name: str  # what the log calls it
    overrides: list[str]  # asrbench train overrides
    path: Path  # its run directory


JOB_FILE = "job.json"  # the job's overrides, written beside results.json before the run trains
FAILED_FILE = "failed.json"  # a job that may fail and did (RunFailed: it diverged): its overrides and why
LOCK_FILE = ".lock"  # held (flock) by the invocation running jobs in a directory; holds its pid
# what a reused run must hold: the keys the reproduce report reads
REQUIRED_KEYS = ("strategy", "nodes", "seed", "steps", "wer", "eval", "config")


# keys that label a run without changing what it trains (the W&B group, which reproduce names after its
# directory): left out of a job's identity, so that a moved or copied reproduce directory keeps its runs
LABEL_KEYS = frozenset({"experiment", "logger.job_type"})


def _effective(overrides: Sequence[str]) -> dict[str, str]:
    """Each key's last override (``+key`` and ``key`` the same key, ``~key`` as itself), labels aside
    (LABEL_KEYS): what the composed config depends on, order and repeats aside."""
    out: dict[str, str] = {}
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if o.key_or_group not in LABEL_KEYS:
            out[("~" if o.is_delete() else "") + o.key_or_group] = o.input_line
    return out


def _moved(recorded: Any, wanted: Any, root: Path | None) -> bool:
    """Whether `recorded` is the path `wanted` names under `root` (the reproduce directory), as it was
    when that directory lay elsewhere: <old root>/seed0/warm_start for <root>/seed0/warm_start."""
    if root is None or not isinstance(recorded, str) or not isinstance(wanted, str) or not wanted.startswith("/"):
        return False
    try:
        rel = Path(wanted).relative_to(root).as_posix()
    except ValueError:
        return False
    return rel != "." and recorded.endswith("/" + rel)


def _overrides_differ(recorded: Sequence[str], wanted: Sequence[str], root: Path | None) -> str | None:
    """The first override on which a job's recorded overrides and its wanted ones differ (a path under
    `root` that only moved with it aside), or None."""
    old, new = _effective(recorded), _effective(wanted)
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if a != b and not (a and b and _moved(a.split("=", 1)[1], b.split("=", 1)[1], root)):
            return a if a is not None else b
    return None


def _lookup(config: Mapping, key: str) -> tuple[bool, Any]:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _config_mismatch(overrides: Sequence[str], config: Mapping, root: Path | None = None) -> str | None:
    """The first override whose value the recorded (resolved) config contradicts, or None. A group
    override (``strategy=gtc``) is checked against the group's ``name``; keys the config lacks,
    deletions, interpolations, labels and paths that moved with `root` are left to job.json."""
    last = {o.key_or_group: o for o in OverridesParser.create().parse_overrides(list(overrides))}
    for o in last.values():  # a key given twice takes its last value
        if o.is_delete() or o.package or o.key_or_group in LABEL_KEYS:
            continue
        value = o.value()
        if isinstance(value, str) and "${" in value:
            continue
        found, recorded = _lookup(config, o.key_or_group)
        if not found:
            continue
        if isinstance(recorded, Mapping):
            if not isinstance(value, str) or "name" not in recorded:
                continue
            recorded = recorded["name"]
        if recorded != value and not _moved(recorded, value, root):
            return f"{o.key_or_group}={recorded!r} recorded where the job sets {o.input_line}"
    return None


def _non_finite(results: Mapping) -> str | None:
    """The first loss or error-rate field that is not a finite number (a diverged run), or None."""
    def walk(node: Any, where: str):
        if isinstance(node, Mapping):
            for k, v in node.items():
                yield from walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(node, float) and not math.isfinite(node):
            yield where

    fields = {k: v for k, v in results.items() if k in ("wer", "cer", "fer", "eval") or "loss" in str(k)}
    return next(walk(fields, ""), None)


def why_not_reusable(job: Job, root: Path | None = None) -> str | None:
    """Why `job`'s results.json cannot stand for the job (None: it can). Reused are only results that
    parse, hold the keys the report reads, record a finished run (no non-finite loss or error rate)
    and are this job's: the overrides in job.json, when the run wrote one, equal the job's, and the
    recorded config agrees with every override it can check (a run finished before job.json existed
    is judged by the latter alone). Labels (LABEL_KEYS) are not compared, and a path under `root` (the
    reproduce directory) matches the same path under the directory's earlier place."""
    path = job.path / "results.json"
    try:
        results = json.loads(path.read_text())
    except ValueError as err:
        return f"results.json is not valid JSON ({getattr(err, 'msg', err)})"
    except OSError as err:
        return f"results.json unreadable ({err.strerror})"
    if not isinstance(results, dict):
        return "results.json holds no results object"
    missing = [k for k in REQUIRED_KEYS if k not in results]
    if missing or not isinstance(results["eval"], Mapping) or "wer" not in (results["eval"].get("dev") or {}):
        return f"results.json lacks {', '.join(missing) or 'eval.dev.wer'}"
    bad = _non_finite(results)
    if bad:
        return f"results.json records {bad}={results_value(results, bad)} (a diverged or failed run)"
    recorded_job = job.path / JOB_FILE
    if recorded_job.is_file():
        try:
            differ = _overrides_differ(json.loads(recorded_job.read_text())["overrides"], job.overrides, root)
        except (ValueError, KeyError, TypeError) as err:
            return f"{JOB_FILE} unreadable ({type(err).__name__})"
        if differ:
            return f"trained with other overrides ({JOB_FILE}: {differ!r} differs)"
    if not isinstance(results["config"], Mapping):
        return "results.json's config is not a mapping"
    mismatch = _config_mismatch(job.overrides, results["config"], root)
    return f"results.json is another run's: {mismatch}" if mismatch else None


def recorded_failure(job: Job, root: Path | None = None) -> str | None:
    """Why `job` failed when an earlier invocation trained it with the same overrides (its failed.json),
    or None: a diverged search candidate is not trained again."""
    try:
        failed = json.loads((job.path / FAILED_FILE).read_text())
        same = _overrides_differ(failed["overrides"], job.overrides, root) is None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(failed.get("error")) if same and not (job.path / "results.json").exists() else None


def results_value(results: Mapping, dotted: str) -> Any:
    return _lookup(results, dotted)[1]


def lock_directory(out: Path) -> int:
    """Hold `out` for this process (an exclusive flock on <out>/.lock, which records the pid) and
    return the descriptor; the lock goes when it is closed or the process ends. A directory another
    live invocation holds is refused in one line: two invocations would train the same jobs into the
    same run directories."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OutputError(f"{out}: another asrbench reproduce (pid {holder}) is running in this directory; "
                          f"wait for it to end or write elsewhere with hydra.run.dir=DIR") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def eta_s(wall_s: Sequence[float], remaining: int, parallel: int) -> float | None:
    """Seconds until `remaining` jobs finish: the mean wall time of the finished ones times the
    remaining jobs, over the jobs that run at once (`parallel`, at most the remaining ones); None
    before any job finished."""
    if remaining <= 0:
        return 0.0
    if not wall_s:
        return None
    return sum(wall_s) / len(wall_s) * remaining / min(parallel, remaining)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def progress_line(done: int, total: int, elapsed_s: float, eta: float | None) -> str:
    """The invocation's progress in one line: jobs done of total, elapsed, ETA."""
    return f"{done}/{total} jobs trained, {_clock(elapsed_s)} elapsed, ETA {_clock(eta)}"


class Runner:
    """Runs `train` jobs `parallel` at a time, each in its own process with `threads` torch threads
    (one thread per run on a small CPU: two threads per process on two busy cores ran a small LSTM
    100x slower, from spinning OpenMP threads). A job whose directory holds results.json it can trust
    (:func:`why_not_reusable`) is reused; any other is trained again, and the log says why.

    `lock`: the invocation's directory, held for the Runner's life (:func:`lock_directory`). Progress
    counts every job this Runner trained over all its `run` calls: a bar on a terminal, and one log
    line per finished job with the ETA either way (CI, log files).

    A job `run` may let fail (a search candidate) and that stops on RunFailed (it diverged) is left
    out of what `run` returns, its reason in `failed` and in its directory's failed.json, which a later
    invocation reuses rather than train it again; any other failed job stops the invocation with one
    line naming it."""

    def __init__(self, conf_dir: str | Path, parallel: int, threads: int | None = 1,
                 lock: str | Path | None = None) -> None:
        if parallel < 1 or (threads is not None and threads < 1):
            raise ValueError("Args `parallel` and `threads` must be positive values")
        self.conf_dir, self.parallel, self.threads = str(conf_dir), parallel, threads
        self.trained: set[str] = set()  # the jobs this invocation trained (the rest were finished before)
        self.failed: dict[str, str] = {}  # job name -> why it failed, of the jobs allowed to
        self.failures = 0  # jobs this invocation trained that failed
        self.root = Path(lock).absolute() if lock is not None else None  # a path under it may have moved with it
        self.lock_fd = lock_directory(Path(lock)) if lock is not None else None
        self.queued = 0  # jobs given to train, over every run() call
        self.wall_s: list[float] = []  # the wall times of those finished
        self.t0 = time.perf_counter()

    def close(self) -> None:
        """Let the directory go (the process's end does the same)."""
        if getattr(self, "lock_fd", None) is not None:  # None too when __init__ was refused the lock
            os.close(self.lock_fd)
            self.lock_fd = None

    def __del__(self) -> None:
        self.close()

    def progress(self) -> str:
        finished = len(self.wall_s) + self.failures
        remaining = self.queued - finished
        return progress_line(finished, self.queued, time.perf_counter() - self.t0,
                             eta_s(self.wall_s, remaining, self.parallel))

    def run(self, jobs: Sequence[Job], may_fail: Collection[str] = ()) -> dict[str, dict]:
        """The results of every job by name, training those not finished before; a job named in
        `may_fail` that failed is left out (its reason in `failed`)."""
        done: dict[str, dict] = {}
        todo = []
        for job in jobs:
            if job.name in done or job.name in self.failed or job.name in {j.name for j in todo}:
                continue
            why_failed = recorded_failure(job, self.root) if job.name in may_fail else None
            if why_failed is not None:
                log.info("%s: failed before (%s), not trained again", job.name, why_failed)
                self.failed[job.name] = why_failed
                continue
            if (job.path / "results.json").is_file():
                why = why_not_reusable(job, self.root)
                if why is None:
                    log.info("%s: finished before, reused", job.name)
                    done[job.name] = json.loads((job.path / "results.json").read_text())
                    continue
                log.warning("%s: %s: not reused, trained again", job.path / "results.json", why)
            todo.append(job)
        if not todo:
            return done
        for job in todo:  # what a stopped attempt left (curves, checkpoints) would mix into the new run
            if job.path.exists():
                shutil.rmtree(job.path)
        self.queued += len(todo)
        with ProcessPoolExecutor(max_workers=min(self.parallel, len(todo)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool, \
                logging_redirect_tqdm(), \
                tqdm(total=self.queued, initial=len(self.wall_s), desc="reproduce", unit="job",
                     disable=not sys.stderr.isatty(), dynamic_ncols=True,
                     bar_format="{desc}: {n_fmt}/{total_fmt} jobs |{bar}| {postfix}") as bar:
            bar.set_postfix_str(self.progress(), refresh=True)
            futures = {pool.submit(_train_job, self.conf_dir, job.overrides, str(job.path), self.threads): job
                       for job in todo}
            try:
                for future in as_completed(futures):
                    job = futures[future]
                    try:
                        res = done[job.name] = future.result()
                    except RunFailed as err:
                        self._failed(job, err, may_fail)
                        bar.update(1)
                        bar.set_postfix_str(self.progress())
                        continue
                    self.trained.add(job.name)
                    self.wall_s.append(float(res.get("wall_s") or 0.0))
                    bar.update(1)
                    bar.set_postfix_str(self.progress())
                    log.info("%s: %d steps, dev WER %.1f%%, test WER %.1f%% (%.0f s); %s",
                             job.name, res["steps"], res["eval"]["dev"]["wer"] * 100, res["wer"] * 100,
                             res["wall_s"], self.progress())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return done

    def _failed(self, job: Job, err: RunFailed, may_fail: Collection[str]) -> None:
        """Record a job that may fail and did (failed.json); stop on any other in one line naming it."""
        if job.name not in may_fail:
            raise RunFailed(f"{job.name} ({job.path}): {err}") from None
        self.failures += 1
        self.failed[job.name] = str(err)
        runinfo.write_json_atomic(job.path / FAILED_FILE, {"overrides": list(job.overrides), "error": str(err)})
        log.warning("%s: failed (%s); %s", job.name, err, self.progress())
