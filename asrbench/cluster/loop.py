"""The simulated cluster's training loop: epochs, stopping, validation and checkpoints, as Lightning's fit loop runs them.

:func:`fit` drives a :class:`asrbench.cluster.simulated.SimulatedCluster` over every worker's shard
with the Trainer knobs of :class:`LoopConfig`; :func:`resume_state` and :func:`load_resume_state`
turn the cluster and the loop's position (:class:`FitOutcome`) into a checkpoint entry and back.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from asrbench.cluster.state import rng_state, set_rng_state
from asrbench.data.dataset import make_loader, train_batches_per_epoch
from asrbench.errors import ConfigError

if TYPE_CHECKING:
    from asrbench.cluster.simulated import SimulatedCluster

log = logging.getLogger(__name__)

# Trainer keys (conf/trainer/) the simulated loop follows, and those with no meaning for it.
TRAINER_KEYS = frozenset({"max_epochs", "max_steps", "max_time", "val_check_interval", "check_val_every_n_epoch",
                          "log_every_n_steps", "gradient_clip_val", "gradient_clip_algorithm",
                          "enable_progress_bar"})
TRAINER_KEYS_WITHOUT_EFFECT = frozenset({"num_sanity_val_steps", "enable_model_summary", "enable_checkpointing",
                                         "benchmark", "default_root_dir"})


def parse_max_time(value: Any) -> float | None:
    """Seconds from Lightning's `max_time` forms: "DD:HH:MM:SS", {days:, hours:, ...}, a timedelta."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, str):
        parts = value.strip().split(":")
        try:
            days, hours, minutes, seconds = (int(p) for p in parts)
        except ValueError:
            raise ConfigError(f"trainer.max_time={value!r} must read DD:HH:MM:SS, e.g. 00:08:00:00") from None
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds).total_seconds()
    if isinstance(value, Mapping):
        return timedelta(**dict(value)).total_seconds()
    raise ConfigError(f"trainer.max_time={value!r} must read DD:HH:MM:SS or be a mapping such as {{hours: 8}}")


@dataclass
class LoopConfig:
    """The Trainer knobs (conf/trainer/) the simulated loop follows, with Lightning's meanings."""

    max_epochs: int | None = 10  # None: no limit
    max_steps: int = -1  # -1: no limit
    max_time_s: float | None = None
    val_check_interval: float | int = 1.0  # fraction of an epoch, or training batches
    check_val_every_n_epoch: int | None = 1
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    enable_progress_bar: bool = True

    @classmethod
    def from_trainer(cls, trainer: Mapping[str, Any]) -> LoopConfig:
        for key, value in trainer.items():
            if key not in TRAINER_KEYS and key not in TRAINER_KEYS_WITHOUT_EFFECT and value is not None:
                log.warning("trainer.%s=%r is a Lightning Trainer option cluster=simulated does not follow", key, value)
        max_steps = int(trainer.get("max_steps", -1) if trainer.get("max_steps") is not None else -1)
        max_epochs = trainer.get("max_epochs")
        if max_epochs is None:  # Lightning: 1000 epochs unless max_steps limits the run
            max_epochs = 1000 if max_steps == -1 else -1
        return cls(max_epochs=None if int(max_epochs) < 0 else int(max_epochs), max_steps=max_steps,
                   max_time_s=parse_max_time(trainer.get("max_time")),
                   val_check_interval=trainer.get("val_check_interval", 1.0) or 1.0,
                   check_val_every_n_epoch=trainer.get("check_val_every_n_epoch", 1),
                   log_every_n_steps=int(trainer.get("log_every_n_steps", 10) or 10),
                   gradient_clip_val=trainer.get("gradient_clip_val") or None,
                   gradient_clip_algorithm=trainer.get("gradient_clip_algorithm") or "norm",
                   enable_progress_bar=bool(trainer.get("enable_progress_bar", True)))


@dataclass
class FitOutcome:
    """What the loop did, and where it stands (saved in checkpoints: a resumed loop starts there)."""

    steps: int = 0
    epochs: int = 0  # epochs begun (the last one may have stopped early)
    train_time_s: float = 0.0  # inside train_step, validation and data loading excluded
    fit_wall_s: float = 0.0
    stopped_by: str = "max_epochs"  # max_epochs | max_steps | max_time | interrupted
    losses: list[float] = field(default_factory=list)  # mean over workers, per step
    epoch: int = 0  # the epoch the next step belongs to
    batch_in_epoch: int = 0  # batches of that epoch already trained
    pending_validation: bool = False  # a validation came due and waits for a block end (BMUF)


def worker_loaders(dataset: Dataset, nodes: int, *, batch_size: int, seed: int) -> list[Any]:
    """Worker i's training loader: exactly the real path's (SpeechDataModule.train_dataloader) on rank i."""
    return [make_loader(dataset, batch_size=batch_size, shuffle=True, seed=seed, rank=i, world_size=nodes,
                        drop_last=True) for i in range(nodes)]


def _total_steps(loop: LoopConfig, per_epoch: int) -> int | None:
    """Optimizer steps the run may take (max_epochs and max_steps together), None without a limit."""
    total = per_epoch * loop.max_epochs if loop.max_epochs is not None else None
    if loop.max_steps >= 0:
        total = loop.max_steps if total is None else min(total, loop.max_steps)
    return total


def _epoch_iterators(loaders: list[Any], epoch: int, batch_in_epoch: int) -> list[Iterator[Any]]:
    """Every worker's batches of `epoch`, after ``set_epoch`` and skipping the `batch_in_epoch` already trained."""
    for loader in loaders:
        _set_sampler_epoch(loader, epoch)
        if batch_in_epoch:
            loader.batch_sampler.resume_at(epoch, batch_in_epoch)
    return [iter(loader) for loader in loaders]


def _stop_reason(loop: LoopConfig, out: FitOutcome, t_start: float,
                 stop_requested: Callable[[], bool] | None) -> str | None:
    """Why the loop ends after this step (max_steps, max_time, interrupted), None to go on."""
    if 0 <= loop.max_steps <= out.steps:
        return "max_steps"
    if loop.max_time_s is not None and time.perf_counter() - t_start >= loop.max_time_s:
        return "max_time"
    if stop_requested is not None and stop_requested():
        return "interrupted"
    return None


def fit(cluster: SimulatedCluster, dataset: Dataset, *, batch_size: int, seed: int, loop: LoopConfig,
        on_step: Callable[[SimulatedCluster, Tensor, int, int], None] | None = None,
        validate: Callable[[int, int], None] | None = None, start: FitOutcome | None = None,
        stop_requested: Callable[[], bool] | None = None, save: Callable[[FitOutcome], None] | None = None,
        every_n_steps: int = 0) -> FitOutcome:
    """Train every worker on its shard, epoch by epoch, until max_epochs, max_steps or max_time.

    Each epoch calls ``set_epoch(epoch)`` on every worker's sampler the way Lightning's fit loop
    does (``_set_sampler_epoch``). `on_step(cluster, losses, step, epoch)` runs after each
    optimizer step (step counted from 1), `validate(epoch, step)` where Lightning would validate.

    Checkpoints and interruptions: `save(outcome)` runs at every epoch end and, with
    `every_n_steps`, after every n-th step, unless training ends there; `stop_requested()` is
    asked after each step and, when true, ends the loop there (``stopped_by="interrupted"``).
    `start` (a saved outcome, with the cluster loaded from the same checkpoint) continues at its
    position: its epoch, skipping the batches of it already trained (no data is read for them).
    """
    loaders = worker_loaders(dataset, cluster.nodes, batch_size=batch_size, seed=seed)
    per_epoch = train_batches_per_epoch(len(dataset), batch_size=batch_size, world_size=cluster.nodes)
    assert per_epoch == len(loaders[0])
    interval = loop.val_check_interval
    val_every = max(1, int(per_epoch * interval)) if isinstance(interval, float) else int(interval)
    total = _total_steps(loop, per_epoch)
    out = FitOutcome() if start is None else dataclasses.replace(start, losses=list(start.losses),
                                                                 stopped_by="max_epochs")
    assert out.batch_in_epoch < per_epoch, "a saved position lies inside an epoch"
    t_start = time.perf_counter() - out.fit_wall_s
    bar = tqdm(total=total, initial=out.steps, desc=f"simulated {cluster.kind} x{cluster.nodes}", unit="step",
               disable=not loop.enable_progress_bar, dynamic_ncols=True)
    epoch = out.epoch
    stop = total is not None and out.steps >= total
    if stop and 0 <= loop.max_steps <= out.steps:
        out.stopped_by = "max_steps"

    def checkpoint() -> None:
        out.fit_wall_s = time.perf_counter() - t_start
        if save is not None:
            save(out)

    while not stop and (loop.max_epochs is None or epoch < loop.max_epochs):
        iterators = _epoch_iterators(loaders, epoch, out.batch_in_epoch)
        out.epoch, out.epochs = epoch, max(out.epochs, epoch + 1)
        for batch_idx in range(out.batch_in_epoch, per_epoch):
            batches = [next(it) for it in iterators]
            t0 = time.perf_counter()
            losses = cluster.train_step(batches)
            out.train_time_s += time.perf_counter() - t0
            out.steps += 1
            out.batch_in_epoch = batch_idx + 1
            out.losses.append(float(losses.mean()))
            bar.update(1)
            if out.steps % loop.log_every_n_steps == 0:
                bar.set_postfix(loss=f"{out.losses[-1]:.3f}")
            if on_step is not None:
                on_step(cluster, losses, out.steps, epoch)
            check_epoch = loop.check_val_every_n_epoch is None or (epoch + 1) % loop.check_val_every_n_epoch == 0
            due = validate is not None and check_epoch and (batch_idx + 1) % val_every == 0
            out.pending_validation = out.pending_validation or due
            if out.pending_validation and (not cluster.blockwise or cluster.synced):
                validate(epoch, out.steps)
                out.pending_validation = False
            reason = _stop_reason(loop, out, t_start, stop_requested)
            if reason is not None:
                stop, out.stopped_by = True, reason
                break
            if every_n_steps and out.steps % every_n_steps == 0 and out.batch_in_epoch < per_epoch:
                checkpoint()  # the epoch's end saves below
        if out.batch_in_epoch == per_epoch:  # the epoch is complete (a stop mid-epoch keeps its position)
            cluster.end_epoch(epoch)
            epoch += 1
            out.epoch, out.batch_in_epoch = epoch, 0
            if not stop and (loop.max_epochs is None or epoch < loop.max_epochs):
                checkpoint()
    bar.close()
    out.fit_wall_s = time.perf_counter() - t_start
    return out


CHECKPOINT_KEY = "asrbench_simulated"  # checkpoint entry: the simulated cluster's exact state (resume_state)


def _copied(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    return value


def resume_state(cluster: SimulatedCluster, outcome: FitOutcome, *, copy: bool = False) -> dict[str, Any]:
    """A checkpoint's ``asrbench_simulated`` entry: the cluster (:meth:`SimulatedCluster.state_dict`),
    the loop's position and counters (`outcome`) and this process's RNG states. With `copy`, no tensor
    is shared with the live cluster (to keep it across later steps, e.g. BMUF's final block)."""
    entry = {"cluster": cluster.state_dict(), "fit": dataclasses.asdict(outcome), "rng": rng_state(cluster.device)}
    return _copied(entry) if copy else entry


def load_resume_state(cluster: SimulatedCluster, entry: Mapping[str, Any]) -> FitOutcome:
    """Load :func:`resume_state`'s `entry` into a freshly built `cluster`; returns the `start` of :func:`fit`."""
    cluster.load_state_dict(entry["cluster"])
    set_rng_state(entry["rng"], cluster.device)
    return FitOutcome(**entry["fit"])

