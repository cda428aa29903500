"""What both of a run's runners share (asrbench.experiment's TrainerRunner over real processes and
asrbench.simulated_runner's SimulatedRunner): the fit's result, the runner interface, the metrics
history callback, and the lr and frame counts a run reports."""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from omegaconf import DictConfig

from asrbench.inputs import RunData
from asrbench.model.module import AcousticModule, scaled_lr


class MetricsHistory(L.Callback):
    """Rank 0 appends logged scalars to `<run dir>/metrics.jsonl` (curves without a logger), each row
    with `time_s`, the wall time since training started (curves against time)."""

    def __init__(self, path: Path, every_n_steps: int) -> None:
        self.path, self.every = Path(path), max(1, every_n_steps)
        self.t0: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()

    def _write(self, trainer: L.Trainer, prefix: tuple[str, ...]) -> None:
        if not trainer.is_global_zero:
            return
        if self.t0 is None:
            self.t0 = time.perf_counter()
        row = {k: float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith(prefix) and torch.as_tensor(v).numel() == 1}
        if row:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch,
                                    "time_s": round(time.perf_counter() - self.t0, 3)} | row) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self._write(trainer, ("train/", "comm/"))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, ("val/",))


@dataclass
class FitResult:
    """What a runner's fit hands back to the run: counts, times, the model to evaluate, bytes."""

    steps: int
    epochs: int
    train_frames: int  # all workers'
    fit_wall_s: float
    train_time_s: float  # the time those frames were trained in (each runner says which)
    model: torch.nn.Module  # the one model of the run
    comm_summary: Mapping[str, Any]  # the strategy's worker-0 means per step (empty: none)
    extra: dict[str, Any] = field(default_factory=dict)  # the runner's own results.json keys


class Runner(Protocol):
    """One way to fit a run's module: built from the config, it checks what it can before the data
    is read, fits, and closes the logger when the results are logged."""

    progress: bool  # this process shows data preparation progress

    def before_data(self, module: AcousticModule, strategy: Any) -> None: ...

    def fit(self, module: AcousticModule, strategy: Any, data: RunData, logger: Any, *,
            ident: Mapping[str, Any], resume: str | None) -> FitResult | None: ...

    def close(self, logger: Any) -> None: ...


def lr_of_run(cfg: DictConfig, module: AcousticModule) -> tuple[float, float, str]:
    """(optim.lr as configured, the peak lr the workers' optimizer steps with after optim.lr_scaling, the
    scaling rule): what a divergence message names (:func:`asrbench.checkpoint.divergence_message`)."""
    optim = module.optim_cfg  # inner_optim's: a *_group rule already applied to its lr
    peak = scaled_lr(float(optim["lr"]), str(optim.get("lr_scaling", "none")), module.world_size)
    return float(cfg.optim.lr), peak, str(cfg.optim.get("lr_scaling", "none"))


def all_frames(frames_seen: int, nodes: int, device: torch.device | str = "cpu") -> int:
    """Training frames of every rank: the sum over the process group (ranks' shards differ in length);
    called by every rank. Without a process group this process is the only worker."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        assert nodes == 1, "workers train in one process group"
        return int(frames_seen)
    total = torch.tensor([int(frames_seen)], dtype=torch.long, device=device)  # NCCL needs it on the GPU
    torch.distributed.all_reduce(total)
    return int(total.item())
