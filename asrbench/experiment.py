"""The training and evaluation pipeline behind `asrbench train` and `asrbench eval`.

audio -> features -> batches -> model -> strategy -> metrics -> report, each stage a call
into the library; Hydra and Lightning stay here at the edge.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import to_absolute_path
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from asrbench import checkpoint, runinfo
from asrbench.data.dataset import SpeechDataset, make_loader
from asrbench.data.features import FeatureConfig, SplitFeatures, prepare_features
from asrbench.data.corpus import scan_splits
from asrbench.errors import ConfigError, RunFailed
from asrbench.model.align import read_alignments
from asrbench.model.evaluate import evaluate_split
from asrbench.model.module import AcousticModule
from asrbench.strategies import build_strategy
from asrbench.strategies.comm import is_collective_failure
from asrbench.strategies.gtc import NonFiniteGradientError

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- data
def data_root(data_cfg: Mapping) -> Path:
    if not data_cfg.get("root"):
        raise ConfigError(f"data={data_cfg.get('name')} needs data.root=DIR (the corpus directory)")
    return Path(to_absolute_path(str(data_cfg["root"])))


def ensure_corpus(data_cfg: Mapping, progress: bool = True) -> Path:
    """The corpus root; for `kind: synth` generate it first if needed (idempotent)."""
    root = data_root(data_cfg)
    if data_cfg.get("kind") == "synth":
        from asrbench.data.synth import generate_corpus

        cfg = OmegaConf.to_container(data_cfg["synth"], resolve=True) if isinstance(
            data_cfg["synth"], DictConfig) else dict(data_cfg["synth"])
        sentences = Path(str(cfg["sentences"]))
        if not sentences.is_absolute():  # relative to the cwd, else to the asrbench checkout
            cwd_path = Path(to_absolute_path(str(sentences)))
            sentences = cwd_path if cwd_path.exists() else PROJECT_ROOT / sentences
        cfg["sentences"] = str(sentences)
        generate_corpus(root, cfg, progress=progress)
    return root


def split_names(data_cfg: Mapping) -> dict[str, list[str]]:
    """Feature-split name -> corpus subsets: `train`, `dev`, and each test subset by its own name."""
    names = {"train": list(data_cfg["train_subsets"]), "dev": list(data_cfg["dev_subsets"])}
    for subset in data_cfg.get("test_subsets") or []:
        names[subset] = [subset]
    return names


def load_features(cfg: DictConfig, progress: bool = True) -> dict[str, SplitFeatures]:
    root = ensure_corpus(cfg.data, progress)
    utts = scan_splits(cfg.data, root, split_names(cfg.data))
    cache = Path(to_absolute_path(cfg.data.cache_dir)) if cfg.data.get("cache_dir") else root / "features"
    fcfg = FeatureConfig(**OmegaConf.to_container(cfg.features, resolve=True))
    return prepare_features(utts, fcfg, cache, progress=progress,
                            on_bad_utterance=cfg.data.get("on_bad_utterance", "skip"))


def load_frame_labels(cfg: DictConfig) -> dict[str, torch.Tensor] | None:
    ali = cfg.data.get("alignments")
    if not ali:
        return None
    subsets = [s for group in split_names(cfg.data).values() for s in group]
    return read_alignments(Path(to_absolute_path(ali)), subsets)


class SpeechDataModule(L.LightningDataModule):
    """Train/dev loaders; each rank reads exactly the shard DistributedSampler gives it."""

    def __init__(self, feats: Mapping[str, SplitFeatures], frame_labels, batch_size: int,
                 eval_batch_size: int, seed: int, num_workers: int = 0, bucket_by_length: bool = False) -> None:
        super().__init__()
        self.feats, self.frame_labels = feats, frame_labels
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.num_workers, self.bucket_by_length = seed, num_workers, bucket_by_length

    def _loader(self, split: str, batch_size: int, shuffle: bool):
        return make_loader(SpeechDataset(self.feats[split], self.frame_labels), batch_size=batch_size,
                           shuffle=shuffle, seed=self.seed, rank=self.trainer.global_rank,
                           world_size=self.trainer.world_size, num_workers=self.num_workers,
                           drop_last=shuffle, sort_by_length=self.bucket_by_length and shuffle,
                           progress=self._batches_done if shuffle else None)

    def _batches_done(self) -> int:
        """Training batches the trainer finished in this epoch (what a checkpoint resumes after)."""
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def train_dataloader(self):
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self):
        return self._loader("dev", self.eval_batch_size, shuffle=False)


# ---------------------------------------------------------------- run pieces
class MetricsHistory(L.Callback):
    """Rank 0 appends logged scalars to `<run dir>/metrics.jsonl` (curves without a logger)."""

    def __init__(self, path: Path, every_n_steps: int) -> None:
        self.path, self.every = Path(path), max(1, every_n_steps)

    def _write(self, trainer: L.Trainer, prefix: tuple[str, ...]) -> None:
        if not trainer.is_global_zero:
            return
        row = {k: float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith(prefix) and torch.as_tensor(v).numel() == 1}
        if row:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch} | row) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self._write(trainer, ("train/", "comm/"))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, ("val/",))


def resolved_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


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


def build_logger(cfg: DictConfig, out_dir: Path) -> Any:
    name = cfg.logger.name
    run_name = f"{cfg.strategy.name}-n{cfg.nodes}-s{cfg.seed}"
    if name == "none":
        return False
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(out_dir), name="csv", version="")
    if name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(project=cfg.logger.project, mode=wandb_mode(), entity=cfg.logger.get("entity"),
                           group=cfg.logger.get("group") or cfg.get("experiment"), name=run_name,
                           save_dir=str(out_dir), tags=list(cfg.logger.get("tags") or []),
                           config=resolved_config(cfg) | {"git_commit": runinfo.git_commit(),
                                                          "versions": runinfo.versions()})
    raise ConfigError(f"logger={name!r} is unknown; use wandb, csv or none")


def wandb_mode() -> str:
    """WANDB_MODE if set; else online when logged in (API key or ~/.netrc entry), offline otherwise.

    Offline runs stay on disk under the run dir; `wandb sync <dir>` uploads them later.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import netrc

    try:
        hosts = netrc.netrc().hosts
    except (OSError, netrc.NetrcParseError):
        hosts = {}
    return "online" if any("wandb" in h for h in hosts) else "offline"


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


def log_results(logger: Any, results: dict) -> None:
    if logger:
        flat = {f"final/{k}": v for k, v in results.items() if isinstance(v, (int, float)) and v is not None}
        logger.log_metrics(flat)


def train(cfg: DictConfig, out_dir: Path) -> dict | None:
    """Train one run; rank 0 evaluates the final model and writes `<out_dir>/results.json`."""
    if cfg.cluster.name == "simulated":
        from asrbench.cluster.simulated import train_simulated

        return train_simulated(cfg, out_dir)
    t0 = time.perf_counter()
    accel, devices, machines = trainer_devices(cfg)
    input_dim = FeatureConfig(**OmegaConf.to_container(cfg.features, resolve=True)).dim
    ident = checkpoint.identity(cfg, input_dim)
    resume = str(checkpoint.check_resume(to_absolute_path(cfg.resume), ident)) if cfg.resume else None
    strategy = build_strategy(cfg.strategy, nodes=int(cfg.nodes), timeout_s=cfg.collective_timeout_s)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    is_rank0 = int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    feats = load_features(cfg, progress=is_rank0)
    frame_labels = load_frame_labels(cfg)
    if cfg.criterion == "ce" and frame_labels is None:
        raise ConfigError("criterion=ce trains on frame labels: run `asrbench align run=DIR` and pass "
                          "data.alignments=<its output dir>")
    module = AcousticModule(input_dim, OmegaConf.to_container(cfg.model, resolve=True), inner_optim(cfg),
                            cfg.criterion, world_size=int(cfg.nodes))
    if cfg.get("init_from") and not resume:
        checkpoint.load_initial_weights(module, to_absolute_path(cfg.init_from), ident)
    dm = SpeechDataModule(feats, frame_labels, cfg.batch_size, cfg.eval_batch_size, cfg.seed, cfg.num_workers,
                          cfg.get("bucket_by_length", False))
    logger = build_logger(cfg, out_dir)
    ckpt_dir = out_dir / "checkpoints"
    ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True,
                           every_n_train_steps=cfg.checkpoint_every_n_steps or None, save_top_k=0)
    stop = checkpoint.GracefulStop(ckpt_dir / "interrupted.ckpt")
    if hasattr(strategy, "checkpoint_dir"):
        strategy.checkpoint_dir = str(ckpt_dir)
    trainer = L.Trainer(accelerator=accel, devices=devices, num_nodes=machines, strategy=strategy,
                        logger=logger, callbacks=[ckpt, stop, checkpoint.RunIdentity(ident),
                                                  *([TQDMProgressBar(refresh_rate=10)]
                                                    if cfg.trainer.get("enable_progress_bar", True) else []),
                                   MetricsHistory(out_dir / "metrics.jsonl", cfg.trainer.get("log_every_n_steps", 10))],
                        default_root_dir=str(out_dir), use_distributed_sampler=False,
                        deterministic=cfg.deterministic, **OmegaConf.to_container(cfg.trainer, resolve=True))
    t_fit = time.perf_counter()
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=resume)
    except Exception as err:
        if isinstance(err, NonFiniteGradientError) or is_collective_failure(err):  # CollectiveError included
            raise RunFailed(f"{' '.join(str(err).split())}; {checkpoint.describe_last_checkpoint(ckpt_dir)}") from err
        raise
    fit_s = time.perf_counter() - t_fit
    if stop.stopped:
        raise checkpoint.Interrupted(f"interrupted after step {stop.saved_step}: checkpoint {stop.path}; "
                                     f"continue with resume={stop.path}")
    if not trainer.is_global_zero:
        return None
    results = {
        "strategy": cfg.strategy.name,
        "nodes": int(cfg.nodes),
        "criterion": cfg.criterion,
        "seed": int(cfg.seed),
        "steps": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "train_frames": int(module.frames_seen * int(cfg.nodes)),
        "fit_wall_s": fit_s,
        "train_time_s": module.train_time_s,
        # All workers' frames over rank 0's time inside training batches (validation excluded).
        "train_frames_per_s": module.frames_seen * int(cfg.nodes) / max(module.train_time_s, 1e-9),
    }
    comm = getattr(trainer.strategy, "comm_summary", None)
    return finish_results(results, comm() if comm else {}, module.model, feats, frame_labels, cfg, out_dir,
                          logger, checkpoint=out_dir / "checkpoints" / "last.ckpt", t0=t0)


def finish_results(results: dict, comm_summary: Mapping, model: torch.nn.Module,
                   feats: Mapping[str, SplitFeatures], frame_labels, cfg: DictConfig, out_dir: Path, logger: Any,
                   *, checkpoint: Path, t0: float) -> dict:
    """Complete a run's results (bytes, metrics, run info), write results.json atomically and log them."""
    summary = dict(comm_summary)
    if "steps" in summary:  # the strategy's count of closed steps; `steps` stays the trainer's
        summary["comm_steps"] = int(summary.pop("steps"))
    results.update(summary or {"bytes_sent_per_worker_per_step": 0, "bytes_received_per_worker_per_step": 0,
                               "dense_bytes_per_worker_per_step": 0})
    results.update(evaluate_all(model, feats, frame_labels, cfg, out_dir))
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
        per_split[split] = res
        log.info("%s: WER %.4f CER %.4f FER %s (%d utterances)", split, res["wer"], res["cer"],
                 "n/a" if res["fer"] is None else f"{res['fer']:.4f}", res["utterances"])
    head = per_split[splits[1]] if len(splits) > 1 else per_split["dev"]
    return {"wer": head["wer"], "cer": head["cer"], "fer": head["fer"], "eval": per_split}
