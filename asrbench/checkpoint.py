"""Checkpoints a user can trust: what run wrote them, whether a new run may resume from them, a
graceful Ctrl-C, and which checkpoint a failed run leaves behind.

Resume rule (documented in README): a run resumes only from a checkpoint written by the same
strategy with the same number of workers and the same model, criterion and input features.
Every strategy keeps state tied to both: GTC one residual per rank, BMUF the block's global
model and momentum, all of them the per-rank data shards of DistributedSampler. Anything else
is refused before any process starts, in one line naming the checkpoint and the difference.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from asrbench.errors import AsrbenchError, CheckpointError

log = logging.getLogger(__name__)

KEY = "asrbench"  # the checkpoint entry holding the writing run's identity
# Keys of the identity that must match for a resume, with what to tell the user about each.
MUST_MATCH = ("strategy", "nodes", "model", "criterion", "input_dim", "phone_probe")


class Interrupted(AsrbenchError):
    """The user stopped the run (Ctrl-C); a checkpoint was saved."""

    exit_code = 130


def identity(cfg: DictConfig, input_dim: int, num_phones: int = 0) -> dict[str, Any]:
    """What a checkpoint must agree on with a run that resumes from it (a phone probe's classes only when
    the model has one, so checkpoints written before probes existed still match a run without)."""
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    ident = {"strategy": str(cfg.strategy.name), "nodes": int(cfg.nodes), "model": model,
             "criterion": str(cfg.criterion), "input_dim": int(input_dim), "format": 1}
    return ident | ({"phone_probe": int(num_phones)} if num_phones else {})


class RunIdentity(L.Callback):
    """Writes the run's identity into every checkpoint (``checkpoint["asrbench"]``)."""

    def __init__(self, ident: Mapping[str, Any]) -> None:
        self.ident = dict(ident)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[KEY] = dict(self.ident)


def launching_process() -> bool:
    """Whether this is rank 0's process, the one that speaks for the run: every rank loads the same
    weights and receives the same Ctrl-C, and the console should hear of it once. Global rank 0 under
    any launcher (torchrun, srun, Lightning's): asrbench.slurm.is_global_zero."""
    from asrbench.slurm import is_global_zero

    return is_global_zero(os.environ)


def resolve_resume(resume: str | Path, key: str = "resume") -> Path:
    """`resume=` (or `init_from=`) may name a checkpoint file or a run dir (its checkpoints/last.ckpt)."""
    path = Path(resume)
    if path.is_dir():
        candidate = path / "checkpoints" / "last.ckpt"
        if not candidate.is_file():
            raise CheckpointError(f"{key}={resume}: directory without checkpoints/last.ckpt; pass a .ckpt file "
                                  f"(e.g. <run>/checkpoints/interrupted.ckpt) or a run dir that wrote one")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"{key}={resume}: no such checkpoint; pass <run>/checkpoints/last.ckpt or a run dir")
    return path


def read(path: Path) -> dict[str, Any]:
    """Load a checkpoint's dictionary (tensors memory-mapped), or one line saying why it cannot be."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, not a torch file, pickled code, I/O error
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {reason}); it may be "
                              f"truncated or not a checkpoint: resume from another one or start without resume=") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict); resume from "
                              f"<run>/checkpoints/*.ckpt written by asrbench train")
    return ckpt


def identity_differences(path: Path, ckpt: Mapping[str, Any], expected: Mapping[str, Any],
                         keys: tuple[str, ...], advice: str) -> list[str]:
    """`key=<checkpoint's> (this run: <expected>)` for each of `keys` that differs; a checkpoint
    without asrbench's identity is refused with `advice`."""
    found = ckpt.get(KEY)
    if not isinstance(found, Mapping):
        raise CheckpointError(f"{path}: written without asrbench's run identity (not by `asrbench train`); {advice}")
    return [f"{k}={_show(found.get(k))} (this run: {_show(expected.get(k))})"
            for k in keys if _norm(found.get(k)) != _norm(expected.get(k))]


def check_resume(resume: str | Path, expected: Mapping[str, Any]) -> Path:
    """The checkpoint `resume` names, after checking it can be resumed by a run of `expected` identity."""
    path = resolve_resume(resume)
    diffs = identity_differences(path, read(path), expected, MUST_MATCH, "resume only from checkpoints asrbench wrote")
    if diffs:
        raise CheckpointError(f"{path}: written by a different run: {'; '.join(diffs)}. A run resumes only with the "
                              f"strategy, nodes, model, criterion and features it started with; change them back "
                              f"or start a fresh run without resume=")
    return path


WEIGHT_KEYS = ("model", "criterion", "input_dim", "phone_probe")


def load_initial_weights(module: torch.nn.Module, init_from: str | Path, expected: Mapping[str, Any]) -> Path:
    """Warm start: copy the model weights of checkpoint `init_from` into `module` (a LightningModule
    of the same model); optimizer, step counters and strategy state start fresh. Any strategy and
    worker count may start from it (CNTK's parallelizationStartEpoch: train the first epochs on one
    worker, then go parallel)."""
    path = resolve_resume(init_from, key="init_from")
    ckpt = read(path)
    diffs = identity_differences(path, ckpt, expected, WEIGHT_KEYS, "init_from= takes checkpoints asrbench wrote")
    if diffs:
        raise CheckpointError(f"{path}: init_from needs the same model, criterion and features: {'; '.join(diffs)}")
    state = {k: v.clone() for k, v in ckpt["state_dict"].items()}
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its weights do not fit this model ({' '.join(str(err).split())[:200]})") from None
    if launching_process():
        log.info("model weights initialised from %s (step %s)", path, ckpt.get("global_step"))
    return path


def _norm(v: Any) -> Any:
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def _show(v: Any) -> str:
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {x}" for k, x in v.items()) + "}"
    return str(v)


def last_checkpoint(ckpt_dir: Path) -> tuple[Path, int | None] | None:
    """The newest checkpoint in `ckpt_dir` and its global step (None when unreadable), or None."""
    files = sorted(Path(ckpt_dir).glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if Path(ckpt_dir).is_dir() else []
    if not files:
        return None
    path = files[-1]
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    except Exception:
        step = None
    return path, step


def describe_last_checkpoint(ckpt_dir: Path) -> str:
    found = last_checkpoint(ckpt_dir)
    if found is None:
        return "no checkpoint was written yet (checkpoint_every_n_steps=N writes them mid-epoch)"
    path, step = found
    at = f" (step {step})" if step is not None else ""
    return f"last checkpoint {path}{at}: continue with resume={path}"


class GracefulStop(L.Callback):
    """Ctrl-C (SIGINT) stops training after the current step and saves a checkpoint.

    The signal only sets a flag. Every `check_every` steps the ranks agree on it (one all-reduce
    of a single integer over the default group), so all of them stop after the same step and
    save together: the checkpoint of a multi-process run is as consistent as any other (GTC
    residuals and BMUF block state included). A second Ctrl-C interrupts at once, as usual.
    """

    def __init__(self, path: Path, check_every: int = 10) -> None:
        self.path = Path(path)
        self.check_every = max(1, int(check_every))
        self.requested = False
        self.saved_step: int | None = None
        self._previous: Any = None

    @property
    def stopped(self) -> bool:
        return self.saved_step is not None

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)  # a second Ctrl-C: at once
        if launching_process():
            log.warning("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort now)")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _agreed(self, trainer: L.Trainer) -> bool:
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            device = trainer.strategy.root_device if dist.get_backend() == "nccl" else torch.device("cpu")
            flag = torch.tensor([int(self.requested)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())
        return self.requested

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.stopped or (trainer.global_step % self.check_every and not (trainer.world_size == 1 and self.requested)):
            return
        if not self._agreed(trainer):
            return
        trainer.save_checkpoint(str(self.path))
        self.saved_step = int(trainer.global_step)
        trainer.should_stop = True
