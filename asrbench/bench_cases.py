"""The bench figures, each measured ours vs peer: strategy step time in real processes (1-2), each
strategy's codec (3), the simulated cluster's epoch (4), time waiting for batches (5) and model
throughput (6). The table of figures and their goals is in :mod:`asrbench.bench`."""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.profilers import Profiler
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from asrbench import strategies
from asrbench.bench_inputs import (GRADIENT_CLIP_VAL, OPTIM, FixedBatches, acoustic_module, strategy_config,
                                   synthetic_batch, synthetic_features)
from asrbench.bench_measure import BenchError, Figure, alternate, quiet_lightning, run_processes, summarize
from asrbench.cluster.simulated import LoopConfig, SimulatedCluster, fit
from asrbench.data import text
from asrbench.data.dataset import SpeechDataset, make_loader
from asrbench.errors import ConfigError
from asrbench.experiment import SpeechDataModule
from asrbench.strategies import build_strategy, strategy_kwargs

log = logging.getLogger("asrbench.bench")  # the bench's one logger, as before its figures moved here


# ---------------------------------------------------------------------------------------------
# Figures 1-2: strategy step time, ours vs peer, in real processes
# ---------------------------------------------------------------------------------------------
def _make_strategy(side: str, spec: Mapping[str, Any]) -> Any:
    """`ddp` is Lightning's DDPStrategy as it ships; any other side a registered strategy's class,
    with its conf/strategy/ keys."""

    if side in ("ddp", "ddp_again"):
        return DDPStrategy()
    return strategies.spec(side).strategy_class(**strategy_kwargs(spec["strategies"][side]))


def _fit_steps(side: str, spec: Mapping[str, Any], rank: int, world: int) -> tuple[float, dict[str, float]]:
    """One `Trainer.fit` of warm-up + timed steps with strategy `side`; (seconds per timed step, comm summary)."""
    accel = spec["accelerator"]
    clock: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if accel == "gpu":
                torch.cuda.synchronize()
            clock.append(time.perf_counter())

    warmup, steps = int(spec["warmup_steps"]), int(spec["steps"])
    batches = [synthetic_batch(spec["batch_size"], spec["frames"], seed=1000 * rank + i) for i in range(4)]
    loader = torch.utils.data.DataLoader(FixedBatches(batches, warmup + steps), batch_size=None)
    module = acoustic_module(spec["model"], world_size=world, seed=spec["seed"])
    strategy = _make_strategy(side, spec)
    trainer = pl.Trainer(accelerator=accel, devices=world, strategy=strategy, max_steps=warmup + steps,
                         max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                         limit_val_batches=0, gradient_clip_val=GRADIENT_CLIP_VAL, callbacks=[Clock()])
    trainer.fit(module, train_dataloaders=loader)
    assert len(clock) == warmup + steps, f"{side}: {len(clock)} steps ran, {warmup + steps} expected"
    summary = strategy.comm_summary() if hasattr(strategy, "comm_summary") else {}
    return (clock[-1] - clock[warmup - 1]) / steps, {k: float(v) for k, v in summary.items()}


def _strategy_worker(rank: int, world: int, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Every repetition of both sides in this worker: {side: [seconds per step]} plus the last comm summaries."""
    summaries: dict[str, dict[str, float]] = {}

    def measure(side: str) -> Callable[[], float]:
        def run() -> float:
            seconds, summaries[side] = _fit_steps(side, spec, rank, world)
            return seconds
        return run

    samples = alternate({side: measure(side) for side in spec["sides"]}, int(spec["repetitions"]))
    return {"samples": samples, "summaries": summaries}


def bench_strategy_steps(name: str, ours: str, peer: str, workers: int, cfg: Mapping[str, Any], goal: float,
                         accelerator: str = "cpu", diagnostic: str | None = None) -> Figure:
    """Seconds per optimizer step of strategy `ours` over strategy `peer` on `workers` processes.

    `diagnostic`, a third side alternated with the two, goes into the figure's detail as its own
    ratio to `peer`. ``ddp_again`` is the peer itself timed a second time: that ratio, which should
    be 1, shows how far this machine's noise alone moves a figure (an A/A test).
    A strategy runs with its conf/strategy/ keys updated by ``cfg["strategy_overrides"][name]`` (e.g. GTC's
    τ for these random batches, and no density warnings).
    """
    labels = {side: "Lightning DDPStrategy" if side.startswith("ddp") else strategies.spec(side).strategy_class.__name__
              for side in (ours, peer)}
    backend = "nccl" if accelerator == "gpu" else "gloo"
    figure = Figure(name, f"{labels[ours]} vs {labels[peer]}: time per optimizer step, {workers} {backend} workers, "
                          f"{cfg['model']}, batch {cfg['batch_size']} x {cfg['frames']} frames",
                    unit="s/step", goal=goal, higher_is_better=False, processes=workers,
                    threads=int(cfg["threads_per_process"]))
    if accelerator == "gpu" and torch.cuda.device_count() < workers:
        figure.skipped = f"needs {workers} CUDA devices, {torch.cuda.device_count()} visible"
        return figure
    spec = {key: cfg[key] for key in ("model", "batch_size", "frames", "warmup_steps", "steps", "seed")}
    sides = [ours, peer] + ([diagnostic] if diagnostic else [])
    configs = {s: strategy_config(s, int(cfg["batch_size"])) | dict((cfg.get("strategy_overrides") or {}).get(s) or {})
               for s in (ours, peer) if not s.startswith("ddp")}
    figure.detail["strategies"] = configs
    spec |= {"sides": sides, "repetitions": int(cfg["repetitions"]), "accelerator": accelerator,
             "strategies": configs}
    if spec["warmup_steps"] < 1 or spec["steps"] < 1:
        raise ConfigError("bench warmup_steps and steps must be at least 1")
    try:
        out = run_processes(_strategy_worker, workers, spec, backend=backend, threads=figure.threads,
                            timeout_s=float(cfg.get("timeout_s", 600)))[0]
    except BenchError as err:
        log.error("%s", err)
        figure.error = str(err).splitlines()[0]
        return figure
    samples = out["samples"]
    summarize(figure, samples[ours], samples[peer])
    if diagnostic:
        figure.samples[diagnostic] = samples[diagnostic]
        figure.detail[f"ratio_{diagnostic}"] = statistics.median(a / b for a, b in zip(samples[diagnostic],
                                                                                         samples[peer]))
    summary = out["summaries"].get(ours)
    if summary and strategies.spec(ours).compresses:  # rank 0's last fit: the density the step time was measured at
        figure.detail |= {"density": summary["density"], "compression_ratio": summary["compression_ratio"]}
    figure.detail["sides"] = {"ours": ours, "peer": peer}
    return figure


# ---------------------------------------------------------------------------------------------
# Figure 3: each strategy's codec against one add pass
# ---------------------------------------------------------------------------------------------
def bench_codec(cfg: Mapping[str, Any], threads: int) -> list[Figure]:
    """Every registered strategy with a per-step codec (its spec's ``benchmark_codec``), at each of its
    settings (the spec's ``codec_settings``, or ``codec.settings.<name>`` of the preset): the codec's
    time over one torch.add pass over the same fp32 vector (<= 4)."""
    numel = int(cfg["numel"])
    chosen = cfg.get("settings") or {}
    figures = []
    for name, entry in strategies.registry().items():
        for setting in chosen.get(name, entry.codec_settings):
            setting = dict(setting)
            label = entry.codec_label(setting)
            figure = Figure(f"codec_{name}_{label}", f"{name} codec vs one torch.add, {numel:,} fp32 elements, {label}",
                            unit="s", goal=4.0, higher_is_better=False, threads=threads)
            runs = [entry.benchmark_codec(numel, int(cfg["repeats"]), rep, **setting)
                    for rep in range(int(cfg["repetitions"]))]
            summarize(figure, [r["codec_s"] for r in runs], [r["add_s"] for r in runs])
            figure.detail |= {k: v for k, v in runs[0].items() if k not in ("codec_s", "add_s", "ratio")}
            figure.detail["codec_gb_per_s"] = numel * 4 / figure.ours / 1e9
            figures.append(figure)
    return figures


# ---------------------------------------------------------------------------------------------
# Figure 4: simulated cluster epoch against a single worker's epoch
# ---------------------------------------------------------------------------------------------
def _single_worker_epoch(dataset: Any, model: str, batch_size: int, seed: int) -> float:
    """Seconds of one epoch of a plain loop: loader, forward, CTC, backward, clip, Adam."""

    module = acoustic_module(model, seed=seed)
    module.train()
    optimizer = module.configure_optimizers()
    loader = make_loader(dataset, batch_size=batch_size, shuffle=True, seed=seed, drop_last=True)
    t0 = time.perf_counter()
    for batch in loader:
        loss = module.loss(module(batch["feats"], batch["feat_lens"]), batch)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), GRADIENT_CLIP_VAL)
        optimizer.step()
    return time.perf_counter() - t0


def _simulated_epoch(dataset: Any, model: str, strategy: str, nodes: int, batch_size: int, seed: int,
                     overrides: Mapping[str, Any] | None = None) -> float:
    """Seconds of one epoch of `nodes` simulated workers (asrbench.cluster.simulated.fit).

    `overrides` replace keys of conf/strategy/<strategy>.yaml that it has (others are ignored).
    """

    module = acoustic_module(model, world_size=nodes, seed=seed)
    strategy_cfg = strategy_config(strategy, batch_size)
    strategy_cfg |= {k: v for k, v in (overrides or {}).items() if k in strategy_cfg}
    if "max_density" in strategy_cfg:
        strategy_cfg["max_density"] = None  # speed is measured here, not τ: no density warnings
    built = build_strategy(strategy_cfg, nodes=nodes, timeout_s=300)
    cluster = SimulatedCluster(module, built, nodes, gradient_clip_val=GRADIENT_CLIP_VAL)
    loop = LoopConfig(max_epochs=1, enable_progress_bar=False, gradient_clip_val=GRADIENT_CLIP_VAL)
    t0 = time.perf_counter()
    outcome = fit(cluster, dataset, batch_size=batch_size, seed=seed, loop=loop)
    seconds = time.perf_counter() - t0
    assert outcome.steps * nodes * batch_size == len(dataset), "the simulated epoch must cover the dataset"
    return seconds


def bench_simulated(cfg: Mapping[str, Any], workdir: Path, threads: int) -> list[Figure]:
    """Per strategy: an epoch of `nodes` simulated workers over a single worker's epoch (same data and
    per-worker batch, so both run the same forward/backward passes; the ratio is the simulator's cost)."""
    nodes, batch, seed = int(cfg["nodes"]), int(cfg["batch_size"]), int(cfg["seed"])
    utterances = nodes * batch * int(cfg["steps_per_epoch"])
    figures = [Figure(f"simulated_epoch_{strategy}",
                      f"epoch of {nodes} simulated {strategy} workers vs one worker's epoch, {cfg['model']}, "
                      f"{utterances} utterances, batch {batch} per worker",
                      unit="s/epoch", goal=1.3, higher_is_better=False, threads=threads)
               for strategy in cfg["strategies"]]
    try:
        import asrbench.cluster.simulated  # noqa: F401
    except ImportError as err:
        for figure in figures:
            figure.skipped = f"asrbench.cluster.simulated unavailable ({err})"
        return figures

    dataset = SpeechDataset(synthetic_features(workdir, utterances, cfg["frames"], seed=seed))
    single = partial(_single_worker_epoch, dataset, cfg["model"], batch, seed)
    single()  # warm-up: allocator, page cache
    for figure, strategy in zip(figures, cfg["strategies"]):
        simulated = partial(_simulated_epoch, dataset, cfg["model"], strategy, nodes, batch, seed,
                            cfg.get("strategy_overrides"))
        with quiet_lightning("asrbench.strategies", "asrbench.cluster"):
            simulated()  # warm-up: the (N, n) arrays' first touch
            samples = alternate({"ours": simulated, "peer": single}, int(cfg["repetitions"]))
        figure.detail |= {"nodes": nodes, "strategy": strategy, "utterances": utterances,
                          "frames": int(dataset.lengths.sum()), **(cfg.get("strategy_overrides") or {})}
        summarize(figure, samples["ours"], samples["peer"])
    return figures


# ---------------------------------------------------------------------------------------------
# Figure 5: time waiting for batches in a Lightning fit
# ---------------------------------------------------------------------------------------------
class ActionClock(Profiler):
    """A Lightning profiler that keeps (action, start, end) of every profiled action and prints nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.open: dict[str, float] = {}
        self.spans: list[tuple[str, float, float]] = []

    def start(self, action_name: str) -> None:
        self.open[action_name] = time.perf_counter()

    def stop(self, action_name: str) -> None:
        t0 = self.open.pop(action_name, None)
        if t0 is not None:
            self.spans.append((action_name, t0, time.perf_counter()))


FETCH_ACTION = "[_TrainingEpochLoop].train_dataloader_next"
EPOCH_ACTION = "run_training_epoch"


def bench_data_pipeline(cfg: Mapping[str, Any], workdir: Path, threads: int) -> Figure:
    """Share of each epoch a single-worker Lightning fit spends in `next()` on its loader (warm cache).

    The loader is `asrbench train`'s (SpeechDataModule over SpeechDataset, mmap-ed fp16 shards).
    The first epoch warms the page cache and is not counted; every later epoch is one repetition.
    """

    figure = Figure("data_wait", f"time in next(loader) vs epoch time, single-worker Lightning fit, {cfg['model']}, "
                                 f"batch {cfg['batch_size']}, {cfg['utterances']} utterances",
                    unit="s/step", goal=0.05, higher_is_better=False, threads=threads)
    feats = synthetic_features(workdir, int(cfg["utterances"]), cfg["frames"], seed=int(cfg["seed"]))
    dm = SpeechDataModule({"train": feats, "dev": feats}, None, int(cfg["batch_size"]), int(cfg["batch_size"]),
                          int(cfg["seed"]), num_workers=int(cfg.get("num_workers", 0)))
    clock = ActionClock()
    epochs = 1 + int(cfg["repetitions"])
    with quiet_lightning():
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                             num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=GRADIENT_CLIP_VAL,
                             profiler=clock)
        trainer.fit(acoustic_module(cfg["model"], seed=int(cfg["seed"])), datamodule=dm)
    epoch_spans = [(t0, t1) for action, t0, t1 in clock.spans if action == EPOCH_ACTION]
    assert len(epoch_spans) == epochs, f"{len(epoch_spans)} epochs profiled, {epochs} run"
    waits, steps_s = [], []
    for t0, t1 in epoch_spans[1:]:
        fetches = [e - s for action, s, e in clock.spans if action == FETCH_ACTION and t0 <= s and e <= t1]
        waits.append(sum(fetches) / len(fetches))
        steps_s.append((t1 - t0) / len(fetches))
    figure.detail["steps_per_epoch"] = len(feats) // int(cfg["batch_size"])
    return summarize(figure, waits, steps_s)


# ---------------------------------------------------------------------------------------------
# Figure 6: model throughput against a bare nn.LSTM + nn.Linear loop
# ---------------------------------------------------------------------------------------------
def _train_steps(step: Callable[[], None], steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _ctc(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.ctc_loss(logits.log_softmax(-1).transpose(0, 1), batch["targets"], batch["feat_lens"],
                                  batch["target_lens"], blank=0, reduction="mean", zero_infinity=True)


def model_steps(model: str, batch: Mapping[str, torch.Tensor], device: torch.device, seed: int = 0
                ) -> tuple[Callable[[], None], Callable[[], None]]:
    """One training step (forward, CTC, backward, Adam) of ours and of the bare peer, same shapes."""
    module = acoustic_module(model, seed=seed).to(device).train()
    optimizer = module.configure_optimizers()
    shape = module.model.lstm
    torch.manual_seed(seed)
    lstm = nn.LSTM(shape.input_size, shape.hidden_size, num_layers=shape.num_layers, batch_first=True,
                   proj_size=shape.proj_size).to(device)
    linear = nn.Linear(shape.proj_size or shape.hidden_size, text.vocab_size()).to(device)
    bare_optimizer = torch.optim.Adam([*lstm.parameters(), *linear.parameters()], lr=OPTIM["lr"])
    batch = {k: v.to(device) for k, v in batch.items()}

    def ours() -> None:
        loss = module.loss(module(batch["feats"], batch["feat_lens"]), batch)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()

    def peer() -> None:
        hidden, _ = lstm(batch["feats"])
        loss = _ctc(linear(hidden), batch)
        bare_optimizer.zero_grad(set_to_none=False)
        loss.backward()
        bare_optimizer.step()

    return ours, peer


def bench_model(cfg: Mapping[str, Any], threads: int, device: str = "cpu") -> Figure:
    """Training frames/s of LSTMAcousticModel (through AcousticModule) over a bare loop of the same shape."""
    gpu = device == "cuda"
    model = cfg["gpu_model"] if gpu else cfg["model"]
    batch_size = int(cfg["gpu_batch_size"] if gpu else cfg["batch_size"])
    frames = int(cfg["gpu_frames"] if gpu else cfg["frames"])
    figure = Figure("model_gpu" if gpu else "model_cpu",
                    f"LSTMAcousticModel vs bare nn.LSTM + nn.Linear{' (cuDNN)' if gpu else ''}: training frames/s, "
                    f"{model}, batch {batch_size} x {frames} frames", unit="frames/s",
                    goal=0.8 if gpu else 0.95, higher_is_better=True, threads=threads)
    if gpu and not torch.cuda.is_available():
        figure.skipped = "no CUDA device visible"
        return figure
    dev = torch.device(device)
    ours, peer = model_steps(model, synthetic_batch(batch_size, frames, seed=int(cfg["seed"])), dev,
                             seed=int(cfg["seed"]))
    steps = int(cfg["steps"])
    for step in (ours, peer):  # warm-up: allocator, cuDNN plans, Adam state
        _train_steps(step, int(cfg["warmup_steps"]), dev)
    frames_per_step = batch_size * frames
    samples = alternate({"ours": lambda: frames_per_step * steps / _train_steps(ours, steps, dev),
                         "peer": lambda: frames_per_step * steps / _train_steps(peer, steps, dev)},
                        int(cfg["repetitions"]))
    if gpu:
        figure.detail["gpu"] = torch.cuda.get_device_name(dev)
    return summarize(figure, samples["ours"], samples["peer"])
