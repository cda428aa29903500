"""One run of `asrbench train`, written once, and the evaluation behind `asrbench eval`.

config -> corpus and features -> module -> logger -> fit -> evaluation -> results.json. The fit
is one of two runners with one interface (:class:`Runner`): :class:`TrainerRunner`, Lightning's
Trainer over real processes (``cluster=processes``), and :class:`SimulatedRunner`
(:mod:`asrbench.simulated_runner`), N workers in this process on the simulated cluster
(``cluster=simulated``); what they share is in :mod:`asrbench.fitting`. Hydra and Lightning stay
here at the edge. The run's inputs (corpus, features, frame labels, the data module) are read by
:mod:`asrbench.inputs`, its logger built by :mod:`asrbench.wandb_log`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import to_absolute_path
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from asrbench import checkpoint, config, runinfo
from asrbench.data.dataset import train_batches_per_epoch
from asrbench.data.features import SplitFeatures
from asrbench.errors import CheckpointError, ConfigError, RunFailed
from asrbench.inputs import (PROJECT_ROOT, RunData, SpeechDataModule, data_root, ensure_corpus,  # noqa: F401
                             feature_dim, load_features, load_frame_labels, load_run_data, phone_set, split_names)
from asrbench.wandb_log import build_logger, finish_wandb, log_results, resolved_config, wandb_mode  # noqa: F401
from asrbench.model.evaluate import evaluate_split
from asrbench.model.module import AcousticModule, scaled_lr
from asrbench.strategies import build_strategy, spec
from asrbench.strategies.comm import is_collective_failure
from asrbench.strategies.errors import NonFiniteGradientError
from asrbench.fitting import FitResult, MetricsHistory, Runner, all_frames, lr_of_run  # noqa: F401 (re-exported)
from asrbench.simulated_runner import SimulatedRunner  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)




# ---------------------------------------------------------------- run pieces
def inner_optim(cfg: DictConfig) -> dict:
    """The worker's optimizer: `optim`, with a strategy preset's `inner_optimizer` taking precedence.

    With Adam and a GTC strategy's ``tau_units=rms``, ``freeze_variance_after`` defaults to its
    ``dense_warmup_steps`` W: Adam's second moment is learnt on the dense warm-up and frozen when
    GTC starts (asrbench.model.optim), and must be frozen by then. With ``tau_units=gradient`` Adam
    is left unfrozen unless asked: a frozen v with thresholds in gradient units gives elements of
    tiny v steps of τ/sqrt(v) and diverged when tried.
    """
    optim = dict(OmegaConf.to_container(cfg.optim, resolve=True))
    strategy = cfg.strategy
    if strategy.get("inner_optimizer"):
        optim["name"] = strategy.inner_optimizer
    warmup = int(strategy.get("dense_warmup_steps") or 0)
    adam = optim.get("name", "adam") in ("adam", "adamw")
    rms = strategy.get("tau_units", "gradient") == "rms"
    rule = str(optim.get("lr_scaling", "none"))
    if rule.endswith("_group"):  # by the workers whose gradients one exchange combines
        group = spec(strategy.name).exchange_group(strategy, int(cfg.nodes))
        optim["lr"] = scaled_lr(float(optim["lr"]), rule.removesuffix("_group"), group)
        optim["lr_scaling"] = "none"
    if adam and rms and warmup > 0 and optim.get("freeze_variance_after") is None:
        optim["freeze_variance_after"] = warmup
    if rms:
        freeze = optim.get("freeze_variance_after")
        if not adam or warmup < 1 or freeze is None or int(freeze) > warmup:
            raise ConfigError(f"strategy.tau_units=rms scales tau by Adam's frozen second moment: it needs optim.name="
                              f"adam or adamw (got {optim.get('name')}), strategy.dense_warmup_steps >= 1 (got "
                              f"{warmup}) and optim.freeze_variance_after <= it (got {freeze})")
        if strategy.get("reset_momentum"):
            raise ConfigError("strategy.tau_units=rms needs Adam's frozen second moment, which "
                              "strategy.reset_momentum=true clears at every BMUF sync; set one of them off")
    return optim


def trainer_devices(cfg: DictConfig) -> tuple[str, int, int]:
    """(accelerator, devices per machine, machines) for `nodes` workers."""
    nodes, machines = int(cfg.nodes), int(cfg.num_machines)
    if nodes < 1 or machines < 1 or nodes % machines:
        raise ConfigError(f"nodes={nodes} must be a positive multiple of num_machines={machines}")
    accel = cfg.accelerator
    if accel == "auto":
        accel = "gpu" if torch.cuda.is_available() else "cpu"
    per_machine = nodes // machines
    if accel == "gpu":
        have = torch.cuda.device_count()
        if per_machine > have:
            raise ConfigError(f"nodes={nodes} asks for {per_machine} GPU processes per machine but "
                              f"{have} GPUs are visible; use accelerator=cpu, fewer nodes, or the "
                              f"simulated cluster (cluster=simulated)")
    return accel, per_machine, machines


# ---------------------------------------------------------------- the fit: two runners


class TrainerRunner:
    """``cluster=processes``: Lightning's Trainer, this process being one of `nodes` ranks.

    Returns no result on ranks other than 0, which evaluates and writes results.json alone.
    """

    def __init__(self, cfg: DictConfig, out_dir: Path) -> None:
        self.cfg, self.out_dir = cfg, out_dir
        self.accelerator, self.devices, self.machines = trainer_devices(cfg)
        self.progress = checkpoint.launching_process()  # global rank 0: RANK, SLURM_PROCID or LOCAL_RANK

    def before_data(self, module: AcousticModule, strategy: Any) -> None:
        pass

    def fit(self, module: AcousticModule, strategy: Any, data: RunData, logger: Any, *,
            ident: Mapping[str, Any], resume: str | None) -> FitResult | None:
        cfg, out_dir = self.cfg, self.out_dir
        dm = SpeechDataModule(data.feats, data.frame_labels, cfg.batch_size, cfg.eval_batch_size, cfg.seed,
                              cfg.num_workers, cfg.get("bucket_by_length", False))
        ckpt_dir = out_dir / "checkpoints"
        # last.ckpt at every epoch end (and every checkpoint_every_n_steps), interrupted.ckpt on a stop
        # signal, a stop on a diverged loss; Lightning's own ModelCheckpoint is off (with save_top_k=0 it
        # wrote last.ckpt only when training ended)
        guard = checkpoint.Checkpointing(ckpt_dir, every_n_steps=cfg.checkpoint_every_n_steps,
                                         check_every=cfg.get("stop_check_every_n_steps", 10))
        if hasattr(strategy, "checkpoint_dir"):
            strategy.checkpoint_dir = str(ckpt_dir)
        counts = checkpoint.RunCounts()  # frames, times and bytes continue across a resume
        progress = [TQDMProgressBar(refresh_rate=10)] if cfg.trainer.get("enable_progress_bar", True) else []
        history = MetricsHistory(out_dir / "metrics.jsonl", cfg.trainer.get("log_every_n_steps", 10))
        trainer_kw = {"enable_checkpointing": False} | OmegaConf.to_container(cfg.trainer, resolve=True)
        trainer = L.Trainer(accelerator=self.accelerator, devices=self.devices, num_nodes=self.machines,
                            strategy=strategy, logger=logger, plugins=[checkpoint.AtomicCheckpointIO()],
                            callbacks=[guard, checkpoint.RunIdentity(ident), counts, *progress, history],
                            default_root_dir=str(out_dir), use_distributed_sampler=False,
                            deterministic=cfg.deterministic, **trainer_kw)
        if resume and checkpoint.read(Path(resume)).get("simulated"):
            raise CheckpointError(f"{resume}: written by cluster=simulated; resume it with cluster=simulated, or "
                                  f"start from its weights with init_from={resume}")
        t_fit = time.perf_counter()
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=resume)
        except Exception as err:
            non_finite = non_finite_gradient(err)
            if non_finite is not None and not trainer.is_global_zero:
                return None  # the hook agreed on it over every rank: rank 0 speaks for the run
            if non_finite is not None:  # the optimizer step that met it: Lightning counts the ones done
                what = hook_divergence(non_finite, int(trainer.global_step) + 1)
                raise RunFailed(f"{checkpoint.divergence_message(what, *lr_of_run(cfg, module))}; "
                                f"{checkpoint.describe_last_checkpoint(ckpt_dir)}") from err
            if is_collective_failure(err):  # CollectiveError included
                raise RunFailed(f"{' '.join(str(err).split())}; "
                                f"{checkpoint.describe_last_checkpoint(ckpt_dir)}") from err
            raise
        fit_s = counts.fit_wall_s_before + time.perf_counter() - t_fit
        if guard.diverged is not None:  # every rank stopped at the same step; rank 0 speaks for the run
            if trainer.is_global_zero:
                raise RunFailed(f"{guard.divergence_message(*lr_of_run(cfg, module))}; "
                                f"{checkpoint.describe_last_checkpoint(ckpt_dir)}")
            return None
        if guard.stopped:
            raise checkpoint.interrupted(guard.stopped_by, guard.saved_step, guard.stop_path)
        frames = all_frames(module.frames_seen, int(cfg.nodes), module.device)
        if not trainer.is_global_zero:
            return None
        comm = getattr(trainer.strategy, "comm_summary", None)
        # All workers' frames over rank 0's time inside training batches (validation excluded), both from
        # the run's start: a resumed run's continue from its checkpoint (checkpoint.RunCounts).
        return FitResult(steps=int(trainer.global_step), epochs=int(trainer.current_epoch),
                         train_frames=frames, fit_wall_s=fit_s,
                         train_time_s=module.train_time_s, model=module.model, comm_summary=comm() if comm else {})

    def close(self, logger: Any) -> None:
        finish_wandb(logger)  # the Trainer finalized the logger at the end of fit; the W&B run ends here


# How autograd words an error raised in a comm hook's future callback: a RuntimeError holding only its text.
_CALLBACK_ERROR = f"{NonFiniteGradientError.__name__}: "


def non_finite_gradient(err: BaseException) -> NonFiniteGradientError | None:
    """A compressing hook's NaN/inf gradient error (GTC's, 1-bit SGD's), found along the exception's chain
    as a traceback shows it (causes, unsuppressed contexts); where autograd wrapped it in a RuntimeError
    (raised in the hook's future callback), only its text is left, and the error is read back from that
    (:meth:`NonFiniteGradientError.from_text`). None for any other."""
    seen: set[int] = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, NonFiniteGradientError):
            return link
        text = str(link)
        if isinstance(link, RuntimeError) and _CALLBACK_ERROR in text:
            return NonFiniteGradientError.from_text(text.split(_CALLBACK_ERROR, 1)[1].split("\n\nAt:", 1)[0].strip())
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)  # as a traceback reads
    return None


def hook_divergence(error: NonFiniteGradientError, step: int) -> str:
    """What a compressing hook's NaN/inf `error` says, in the words of the simulated cluster's line: `step`,
    the run's optimizer step (from 1), in place of the hook's own counter (from 0, ``error.step``); the
    advice, with the run's values, is :func:`asrbench.checkpoint.divergence_message`'s."""
    detail = " ".join(error.where.split())
    return f"training hit NaN or inf at step {step} ({f'{error.method}: ' if error.method else ''}{detail})"


def planned_steps(per_epoch: int, trainer: Mapping) -> tuple[int | None, str]:
    """The optimizer steps a fit runs with `per_epoch` steps per epoch, under Lightning's limits
    (max_steps -1: none; max_epochs unset: 1000 unless max_steps is set; -1: none), and the setting
    that binds, as a user would write it; None: no step limit."""
    max_steps = -1 if trainer.get("max_steps") is None else int(trainer["max_steps"])
    max_epochs = trainer.get("max_epochs")
    max_epochs = (1000 if max_steps == -1 else -1) if max_epochs is None else int(max_epochs)
    by_epochs = per_epoch * max_epochs if max_epochs >= 0 else None
    if max_steps >= 0 and (by_epochs is None or max_steps <= by_epochs):
        return max_steps, f"trainer.max_steps={max_steps}"
    return by_epochs, f"trainer.max_epochs={max_epochs}"


def check_steps(cfg: DictConfig, strategy: Any, train_utterances: int) -> int:
    """Refuse, once the features are known and before any worker starts, a run that would train
    nothing: no full batch per worker, no step under the trainer's limits, or, for a strategy that
    averages in blocks (bmuf, diloco, gtc_bmuf), fewer steps than one block of K. Returns the
    optimizer steps per epoch of each worker."""
    nodes, batch_size = int(cfg.nodes), int(cfg.batch_size)
    per_epoch = train_batches_per_epoch(train_utterances, batch_size=batch_size, world_size=nodes)
    steps, limit = planned_steps(per_epoch, cfg.trainer)
    if steps == 0:
        raise ConfigError(f"{limit} trains 0 steps; raise it")
    interval = cfg.trainer.get("val_check_interval")
    if (isinstance(interval, int) and not isinstance(interval, bool) and interval > per_epoch
            and cfg.trainer.get("check_val_every_n_epoch") is not None):
        raise ConfigError(f"trainer.val_check_interval={interval} steps exceeds the {per_epoch} steps of an epoch "
                          f"({train_utterances:,} training utterances / (batch_size={batch_size} x "
                          f"nodes={nodes})); use at most {per_epoch}, a fraction of an epoch such as 0.5, or set "
                          f"trainer.check_val_every_n_epoch=null to count steps across epochs")
    if steps is None or not hasattr(strategy, "block_steps"):
        return per_epoch
    try:
        k = strategy.block_steps(nodes)
    except ValueError as err:
        raise ConfigError(f"strategy={cfg.strategy.name}: {err}") from None
    if steps >= k:
        return per_epoch
    block = strategy.bmuf_config
    if block.block_size is not None:
        knob, smaller = "strategy.block_size", f"strategy.block_size<={steps}"
    else:
        knob = f"strategy.block_size_samples={block.block_size_samples} over batch_size x N"
        smaller = f"strategy.block_size_samples<={steps * batch_size * strategy.bmuf_workers(nodes)}"
    longer = [f"trainer.max_steps>={k}"] if limit.startswith("trainer.max_steps") else []
    max_epochs, epochs = cfg.trainer.get("max_epochs"), -(-k // per_epoch)
    if max_epochs is not None and 0 <= int(max_epochs) < epochs:
        longer.append(f"trainer.max_epochs>={epochs}")
    raise ConfigError(f"strategy={cfg.strategy.name} averages the models once every K = {k} steps ({knob}) but "
                      f"this run trains {steps} steps ({per_epoch} per epoch, {limit}): no block would complete; "
                      f"set {' and '.join(longer)}{',' if len(longer) > 1 else ''} or {smaller}")


def make_runner(cfg: DictConfig, out_dir: Path) -> Runner:
    """The runner of ``cluster``: simulated, or Lightning's Trainer over processes."""
    return SimulatedRunner(cfg, out_dir) if cfg.cluster.name == "simulated" else TrainerRunner(cfg, out_dir)


def resume_checkpoint(cfg: DictConfig, out_dir: Path, ident: Mapping[str, Any]) -> str | None:
    """The checkpoint this run continues from: ``resume=<checkpoint or run dir>``; ``resume=auto``, the
    newest in `<out_dir>/checkpoints` if any (else a fresh start); a torchrun restart
    (TORCHELASTIC_RESTART_COUNT > 0) or a requeued SLURM job (SLURM_RESTART_COUNT > 0) without ``resume=``
    counts as ``resume=auto``. Each is checked against the run's identity before any process starts."""
    resume = cfg.get("resume")
    what, count = checkpoint.restarts()
    if not resume and count > 0:
        if checkpoint.launching_process():
            log.info("%s %d: resume=auto", what, count)
        resume = checkpoint.AUTO
    if not resume:
        return None
    if str(resume) == checkpoint.AUTO:
        found = checkpoint.auto_resume(out_dir, ident)
        return str(found) if found is not None else None
    return str(checkpoint.check_resume(to_absolute_path(str(resume)), ident))


def train(cfg: DictConfig, out_dir: Path) -> dict | None:
    """Train one run; rank 0 evaluates the final model and writes `<out_dir>/results.json`."""
    config.validate(cfg)  # every knob, before any data is read, process started or logger opened
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    runner = make_runner(cfg, out_dir)
    input_dim = feature_dim(cfg)
    # The phone probe's classes (data.phone_labels) come from the corpus's timings, generated if needed.
    phones = phone_set(cfg, progress=runner.progress)
    ident = checkpoint.identity(cfg, input_dim, len(phones) if phones else 0)
    resume = resume_checkpoint(cfg, out_dir, ident)
    strategy = build_strategy(cfg.strategy, nodes=int(cfg.nodes), timeout_s=cfg.collective_timeout_s)
    # Built before the data is read: reading it leaves the global RNG alone (features fork it).
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = AcousticModule(input_dim, OmegaConf.to_container(cfg.model, resolve=True), inner_optim(cfg),
                            cfg.criterion, world_size=int(cfg.nodes), num_phones=len(phones) if phones else 0)
    if cfg.get("init_from") and not resume:
        checkpoint.load_initial_weights(module, to_absolute_path(cfg.init_from), ident)
    runner.before_data(module, strategy)
    data = load_run_data(cfg, progress=runner.progress)
    module.steps_per_epoch = check_steps(cfg, strategy, len(data.feats["train"]))
    logger = build_logger(cfg, out_dir)
    fitted = runner.fit(module, strategy, data, logger, ident=ident, resume=resume)
    if fitted is None:
        return None
    results = {
        "strategy": cfg.strategy.name,
        "nodes": int(cfg.nodes),
        "criterion": cfg.criterion,
        "seed": int(cfg.seed),
        "steps": fitted.steps,
        "epochs": fitted.epochs,
        "train_frames": fitted.train_frames,
        "fit_wall_s": fitted.fit_wall_s,
        "train_time_s": fitted.train_time_s,
        "train_frames_per_s": fitted.train_frames / max(fitted.train_time_s, 1e-9),
        **fitted.extra,
    }
    results = finish_results(results, fitted.comm_summary, fitted.model, data, cfg, out_dir, logger,
                             checkpoint=out_dir / "checkpoints" / "last.ckpt", t0=t0)
    runner.close(logger)
    return results


def finish_results(results: dict, comm_summary: Mapping, model: torch.nn.Module, data: RunData, cfg: DictConfig,
                   out_dir: Path, logger: Any, *, checkpoint: Path, t0: float) -> dict:
    """Complete a run's results (bytes, metrics, run info), write results.json atomically and log them."""
    summary = dict(comm_summary)
    if "steps" in summary:  # the strategy's count of closed steps; `steps` stays the trainer's
        summary["comm_steps"] = int(summary.pop("steps"))
    results.update(summary or {"bytes_sent_per_worker_per_step": 0, "bytes_received_per_worker_per_step": 0,
                               "dense_bytes_per_worker_per_step": 0})
    results.update(evaluate_all(model, data.feats, data.frame_labels, cfg, out_dir))
    results["wall_s"] = time.perf_counter() - t0
    results |= {"checkpoint": str(checkpoint), "config": resolved_config(cfg),
                "git_commit": runinfo.git_commit(), "versions": runinfo.versions(), "host": runinfo.host()}
    runinfo.write_json_atomic(out_dir / "results.json", results)
    log_results(logger, results)
    return results


def evaluate_all(model: torch.nn.Module, feats: Mapping[str, SplitFeatures], frame_labels, cfg: DictConfig,
                 out_dir: Path) -> dict:
    """Metrics on dev and every test subset; headline `wer`/`cer`/`fer` are the first test subset's."""
    model = model.cpu()
    per_split = {}
    splits = ["dev", *[s for s in (cfg.data.get("test_subsets") or [])]]
    for split in splits:
        res = evaluate_split(model, feats[split], frame_labels, batch_size=cfg.eval_batch_size)
        hyps = res.pop("hyps")
        (out_dir / "hyps").mkdir(exist_ok=True)
        (out_dir / "hyps" / f"{split}.txt").write_text("".join(f"{u} {h}\n" for u, h in sorted(hyps.items())))
        runinfo.write_json_atomic(out_dir / "hyps" / f"{split}.scores.json", res.pop("scores"))
        per_split[split] = res
        log.info("%s: WER %.4f CER %.4f FER %s (%d utterances)", split, res["wer"], res["cer"],
                 "n/a" if res["fer"] is None else f"{res['fer']:.4f}", res["utterances"])
    head = per_split[splits[1]] if len(splits) > 1 else per_split["dev"]
    return {"wer": head["wer"], "cer": head["cer"], "fer": head["fer"], "eval": per_split}
