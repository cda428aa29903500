"""The job machinery of `asrbench reproduce`: each `train` run as a job in its own directory and process.

A :class:`Job` names one run (its overrides and directory); a :class:`Runner` trains jobs `parallel`
at a time, each in a fresh process, and reuses a job whose directory already holds its results.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from asrbench import experiment, report

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
        return experiment.train(cfg, path)
    finally:
        root.removeHandler(handler)
        handler.close()


@dataclass
class Job:
    name: str  # what the log calls it
    overrides: list[str]  # asrbench train overrides
    path: Path  # its run directory


class Runner:
    """Runs `train` jobs `parallel` at a time, each in its own process with `threads` torch threads
    (one thread per run on a small CPU: two threads per process on two busy cores ran a small LSTM
    100x slower, from spinning OpenMP threads). A job whose directory holds results.json is reused."""

    def __init__(self, conf_dir: str | Path, parallel: int, threads: int | None = 1) -> None:
        if parallel < 1 or (threads is not None and threads < 1):
            raise ValueError("Args `parallel` and `threads` must be positive values")
        self.conf_dir, self.parallel, self.threads = str(conf_dir), parallel, threads
        self.trained: set[str] = set()  # the jobs this invocation trained (the rest were finished before)

    def run(self, jobs: Sequence[Job]) -> dict[str, dict]:
        done: dict[str, dict] = {}
        todo = []
        for job in jobs:
            if (job.path / "results.json").is_file():
                log.info("%s: finished before, reused", job.name)
                done[job.name] = report.load_results(job.path)
            elif job.name not in {j.name for j in todo}:
                todo.append(job)
        if not todo:
            return done
        for job in todo:  # what a stopped attempt left (curves, checkpoints) would mix into the new run
            if job.path.exists():
                shutil.rmtree(job.path)
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=min(self.parallel, len(todo)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_train_job, self.conf_dir, job.overrides, str(job.path), self.threads): job
                       for job in todo}
            try:
                for future in as_completed(futures):
                    job = futures[future]
                    res = done[job.name] = future.result()
                    self.trained.add(job.name)
                    log.info("%s: %d steps, dev WER %.1f%%, test WER %.1f%% (%.0f s; %d of %d done, %.0f s in)",
                             job.name, res["steps"], res["eval"]["dev"]["wer"] * 100, res["wer"] * 100,
                             res["wall_s"], sum(f.done() for f in futures), len(futures), time.perf_counter() - t0)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return done
