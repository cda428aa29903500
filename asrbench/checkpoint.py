"""Checkpoints a user can trust: what run wrote them, whether a new run may resume from them (or
which one `resume=auto` continues from), written whole or not at all, a graceful stop on Ctrl-C,
SIGTERM or SIGUSR1, a stop on a diverged loss, and which checkpoint a failed run leaves behind.

Resume rule (documented in README): a run resumes only from a checkpoint written by the same
strategy with the same number of workers and the same model, criterion and input features.
Every strategy keeps state tied to both: GTC one residual per rank, BMUF the block's global
model and momentum, all of them the per-rank data shards of DistributedSampler. Anything else
is refused before any process starts, in one line naming the checkpoint and the difference.
"""
from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from omegaconf import DictConfig, OmegaConf

from asrbench import runinfo
from asrbench.errors import AsrbenchError, CheckpointError, OutputError

log = logging.getLogger(__name__)

KEY = "asrbench"  # the checkpoint entry holding the writing run's identity
# Keys of the identity that must match for a resume, with what to tell the user about each.
MUST_MATCH = ("strategy", "nodes", "model", "criterion", "input_dim", "phone_probe")


class Interrupted(AsrbenchError):
    """A stop signal (Ctrl-C, SIGTERM, SIGUSR1) stopped the run; a checkpoint was saved. The exit
    status is :func:`stop_exit_code` of the signal (130 for Ctrl-C)."""

    exit_code = 130

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = stop_exit_code(signum)


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


# ---------------------------------------------------------------- which checkpoint continues a run
AUTO = "auto"  # resume=auto: the run dir's newest checkpoint if it has one, else a fresh start


def _step_of(path: Path) -> int | None:
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    except Exception:  # unreadable, or not a dictionary
        return None
    return int(step) if isinstance(step, int) else None


def last_checkpoint(ckpt_dir: Path) -> tuple[Path, int | None] | None:
    """The newest checkpoint in `ckpt_dir` and its global step, or None when there is none.

    Newest is the highest global step, then the latest written: an interrupted.ckpt taken mid-epoch
    after the last epoch end's last.ckpt continues the run from further on. An unreadable file is
    named (step None) only when no readable one exists."""
    directory = Path(ckpt_dir)
    files = [p for p in directory.glob("*.ckpt") if p.is_file()] if directory.is_dir() else []
    if not files:
        return None
    steps = {p: _step_of(p) for p in files}
    readable = [p for p in files if steps[p] is not None]
    if readable:
        path = max(readable, key=lambda p: (steps[p], p.stat().st_mtime))
    else:
        path = max(files, key=lambda p: p.stat().st_mtime)
    return path, steps[path]


def describe_last_checkpoint(ckpt_dir: Path) -> str:
    found = last_checkpoint(ckpt_dir)
    if found is None:
        return ("no checkpoint was written yet (last.ckpt is written at every epoch end, and every "
                "checkpoint_every_n_steps steps when set)")
    path, step = found
    at = f" (step {step})" if step is not None else ""
    return f"last checkpoint {path}{at}: continue with resume={path}"


def restarts() -> tuple[str, int]:
    """Who started this process again, and how often: a torchrun restart of the worker group
    (TORCHELASTIC_RESTART_COUNT) or a requeued SLURM job (SLURM_RESTART_COUNT); ("", 0) on a first start."""
    for what, key in (("torchrun restart", "TORCHELASTIC_RESTART_COUNT"), ("SLURM requeue", "SLURM_RESTART_COUNT")):
        try:
            n = int(os.environ.get(key, "0") or 0)
        except ValueError:
            n = 0
        if n > 0:
            return what, n
    return "", 0


def restart_count() -> int:
    """How often torchrun restarted this worker group or SLURM requeued this job (0 on a first start)."""
    return restarts()[1]


def auto_resume(run_dir: Path, expected: Mapping[str, Any]) -> Path | None:
    """`resume=auto` (and a torchrun restart): the newest checkpoint of `<run_dir>/checkpoints`, checked
    as `resume=` checks one, or None when the run dir has none yet (the run starts fresh)."""
    found = last_checkpoint(Path(run_dir) / "checkpoints")
    if found is None:
        if launching_process():
            log.info("resume=auto: no checkpoint in %s yet; starting from step 0", Path(run_dir) / "checkpoints")
        return None
    path = check_resume(found[0], expected)
    if launching_process():
        log.info("resume=auto: continuing from %s (step %s)", path, found[1])
    return path


# ---------------------------------------------------------------- writing checkpoints
_WRITE_ADVICE = {errno.ENOSPC: "free space on that disk", errno.EDQUOT: "free space within your quota",
                 errno.EFBIG: "raise the file size limit (ulimit -f)", errno.EROFS: "make it writable",
                 errno.EACCES: "make it writable", errno.EPERM: "make it writable"}


def save_atomic(checkpoint: Mapping[str, Any], path: str | Path) -> None:
    """Write `checkpoint` to `path` through a temporary file in the same directory, flushed to disk,
    and a rename: a resume, a kill or a full disk finds the previous complete file or the new one,
    never half of one or an empty one. A disk fault is one :class:`OutputError` naming `path`, the fix
    and the newest complete checkpoint beside it, the one a resume continues from."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(dict(checkpoint), buffer)  # in memory first: torch's file writer reports a full disk without errno
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~runinfo.umask())  # mkstemp's 0600 would hide the run's checkpoints from its group
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())  # else a crash soon after the rename can leave an empty file behind the new name
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        advice = _WRITE_ADVICE.get(err.errno, "check that directory")
        kept = "the previous one is unchanged" if path.is_file() else "none was there before"
        resume = f"; {describe_last_checkpoint(path.parent)}" if last_checkpoint(path.parent) else ""
        raise OutputError(f"{path}: the checkpoint could not be written ({err.strerror or err}; {kept}); {advice}, "
                          f"or write the run elsewhere with hydra.run.dir=DIR{resume}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with :func:`save_atomic` for writing (Lightning's own writes the
    target file in place: a kill or a full disk mid-write left a truncated or empty last.ckpt)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        save_atomic(checkpoint, path)


# ---------------------------------------------------------------- what results.json counts, across a resume
class RunCounts(L.Callback):
    """What a run's results.json counts, continued across a resume on Lightning's path: each rank's
    training frames and time inside training batches (the module's ``frames_seen`` and ``train_time_s``),
    the fit's wall time, and the strategy's CommStats (comm_steps and the bytes per step) where the
    strategy's own checkpoint state does not bring them back: sync's (GTC's, the hooks', PowerSGD's and
    BMUF's come back with their residuals, memory or block state).

    Every checkpoint holds every rank's counts as this callback's state (gathered to rank 0, which writes
    it); on a resume each rank sets its own back at train start, once Lightning has loaded the checkpoint.
    A checkpoint written before these were saved still resumes, its counts starting from the resume (a
    warning says so). The times are the sums of the pieces up to the checkpoint each one resumed from.
    """

    def __init__(self) -> None:
        self.resumed: dict[str, Any] | None = None  # this rank's counts from the checkpoint resumed, if it had any
        self._saved: Mapping[str, Any] | None = None  # every rank's, as loaded
        self._trainer: L.Trainer | None = None
        self._t0 = time.perf_counter()

    @property
    def fit_wall_s_before(self) -> float:
        """Seconds of fit wall time of the pieces before this one (0.0 without a resume)."""
        return float(self.resumed["fit_wall_s"]) if self.resumed else 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer, self._t0 = trainer, time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        """Called on every rank as a checkpoint is written (all of them write it together)."""
        trainer = self._trainer
        if trainer is None or trainer.lightning_module is None:
            return {}
        module, stats = trainer.lightning_module, getattr(trainer.strategy, "comm_stats", None)
        mine = {"frames_seen": int(module.frames_seen), "train_time_s": float(module.train_time_s),
                "fit_wall_s": self.fit_wall_s_before + time.perf_counter() - self._t0,
                "comm_stats": stats.state_dict() if stats is not None else None}
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return {"world_size": 1, "ranks": [mine]}
        ranks: list[Any] | None = [None] * trainer.world_size if trainer.is_global_zero else None
        dist.gather_object(mine, ranks, dst=0)
        return {"world_size": trainer.world_size, "ranks": ranks} if trainer.is_global_zero else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = state

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        if self._saved is None:
            if trainer.is_global_zero:
                log.warning("%s was written without the run's counts: results.json's train_frames, train_time_s and "
                            "fit_wall_s (and, for a strategy that does not checkpoint its own, comm_steps and the bytes "
                            "per step) count from this resume at step %d", trainer.ckpt_path, trainer.global_step)
            return
        assert self._saved["world_size"] == trainer.world_size, "a resume keeps nodes (MUST_MATCH)"
        self.resumed = mine = dict(self._saved["ranks"][trainer.global_rank])
        pl_module.frames_seen, pl_module.train_time_s = int(mine["frames_seen"]), float(mine["train_time_s"])
        stats = getattr(trainer.strategy, "comm_stats", None)
        if stats is not None and mine["comm_stats"] is not None and stats.steps == 0:  # not restored by the strategy
            stats.load_state_dict(mine["comm_stats"])


# ---------------------------------------------------------------- stopping: signals and divergence
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1"}
_NO_BAD_STEP = 2**62  # the agreement's encoding of "no rank saw a non-finite loss"


def stop_exit_code(signum: int) -> int:
    """128 + the signal's number, as a shell reports a process that signal ended: 130 for Ctrl-C,
    143 for SIGTERM, 138 for SIGUSR1. A job script tells a preempted run (143, 138) from a failed one
    (2) and requeues it; the requeued job continues with resume=auto."""
    return 128 + int(signum)


class _FlagOnlySignals(_SignalConnector):
    """Lightning's signal connector with :class:`Checkpointing`'s handler in place of Lightning's own.

    Lightning's SIGTERM handler broadcasts a tensor from inside the handler, on whichever rank the
    signal reaches and wherever that rank is: the ranks then wait in different collectives, and a
    SIGTERMed 2-process run hung until the collective timeout and saved nothing. Here a stop signal
    only sets a flag; :class:`Checkpointing` lets the ranks agree on it between steps."""

    def __init__(self, trainer: L.Trainer, handler: StopSignals) -> None:
        super().__init__(trainer)
        self.handler = handler

    def register_signal_handlers(self) -> None:
        self.received_sigterm = False  # never set: Lightning's loops then raise no SIGTERMException of their own
        self._original_handlers = self._get_current_signal_handlers()  # restored by teardown()
        for signum in STOP_SIGNALS:
            self._register_signal(signum, self.handler)


class StopSignals:
    """Ctrl-C (SIGINT), SIGTERM and SIGUSR1 only set a flag (:attr:`signum`, the first one received);
    the loop asks for it between steps and stops there with a checkpoint. The first Ctrl-C unhooks
    itself, so a second one interrupts at once; a repeated SIGTERM changes nothing. Used by
    :class:`Checkpointing` (through Lightning's signal connector) and by the simulated cluster's
    runner (:meth:`installed`, around its loop)."""

    def __init__(self) -> None:
        self.signum = 0  # the first stop signal this process received (0: none)
        self._previous_sigint: Any = None

    def remember_sigint(self) -> None:
        """Keep the SIGINT handler a second Ctrl-C gets back (taken before this one is installed)."""
        self._previous_sigint = signal.getsignal(signal.SIGINT)

    def __call__(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:  # not reached: the first one unhooks itself
            return
        first = not self.signum
        self.signum = self.signum or int(signum)
        if signum == signal.SIGINT and threading.current_thread() is threading.main_thread():
            previous = self._previous_sigint
            signal.signal(signal.SIGINT, previous if callable(previous) else signal.default_int_handler)
        if first and launching_process():
            again = " (Ctrl-C again to abort now)" if signum == signal.SIGINT else ""
            log.warning("%s: stopping after this step and saving a checkpoint%s", STOP_SIGNALS[signum], again)

    @contextlib.contextmanager
    def installed(self):
        """This handler for every stop signal while the block runs, the previous handlers after it (only
        the main thread may set handlers: elsewhere the block runs with the process's own)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        self.remember_sigint()
        try:
            for signum in STOP_SIGNALS:
                signal.signal(signum, self)
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def interrupted(signum: int, step: int, path: Path) -> Interrupted:
    """The one line of a run that a stop signal stopped after `step`, its checkpoint at `path`."""
    name = STOP_SIGNALS.get(signum, f"signal {signum}")
    return Interrupted(f"stopped by {name} after step {step}: checkpoint {path}; continue with resume={path} "
                       f"(or resume=auto with the same hydra.run.dir)", signum=signum)


def divergence_message(what: str, lr: float, peak: float | None = None, scaling: str = "none") -> str:
    """One line: `what` was not finite (and where), and what to change: optim.lr as configured and, where
    optim.lr_scaling made it another, the `peak` lr the workers' optimizer reaches (after any warm-up)."""
    scaled = f", peak {peak:g} after optim.lr_scaling={scaling}" if peak is not None and peak != lr else ""
    return (f"{what}: the run diverged and was stopped, without results.json; lower optim.lr (this run: {lr:g}"
            f"{scaled}), warm it up (optim.warmup_steps) or clip gradients harder (trainer.gradient_clip_val)")


class Checkpointing(L.Callback):
    """When a fit writes checkpoints and when it stops early, the same way on every rank.

    - ``last.ckpt`` at every epoch end, every `every_n_steps` steps (0: never mid-epoch) and at the
      end of training; written atomically (:class:`AtomicCheckpointIO`).
    - Ctrl-C (SIGINT), SIGTERM (what a scheduler sends on preemption, torchrun forwards it) and
      SIGUSR1 (SLURM's ``--signal`` warning) only set a flag. At the next agreement point the
      ranks stop after the same step and save ``interrupted.ckpt``, as exact as any other (GTC
      residuals, BMUF block state and PowerSGD memory included); :attr:`stopped_by` says which
      signal. A second Ctrl-C interrupts at once; a repeated SIGTERM (the scheduler's and
      torchrun's) changes nothing.
    - A non-finite training loss on any rank is noted on the device (no sync per step); at the next
      agreement point every rank stops, :attr:`diverged` names the first such step and rank, and
      nothing more is saved: the last checkpoint stays the last finite one.

    Agreement points: every `check_every` steps (one all-reduce of two integers over the default
    group), before every checkpoint, and at the end of training. A single worker stops on a signal
    after the current step.
    """

    def __init__(self, directory: Path, every_n_steps: int = 0, check_every: int = 10) -> None:
        self.directory = Path(directory)
        self.last_path = self.directory / "last.ckpt"
        self.stop_path = self.directory / "interrupted.ckpt"
        self.every_n_steps = max(0, int(every_n_steps))
        self.check_every = max(1, int(check_every))
        self.signals = StopSignals()
        self.stopped_by: int | None = None  # the signal the ranks agreed to stop on
        self.saved_step: int | None = None  # the step of interrupted.ckpt
        self.diverged: tuple[int, int] | None = None  # (step, rank) of the first non-finite training loss
        self._first_bad: torch.Tensor | None = None  # this rank's first non-finite step, -1: none (on the device)
        self._last_saved = -1  # the step last.ckpt was last written at

    @property
    def signum(self) -> int:
        """The first stop signal this process received (0: none)."""
        return self.signals.signum

    @property
    def stopped(self) -> bool:
        return self.stopped_by is not None

    @property
    def finished(self) -> bool:
        return self.stopped or self.diverged is not None

    # -- signals ----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.signals.remember_sigint()
        trainer._signal_connector = _FlagOnlySignals(trainer, self.signals)  # installed by the Trainer before its loop

    # -- agreement --------------------------------------------------------------------------------
    def _note_loss(self, outputs: Any, step: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not torch.is_tensor(loss):
            return
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()).all() & (self._first_bad < 0)
        self._first_bad = torch.where(bad, torch.full_like(self._first_bad, step), self._first_bad)

    def _agree(self, trainer: L.Trainer) -> tuple[int, tuple[int, int] | None]:
        """(the largest stop signal any rank received, 0: none; (step, rank) of the earliest non-finite
        loss of any rank, or None), by one all-reduce (MAX) of two integers."""
        world, rank = max(1, trainer.world_size), trainer.global_rank
        first = int(self._first_bad) if self._first_bad is not None and world == 1 else None
        if world > 1 and dist.is_available() and dist.is_initialized():
            device = trainer.strategy.root_device if dist.get_backend() == "nccl" else torch.device("cpu")
            flags = torch.zeros(2, dtype=torch.long, device=device)
            flags[0] = self.signum
            if self._first_bad is not None:
                bad = self._first_bad.to(device)
                flags[1] = torch.where(bad >= 0, _NO_BAD_STEP - (bad * world + rank), torch.zeros_like(bad))
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            signum, code = (int(v) for v in flags.tolist())
            return signum, (divmod(_NO_BAD_STEP - code, world) if code else None)
        return self.signum, ((first, 0) if first is not None and first >= 0 else None)

    def _agreement_point(self, trainer: L.Trainer, save_last: bool) -> None:
        signum, diverged = self._agree(trainer)
        step = int(trainer.global_step)
        if diverged is not None:
            self.diverged = diverged
            trainer.should_stop = True
        elif signum:
            trainer.save_checkpoint(str(self.stop_path))
            self.stopped_by, self.saved_step = signum, step
            trainer.should_stop = True
        elif save_last and self._last_saved != step:
            trainer.save_checkpoint(str(self.last_path))
            self._last_saved = step

    # -- hooks ------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        step = int(trainer.global_step)
        self._note_loss(outputs, step)
        if self.finished:
            return
        # an epoch's last batch is its save point: a checkpoint written later, in on_train_epoch_end, resumed
        # (Lightning 2.6) to a different model than the uninterrupted run's (tests/test_preemption.py)
        last = bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        save = last or (bool(self.every_n_steps) and step % self.every_n_steps == 0)
        if save or step % self.check_every == 0 or (trainer.world_size == 1 and self.signum):
            self._agreement_point(trainer, save)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.finished and self._last_saved != trainer.global_step:
            self._agreement_point(trainer, save_last=True)

    def divergence_message(self, lr: float, peak: float | None = None, scaling: str = "none") -> str:
        """One line: where the loss stopped being finite and what to change (:func:`divergence_message`)."""
        assert self.diverged is not None
        step, rank = self.diverged
        where = f" on rank {rank}" if rank else ""
        return divergence_message(f"the training loss is NaN or inf at step {step}{where}", lr, peak, scaling)
