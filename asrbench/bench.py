"""`asrbench bench`: the speed of asrbench's paths, measured against plain PyTorch and Lightning peers.

Every figure is a ratio of two sides timed in one run on one machine. The sides alternate
(A B B A A B ...), so that whatever else loads the machine hits both alike; each repetition gives
one ratio of neighbouring samples and the figure is the median of those ratios. Torch's
intra-op threads are set explicitly (``threads`` for the figures run in this process,
``threads_per_process`` for each gloo worker) and recorded with the host, the package versions
and the git commit.

    ================  =========================================  ==================================  =======
    figure            ours                                       peer                                goal
    ================  =========================================  ==================================  =======
    sync_step         SyncStrategy, time per optimizer step,     Lightning's DDPStrategy             <= 1.02
                      2 gloo workers
    gtc_step          GTCStrategy, 4 gloo workers                SyncStrategy, 4 gloo workers        <= 1.3
    gtc_step_gpu      the same on NCCL (needs >= 2 GPUs)         SyncStrategy on NCCL                <= 1.3
    codec_<strategy>  a strategy's per-step codec (GTC's encode  one torch.add pass over them        <= 4
    _<setting>        + decode, ...) on 10M fp32 elements
    simulated_epoch_  an epoch of 128 simulated workers of one   one worker's epoch, same data and   <= 1.3
    <strategy>        strategy                                   per-worker batch
    data_wait         time waiting for batches (warm cache)      the epoch's time                    <= 0.05
    model_cpu         LSTMAcousticModel training, frames/s       bare nn.LSTM + nn.Linear loop       >= 0.95
    model_gpu         lstm_paper training on the GPU, frames/s   bare cuDNN nn.LSTM + nn.Linear      >= 0.8
    ================  =========================================  ==================================  =======

A figure the machine cannot run (the GPU ones without CUDA) is kept in the table as skipped,
with the reason.

The multi-process figures start their workers once (from a fork server, like the tests) and
run every repetition of both sides inside them: each side is a fresh ``Trainer.fit`` on a fresh
strategy in the same process group, on fixed synthetic batches, timed from the end of the
warm-up steps to the last step on rank 0. The single-process figures build their data from
synthetic features written in the feature cache's own format (fp16 shards read through mmap).
"""
from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing as mp
import os
import queue
import socket
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.profilers import Profiler
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import OmegaConf
from torch import nn

from asrbench import runinfo, strategies
from asrbench.cluster.simulated import LoopConfig, SimulatedCluster, fit
from asrbench.data import text
from asrbench.data.dataset import SpeechDataset, make_loader
from asrbench.data.features import FeatureConfig, SplitFeatures
from asrbench.errors import AsrbenchError, ConfigError
from asrbench.experiment import SpeechDataModule
from asrbench.model.module import AcousticModule
from asrbench.strategies import build_strategy, strategy_kwargs

log = logging.getLogger(__name__)

CONF = Path(__file__).resolve().parents[1] / "conf"
INPUT_DIM = FeatureConfig().dim  # 240: 80 mel bins x 3 stacked frames
GRADIENT_CLIP_VAL = 5.0  # conf/trainer/default.yaml, on both sides of every training figure
OPTIM = {"name": "adam", "lr": 0.0015}  # conf/train.yaml's optimizer
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


def model_config(name: str) -> dict[str, Any]:
    """conf/model/<name>.yaml as a dict."""
    path = CONF / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"bench model {name!r} is not in conf/model/; use one of "
                          f"{', '.join(sorted(p.stem for p in path.parent.glob('*.yaml')))}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def strategy_config(name: str, batch_size: int) -> dict[str, Any]:
    """conf/strategy/<name>.yaml resolved (its `${batch_size}` is the bench's per-worker batch)."""
    cfg = OmegaConf.create({"batch_size": batch_size, "strategy": OmegaConf.load(CONF / "strategy" / f"{name}.yaml")})
    return OmegaConf.to_container(cfg, resolve=True)["strategy"]


# ---------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------
def synthetic_batch(batch_size: int, frames: int, seed: int, input_dim: int = INPUT_DIM) -> dict[str, Any]:
    """A padded training batch of full-length utterances: `frames` stacked frames, frames // 4 characters."""
    gen = torch.Generator().manual_seed(seed)
    target_len = max(1, frames // 4)
    return {"feats": torch.randn(batch_size, frames, input_dim, generator=gen),
            "feat_lens": torch.full((batch_size,), frames, dtype=torch.long),
            "targets": torch.randint(1, text.vocab_size(), (batch_size, target_len), generator=gen),
            "target_lens": torch.full((batch_size,), target_len, dtype=torch.long)}


def synthetic_features(directory: Path, utterances: int, frames: Sequence[int], seed: int = 0,
                       input_dim: int = INPUT_DIM) -> SplitFeatures:
    """A split of random features in the cache's format: one fp16 shard on disk, read through mmap.

    Lengths are uniform in [frames[0], frames[1]] stacked frames; transcripts are random letters,
    a quarter as many as frames.
    """
    gen = torch.Generator().manual_seed(seed)
    lo, hi = int(frames[0]), int(frames[1])
    if not 4 <= lo <= hi:
        raise ConfigError(f"bench frames must be [min, max] with 4 <= min <= max, got {list(frames)}")
    lengths = torch.randint(lo, hi + 1, (utterances,), generator=gen)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"bench-{utterances}-{lo}-{hi}-{seed}.pt"
    torch.save({"feats": torch.randn(int(lengths.sum()), input_dim, generator=gen).half()}, path)
    letters = text.ALPHABET[3:]
    texts = ["".join(letters[int(i)] for i in torch.randint(0, len(letters), (int(n) // 4,), generator=gen))
             for n in lengths]
    return SplitFeatures([path], [f"bench-{i:06d}" for i in range(utterances)], texts, lengths,
                         torch.zeros(utterances, dtype=torch.long), torch.cumsum(lengths, 0) - lengths,
                         {"mean": torch.zeros(input_dim), "std": torch.ones(input_dim)})


class FixedBatches(torch.utils.data.Dataset):
    """`length` items cycling over a few prebuilt batches (a DataLoader with batch_size=None)."""

    def __init__(self, batches: Sequence[dict[str, Any]], length: int) -> None:
        self.batches, self.length = list(batches), length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.batches[i % len(self.batches)]


def acoustic_module(model: str, world_size: int = 1, seed: int = 0) -> Any:
    """The training module of `asrbench train` (CTC) for conf/model/<model>.yaml, seeded."""

    torch.manual_seed(seed)
    return AcousticModule(INPUT_DIM, model_config(model), dict(OPTIM), "ctc", world_size=world_size)


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


# ---------------------------------------------------------------------------------------------
# The whole bench
# ---------------------------------------------------------------------------------------------
FIGURES = ("sync_step", "gtc_step", "gtc_step_gpu", "codec", "simulated_epoch", "data_wait", "model_cpu", "model_gpu")


def _section(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A figure's own keys over the preset's shared ones (repetitions, seed, threads...)."""
    shared = {k: v for k, v in cfg.items() if not isinstance(v, Mapping)}
    return shared | dict(cfg[name])


def run(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Measure every figure the preset `cfg` enables; write `<out_dir>/bench.json` and `bench.md`."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = list(cfg.get("figures") or FIGURES)
    unknown = sorted(set(wanted) - set(FIGURES))
    if unknown:
        raise ConfigError(f"bench.figures has unknown names {unknown}; pick from {', '.join(FIGURES)}")
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]  # other work on the machine shows up here and in every figure
    threads_before = torch.get_num_threads()
    threads = set_threads(int(cfg["threads"]))
    figures: list[Figure] = []
    scratch = tempfile.TemporaryDirectory(dir=out_dir, prefix=".bench-data-")  # synthetic shards, removed after
    workdir = Path(scratch.name)
    try:
        for name in wanted:
            log.info("bench: %s", name)
            t_fig = time.perf_counter()
            if name == "sync_step":
                section = _section(cfg, "strategy_step")
                new = [bench_strategy_steps("sync_step", section["dense"], "ddp", int(section["sync_workers"]),
                                            section, goal=1.02, diagnostic="ddp_again")]
            elif name in ("gtc_step", "gtc_step_gpu"):
                gpu = name == "gtc_step_gpu"
                section = _section(cfg, "strategy_step_gpu" if gpu and "strategy_step_gpu" in cfg else "strategy_step")
                workers = int(section["gtc_workers"])
                if gpu and torch.cuda.is_available():
                    workers = max(2, min(workers, torch.cuda.device_count()))
                new = [bench_strategy_steps(name, section["compressed"], section["dense"], workers, section, goal=1.3,
                                            accelerator="gpu" if gpu else "cpu")]
            elif name == "codec":
                new = bench_codec(_section(cfg, "codec"), threads)
            elif name == "simulated_epoch":
                new = bench_simulated(_section(cfg, "simulated"), workdir, threads)
            elif name == "data_wait":
                new = [bench_data_pipeline(_section(cfg, "data_pipeline"), workdir, threads)]
            else:
                new = [bench_model(_section(cfg, "model_throughput"), threads,
                                   device="cuda" if name == "model_gpu" else "cpu")]
            for figure in new:
                figure.detail["wall_s"] = time.perf_counter() - t_fig
                log.info("bench: %s", row_text(figure))
            figures += new
            torch.set_num_threads(threads)
    finally:
        torch.set_num_threads(threads_before)
        scratch.cleanup()
    results = {"preset": cfg.get("name"), "figures": [f.as_dict() for f in figures],
               "passed": all(f.passed is not False for f in figures),
               "threads": {"in_process": threads, "per_worker_process": int(cfg["strategy_step"]["threads_per_process"])
                           if "strategy_step" in cfg else None},
               "host": runinfo.host() | {"load_avg_1m": {"start": load_start, "end": os.getloadavg()[0]}},
               "versions": runinfo.versions(), "git_commit": runinfo.git_commit(),
               "wall_s": time.perf_counter() - t0, "config": cfg}
    runinfo.write_json_atomic(out_dir / "bench.json", results)
    (out_dir / "bench.md").write_text(markdown(results))
    return results


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit.startswith("s"):
        scaled, prefix = (value * 1e3, "ms") if value < 1 else (value, "s")
        return f"{scaled:.3g} {prefix}{unit[1:]}"
    return f"{value:,.0f} {unit}" if abs(value) >= 100 else f"{value:.3g} {unit}"


def row_text(figure: Figure) -> str:
    if figure.skipped or figure.error:
        return f"{figure.name}: {'skipped' if figure.skipped else 'FAILED'} ({figure.skipped or figure.error})"
    return (f"{figure.name}: ours {_number(figure.ours, figure.unit)}, peer {_number(figure.peer, figure.unit)}, "
            f"ratio {figure.ratio:.3f} (goal {figure.goal_text}) {'pass' if figure.passed else 'FAIL'}")


def markdown(results: Mapping[str, Any]) -> str:
    """bench.md: the table of figures, then the machine, threads, versions and commit."""
    rows = ["| figure | what | ours | peer | ratio | goal | result |", "|---|---|---|---|---|---|---|"]
    for f in results["figures"]:
        if f["skipped"] or f["error"]:
            result = f"skipped: {f['skipped']}" if f["skipped"] else f"FAIL: {f['error']}"
            rows.append(f"| {f['name']} | {f['what']} | - | - | - | {f['goal_text']} | {result} |")
            continue
        threads = f"{f['processes']} x {f['threads']} thread(s)" if f["processes"] > 1 else f"{f['threads']} thread(s)"
        rows.append(f"| {f['name']} | {f['what']}; {threads}, median of {f['repetitions']} | "
                    f"{_number(f['ours'], f['unit'])} | {_number(f['peer'], f['unit'])} | {f['ratio']:.3f} | "
                    f"{f['goal_text']} | {'pass' if f['passed'] else 'FAIL'} |")
    notes = []
    for f in results["figures"]:
        shown = {k: v for k, v in f["detail"].items() if k not in ("wall_s", "sides")}
        if shown:
            notes.append(f"- {f['name']}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in shown.items()))
    host = results["host"]
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    threads = results["threads"]
    return "\n".join([
        f"# asrbench bench ({results['preset']})", "",
        *rows, "", *notes, *([""] if notes else []),
        f"- machine: {host.get('node')} ({host.get('machine')}, {host.get('cpus')} CPUs"
        f"{', ' + host['gpu'] if host.get('gpu') else ''}); 1-minute load average {host['load_avg_1m']['start']:.2f} "
        f"at the start, {host['load_avg_1m']['end']:.2f} at the end",
        f"- torch threads: {threads['in_process']} in this process; {threads['per_worker_process']} per worker "
        f"process in the multi-process figures",
        f"- versions: {versions}",
        f"- git commit: {results['git_commit']}",
        f"- wall time: {results['wall_s']:.0f} s", ""])
