"""How a bench figure is measured: the row it fills, the alternation of its two sides, and the
worker processes (gloo on CPU, NCCL on GPU) that the multi-process figures run in."""
from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing as mp
import os
import queue
import socket
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from asrbench.errors import AsrbenchError, ConfigError

PRELOAD = ["torch", "torch.distributed", "lightning.pytorch", "asrbench.model.module",
           "asrbench.strategies.base"]


class BenchError(AsrbenchError):
    """A figure could not be measured: one of its worker processes failed or ran out of time."""


# ---------------------------------------------------------------------------------------------
# Figures and the alternation of sides
# ---------------------------------------------------------------------------------------------
@dataclass
class Figure:
    """One row of the table: ours vs peer, their ratio and the goal it is held to."""

    name: str
    what: str  # ours vs peer, in words
    unit: str  # of `ours` and `peer`
    goal: float
    higher_is_better: bool  # the ratio passes when >= goal (else when <= goal)
    ours: float | None = None  # median over repetitions
    peer: float | None = None
    ratio: float | None = None  # median of the per-repetition ratios ours / peer
    threads: int | None = None  # torch intra-op threads of each process that ran it
    processes: int = 1
    repetitions: int = 0
    samples: dict[str, list[float]] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None  # why it did not run (the machine lacks what it needs)
    error: str | None = None  # why it failed (a worker process raised, died or hung)

    @property
    def passed(self) -> bool | None:
        if self.error is not None:
            return False
        if self.ratio is None:
            return None
        return self.ratio >= self.goal if self.higher_is_better else self.ratio <= self.goal

    @property
    def goal_text(self) -> str:
        return f"{'>=' if self.higher_is_better else '<='} {self.goal:g}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed, "goal_text": self.goal_text}


def alternate(sides: Mapping[str, Callable[[], float]], repetitions: int) -> dict[str, list[float]]:
    """Run the sides in turn `repetitions` times, in the order A B, then B A, then A B ...; each
    side's samples in order.

    Reversing the order every repetition lets each side go first equally often, so an effect of
    position (the allocator's or the cache's state left by the other side, a clock that ramps up)
    cancels out of the median ratio instead of biasing it toward one side.
    """
    samples: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for rep in range(repetitions):
        for name in (names if rep % 2 == 0 else names[::-1]):
            samples[name].append(float(sides[name]()))
    return samples


def summarize(figure: Figure, ours: Sequence[float], peer: Sequence[float]) -> Figure:
    """Fill `figure` from paired samples: medians of each side and the median of the ratios."""
    assert len(ours) == len(peer) > 0
    figure.samples = {"ours": list(ours), "peer": list(peer)}
    figure.repetitions = len(ours)
    figure.ours, figure.peer = statistics.median(ours), statistics.median(peer)
    figure.ratio = statistics.median(a / b for a, b in zip(ours, peer))
    return figure


def set_threads(threads: int) -> int:
    if threads < 1:
        raise ConfigError(f"bench threads must be a positive number, got {threads}")
    torch.set_num_threads(int(threads))
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------
# Worker processes (gloo on CPU, NCCL on GPU)
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def quiet_lightning(*others: str) -> Iterator[None]:
    """Lightning's banners (devices, tips) and its PossibleUserWarnings off, for the runs the bench
    times; loggers named in `others` (e.g. a strategy's per-run config line) down to warnings too."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", *others)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="lightning")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _process_main(fn: Callable[..., Any], rank: int, world: int, port: int, backend: str, threads: int,
                  spec: Mapping[str, Any], results: Any) -> None:

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=120))
        buf = io.BytesIO()
        with quiet_lightning("asrbench.strategies"):
            value = fn(rank, world, spec)
        torch.save(value, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # report everything to the parent, which names the rank
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_processes(fn: Callable[[int, int, Mapping[str, Any]], Any], world: int, spec: Mapping[str, Any], *,
                  backend: str = "gloo", threads: int = 1, timeout_s: float = 600.0) -> list[Any]:
    """`[fn(rank, world, spec) for each rank]`, each rank its own process in one process group."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_process_main, args=(fn, r, world, port, backend, threads, dict(spec), results),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    while len(values) + len(errors) < world and time.monotonic() < deadline:
        try:
            rank, ok, payload = results.get(timeout=0.2)
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and results.empty():
                break
            continue
        if ok:
            values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        else:
            errors[rank] = payload
    for rank, p in enumerate(procs):
        p.join(max(0.0, min(10.0, deadline - time.monotonic())))
        if p.is_alive():
            p.kill()
            p.join(5)
            errors.setdefault(rank, f"still running after {timeout_s:.0f} s")
        if rank not in values:
            errors.setdefault(rank, f"exit code {p.exitcode}")
    results.close()
    if errors:
        first = min(errors)
        raise BenchError(f"bench worker rank {first} of {world} failed: {errors[first].strip().splitlines()[-1]}"
                         f"\n{errors[first]}")
    return [values[r] for r in range(world)]
