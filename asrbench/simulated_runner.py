"""`cluster=simulated`'s runner: N workers in this process on the simulated cluster
(:mod:`asrbench.cluster.simulated`), behind the same interface as Lightning's (asrbench.fitting.Runner)."""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from asrbench import checkpoint
from asrbench.cluster import cost
from asrbench.cluster.simulated import (
    CHECKPOINT_KEY,
    Diverged,
    FitOutcome,
    LoopConfig,
    SimulatedCluster,
    activation_bytes,
    check_memory,
    fit,
    load_resume_state,
    predict,
    resolve_device,
    resume_state,
    stacked_arrays,
)
from asrbench.data import text
from asrbench.data.dataset import SpeechDataset
from asrbench.errors import CheckpointError, RunFailed
from asrbench.fitting import FitResult, MetricsHistory, lr_of_run
from asrbench.inputs import RunData, feature_dim
from asrbench.model.evaluate import evaluate_split
from asrbench.model.module import AcousticModule
from asrbench.wandb_log import finish_wandb

log = logging.getLogger("asrbench.experiment")  # the run's log lines keep the run's logger name


@dataclass
class _TrainerView:
    """What :class:`MetricsHistory` reads from a Lightning Trainer, filled by the simulated loop."""

    global_step: int = 0
    current_epoch: int = 0
    callback_metrics: dict[str, float] = field(default_factory=dict)
    is_global_zero: bool = True
    sanity_checking: bool = False


class SimulatedRunner:
    """``cluster=simulated``: `nodes` workers in this process (:class:`SimulatedCluster`), and the
    cost model's prediction of their step time and speedup on ``cluster.network``
    (:func:`asrbench.cluster.simulated.predict`), added to the results with ``simulated: true``."""

    progress = True

    def __init__(self, cfg: DictConfig, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.cfg, self.out_dir = cfg, out_dir
        self.network = cost.load_network(cfg.cluster.get("network") or "paper")
        self.profile = cost.load_compute_profile(cfg.cluster.get("compute_profile"))
        self.loop = LoopConfig.from_trainer(OmegaConf.to_container(cfg.trainer, resolve=True))
        self.device = resolve_device(cfg.accelerator)
        self.fraction = float(cfg.cluster.get("memory_fraction", 0.9))
        if cfg.cluster.get("threads"):
            torch.set_num_threads(int(cfg.cluster.threads))
        self.arrays: dict[str, int] = {}

    def before_data(self, module: AcousticModule, strategy: Any) -> None:
        """Refuse, before any data is read, workers whose stacked arrays cannot fit in memory."""
        self.arrays = stacked_arrays(OmegaConf.to_container(self.cfg.strategy, resolve=True), module.optim_cfg,
                                     int(self.cfg.nodes))
        check_memory(int(self.cfg.nodes), _numel(module), self.arrays, self.device, fraction=self.fraction,
                     report=False)

    def fit(self, module: AcousticModule, strategy: Any, data: RunData, logger: Any, *,
            ident: Mapping[str, Any], resume: str | None) -> FitResult:
        """The workers trained (from `resume`'s checkpoint if given), and the cost model's prediction."""
        cfg, nodes, train = self.cfg, int(self.cfg.nodes), data.feats["train"]
        train_set = SpeechDataset(train, data.frame_labels)
        max_frames = int(train.lengths.max()) if len(train) else 0
        check_memory(nodes, _numel(module), self.arrays, self.device, fraction=self.fraction,
                     activations=activation_bytes(OmegaConf.to_container(cfg.model, resolve=True), feature_dim(cfg),
                                                  text.vocab_size(), int(cfg.batch_size), max_frames))
        if int(cfg.num_workers):
            log.info("cluster=simulated reads every worker's batches in this process (num_workers=%s unused)",
                     cfg.num_workers)
        cluster = SimulatedCluster(module, strategy, nodes, device=self.device,
                                   gradient_clip_val=self.loop.gradient_clip_val,
                                   gradient_clip_algorithm=self.loop.gradient_clip_algorithm,
                                   batched_sync=bool(cfg.cluster.get("batched_sync", False)))
        on_step, validate, last = self._callbacks(cluster, data, logger)
        start = load_resume_state(cluster, _simulated_entry(Path(resume))) if resume else None
        last["frames"] = cluster.timings.frames  # a resumed cluster's counts continue
        outcome = self._train(cluster, module, train_set, logger, ident, on_step, validate, start)
        # the loop's state before BMUF's final block closes: a longer run continues from there
        entry = resume_state(cluster, outcome, copy=cluster.blockwise)
        cluster.finalize()
        t = cluster.timings
        prediction = predict(cluster, self.network, profile=self.profile,
                             overlap=float(cfg.cluster.get("overlap", 0.0)),
                             frames_per_worker_step=t.frames / max(t.worker_steps, 1)
                             ) if outcome.steps else {"simulated": True}
        checkpoint.save_atomic(_simulated_checkpoint(cluster, module, outcome, ident, entry),
                               self.out_dir / "checkpoints" / "last.ckpt")
        # train_time_s: the time this process spent training all workers, one after another.
        return FitResult(steps=outcome.steps, epochs=outcome.epochs, train_frames=t.frames,
                         fit_wall_s=outcome.fit_wall_s, train_time_s=outcome.train_time_s, model=cluster.module.model,
                         comm_summary=cluster.comm_summary(),
                         extra={"stopped_by": outcome.stopped_by,
                                "simulator_s": {"compute": t.compute_s, "exchange": t.exchange_s,
                                                "optimizer": t.optimizer_s, "averaging": t.averaging_s},
                                **prediction})

    def _callbacks(self, cluster: SimulatedCluster, data: RunData, logger: Any) -> tuple[Any, Any, dict[str, Any]]:
        """The loop's on_step and validate (metrics.jsonl and the logger), and the last step's time and frames."""
        history = MetricsHistory(self.out_dir / "metrics.jsonl", self.loop.log_every_n_steps)
        view = _TrainerView()
        last = {"t": time.perf_counter(), "frames": 0}
        history.t0 = last["t"]

        def on_step(c: SimulatedCluster, losses: Tensor, step: int, epoch: int) -> None:
            now = time.perf_counter()
            frames = c.timings.frames - last["frames"]
            metrics = {"train/loss": float(losses.mean()), "train/frames_per_s": frames / max(now - last["t"], 1e-9)}
            metrics |= {f"comm/{k}": float(v) for k, v in c.comm_metrics().items()}
            last.update(t=now, frames=c.timings.frames)
            view.global_step, view.current_epoch = step, epoch
            view.callback_metrics.update(metrics)
            history.on_train_batch_end(view, None, None, None, step - 1)
            if logger and step % self.loop.log_every_n_steps == 0:
                logger.log_metrics(metrics, step=step)

        def validate(epoch: int, step: int) -> None:
            cluster.bind_global_model()  # BMUF: W_g at this block end, not a worker's local model
            res = evaluate_split(cluster.module.model, data.feats["dev"], data.frame_labels, device=self.device,
                                 batch_size=int(self.cfg.eval_batch_size), criterion=self.cfg.criterion)
            cluster.module.model.train()
            metrics = {"val/wer": res["wer"], "val/cer": res["cer"]}
            if res["loss"] is not None:  # what the Trainer path logs as val/loss
                metrics["val/loss"] = res["loss"]
            if res["fer"] is not None:
                metrics["val/fer"] = res["fer"]
            view.global_step, view.current_epoch = step, epoch
            view.callback_metrics.update(metrics)
            history.on_validation_end(view, None)
            if logger:
                logger.log_metrics(metrics, step=step)

        return on_step, validate, last

    def _train(self, cluster: SimulatedCluster, module: AcousticModule, train_set: SpeechDataset, logger: Any,
               ident: Mapping[str, Any], on_step: Any, validate: Any, start: Any) -> FitOutcome:
        """The loop under the stop signals, last.ckpt as it goes; a divergence is RunFailed, a stop interrupted.ckpt."""
        cfg, ckpt_dir = self.cfg, self.out_dir / "checkpoints"

        def save(out: FitOutcome, path: Path = ckpt_dir / "last.ckpt") -> None:  # epoch ends, every n steps, a stop
            checkpoint.save_atomic(_simulated_checkpoint(cluster, module, out, ident), path)

        signals = checkpoint.StopSignals()
        try:
            with signals.installed():
                outcome = fit(cluster, train_set, batch_size=int(cfg.batch_size), seed=int(cfg.seed), loop=self.loop,
                              on_step=on_step, validate=validate, start=start,
                              stop_requested=lambda: bool(signals.signum), save=save,
                              every_n_steps=int(cfg.get("checkpoint_every_n_steps") or 0))
        except Diverged as err:
            self.close(logger, "failed")
            what = f"training hit NaN or inf at step {err.step} ({str(err).removeprefix(f'step {err.step}: ')})"
            raise RunFailed(f"{checkpoint.divergence_message(what, *lr_of_run(cfg, module))}; "
                            f"{checkpoint.describe_last_checkpoint(ckpt_dir)}") from None
        if outcome.stopped_by == "interrupted":
            stop_path = ckpt_dir / "interrupted.ckpt"
            save(outcome, stop_path)
            self.close(logger, "interrupted")
            raise checkpoint.interrupted(signals.signum, outcome.steps, stop_path)
        return outcome

    def close(self, logger: Any, status: str = "success") -> None:
        if logger:
            logger.finalize(status)
        finish_wandb(logger)


def _simulated_checkpoint(cluster: SimulatedCluster, module: AcousticModule, outcome: FitOutcome,
                          ident: Mapping[str, Any], entry: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A cluster=simulated checkpoint: the run's one model as `state_dict` (what init_from=, eval and align
    read; BMUF's W_g), its identity, and the cluster's exact state (`entry`, else taken now) that resume= loads."""
    entry = resume_state(cluster, outcome) if entry is None else entry
    cluster.bind_global_model()  # views only: the next step binds each worker's row again
    return {"state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
            "hyper_parameters": dict(module.hparams), "global_step": outcome.steps, "epoch": outcome.epochs,
            "simulated": True, checkpoint.KEY: dict(ident), CHECKPOINT_KEY: entry}


def _simulated_entry(path: Path) -> Mapping[str, Any]:
    """The simulated cluster's state in checkpoint `path` (already checked against the run's identity)."""
    entry = torch.load(path, map_location="cpu", weights_only=True).get(CHECKPOINT_KEY)  # not mapped: trained on
    if not isinstance(entry, Mapping):
        raise CheckpointError(f"{path}: holds no simulated cluster's state (written by cluster=processes, or by a "
                              f"cluster=simulated run before its checkpoints could resume); resume it with the "
                              f"cluster that wrote it, or start without resume=")
    return entry


def _numel(module: AcousticModule) -> int:
    return sum(p.numel() for p in module.model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- the run
