"""The strategy contract: what one module of ``asrbench/strategies/`` tells the rest of asrbench.

A strategy is one module (plus ``conf/strategy/<name>.yaml`` and its tests) that exports
``SPECS``, a list of :class:`StrategySpec`. The registry (:mod:`asrbench.strategies`) finds the
modules by scanning this package, so adding a strategy touches no other file. What a spec holds:

- **the real path**: ``strategy_class``, the Lightning Strategy registered as ``asrbench_<name>``
  (a DDP communication hook, an averager or both), built by :meth:`StrategySpec.build`;
- **the math over stacked workers**: :meth:`StrategySpec.simulate` returns the
  :class:`Simulation` the simulated cluster runs: an exchange of the rows of G (one gradient per
  worker) and/or an averager of the rows of P (one model per worker), each calling the same
  tensor core as the real path and filling the same :class:`~asrbench.strategies.accounting.CommStats`;
- **the bytes**: what the real path and the simulation record in that CommStats, plus
  ``cost_stats()`` of the simulation (per worker per step: what the cost model reads);
- **the communication schedule**: :meth:`StrategySpec.schedule`, the collectives of one optimizer
  step (and of one block end, amortised) with their sizes and participants, which
  :func:`asrbench.cluster.cost.comm_parts` prices; :meth:`StrategySpec.waiting`, who waits for whom;
- **the knobs**: ``conf/strategy/<name>.yaml`` (defaults, units, the search grid in reproduce
  presets); :meth:`StrategySpec.check` refuses bad combinations in one line before any process starts.

Nothing here imports Lightning or the cluster: the cost model and the simulated cluster import
this module, never the other way round.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from asrbench.errors import ConfigError

FP32_BYTES = 4
OPS = ("all_reduce", "all_gather", "broadcast", "local")


@dataclass(frozen=True)
class Collective:
    """One entry of a strategy's communication schedule, priced by the cost model.

    ``op``: ``all_reduce`` (ring, ``nbytes`` per worker), ``all_gather`` (ring, a piece of
    ``nbytes`` from each worker), ``broadcast`` (pipelined chain of ``nbytes`` from one worker) or
    ``local`` (``seconds`` of work each worker does on what it received, e.g. a decode).
    ``workers`` take part in one instance; with ``stride`` 1 the instances are the N / workers
    groups of consecutive ranks, running at once; with ``stride`` s > 1 one instance over ranks
    0, s, 2s, ... (the groups' representatives). It happens every ``every`` optimizer steps (K for a
    block end; its time is divided by K) on a ``share`` of them (e.g. the steps after a warm-up).
    """

    part: str
    op: str
    workers: int
    nbytes: float = 0.0
    seconds: float = 0.0
    stride: int = 1
    every: float = 1.0
    share: float = 1.0

    def __post_init__(self) -> None:
        assert self.op in OPS, self.op
        assert self.workers >= 1 and self.stride >= 1 and self.every >= 1 and 0.0 <= self.share <= 1.0, self


class SimulatedExchange(Protocol):
    """The exchange of one optimizer step over the rows of G (N, n): every worker's gradient in,
    what each worker applies out (in place). Fills worker 0's CommStats as the real path does."""

    group_size: int  # rows equal after the exchange: clipping computes one norm per group
    encode_s: float  # seconds spent compressing, all workers together (charged to the worker's compute)

    def exchange(self, grads: Tensor, step: int) -> None: ...

    def cost_stats(self) -> dict[str, float]: ...


class SimulatedAverager(Protocol):
    """Model averaging over the rows of P (N, n) after the optimizer step (BMUF and its kin)."""

    block_size: int

    @property
    def global_model(self) -> Tensor: ...

    def after_step(self, optimizer: torch.optim.Optimizer) -> bool: ...

    def finalize(self) -> None: ...

    def cost_stats(self, optimizer: torch.optim.Optimizer) -> dict[str, float]: ...


@dataclass
class SimContext:
    """What the simulated cluster hands a strategy: its N workers as rows of one device's tensors."""

    nodes: int
    P: Tensor  # (N, n) every worker's parameters
    rows: Sequence[nn.Parameter]  # the rows of P as the optimizer's parameters
    optimizer: torch.optim.Optimizer
    shapes: Sequence[torch.Size]  # the model's trainable parameters, in order: a row is their concatenation
    device: torch.device
    params: Sequence[nn.Parameter] = ()  # those parameters (bound to the row being computed): e.g. the
    # order in which a backward pass makes their gradients ready, which decides DDP's buckets

    @property
    def numel(self) -> int:
        return int(self.P.shape[1])


@dataclass
class Simulation:
    """A strategy on the simulated cluster: its gradient exchange, its averager, either or none."""

    exchange: SimulatedExchange | None = None
    averager: SimulatedAverager | None = None
    group_size: int = 1  # rows equal after each exchange
    extra_stats: Callable[[], dict[str, float]] | None = None  # cost stats of neither part (e.g. a lone GTC worker)

    def cost_stats(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """The strategy's inputs of the cost model for this run (per worker, per step)."""
        stats: dict[str, float] = {}
        if self.exchange is not None:
            stats |= self.exchange.cost_stats()
        if self.extra_stats is not None:
            stats |= self.extra_stats()
        if self.averager is not None:
            stats |= self.averager.cost_stats(optimizer)
        return stats


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer around a simulated exchange measures it (CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_stats(name: str, keys: Sequence[str], stats: Mapping[str, Any], n: int) -> dict[str, float]:
    """`stats[keys]` as floats >= 0, with block_size and group_size whole and g dividing n."""
    if n < 1 or n != int(n):
        raise ValueError(f"Arg `n` (workers) must be a positive whole number (got {n})")
    out: dict[str, float] = {}
    for key in keys:
        if stats.get(key) is None:
            raise ValueError(f"stats[{key!r}] is missing; strategy={name} needs {', '.join(keys)}")
        out[key] = float(stats[key])
        if not out[key] >= 0:
            raise ValueError(f"stats[{key!r}] must be >= 0 (got {out[key]})")
    for key in (k for k in out if k.endswith("_fraction")):
        if out[key] > 1:
            raise ValueError(f"stats[{key!r}] must be in [0, 1] (got {out[key]})")
    for key in ("block_size", "group_size"):
        if key in out and (out[key] < 1 or out[key] != int(out[key])):
            raise ValueError(f"stats[{key!r}] must be a positive whole number (got {out[key]})")
    if "group_size" in out and n % int(out["group_size"]):
        raise ValueError(f"stats['group_size']={int(out['group_size'])} must divide the {n} workers")
    return out


class StrategySpec:
    """One strategy's entry in the registry (module docstring). Subclasses set the class attributes
    and override what differs; the defaults describe a strategy whose every worker exchanges with
    every other each step."""

    name: str = ""
    summary: str = ""  # one line for tables and `asrbench --help`
    order: int = 100  # position in tables (the paper's strategies first)
    strategy_class: type | None = None  # the Lightning Strategy of the real path
    registry_name: str | None = None  # Lightning StrategyRegistry name; default asrbench_<name>
    stats_keys: tuple[str, ...] = ()  # keys of cost_stats() the schedule reads
    size_keys: tuple[str, ...] = ()  # those that grow with the parameter count (re-costed for another model)
    compresses: bool = False  # sends a fraction of the gradient: its density is reported
    knobs: Mapping[str, Any] = {}  # key below strategy. -> asrbench.knobs.Knob: what its yaml's keys accept
    # Largest relative difference of the parameters, per step and per rank, between the simulated
    # cluster and real gloo workers (tests/strategies/equivalence.py): the float order of a
    # library's collective is not ours, so a strategy whose sums run in that order states its own.
    equivalence_tolerance: float = 1e-5

    # -- configuration ---------------------------------------------------------------------------
    def exchange_group(self, cfg: Mapping[str, Any], nodes: int) -> int:
        """Workers whose gradients one exchange combines (the ``*_group`` learning-rate rules scale by it)."""
        return nodes

    def check(self, cfg: Mapping[str, Any], nodes: int) -> None:
        """Raise a one-line ConfigError for a bad combination of this strategy's knobs and `nodes`."""

    def stacked_arrays(self, cfg: Mapping[str, Any], nodes: int) -> dict[str, int]:
        """(N, n) fp32 arrays the simulation holds beyond parameters, gradients and optimizer state."""
        return {}

    def build(self, cfg: Mapping[str, Any], *, nodes: int, timeout_s: float) -> Any:
        """The Lightning Strategy for this config (the keys below ``name`` are its keywords)."""
        from lightning.pytorch.strategies import StrategyRegistry  # heavy: only when a strategy is built

        if nodes < 2:
            raise ConfigError(f"strategy={self.name} needs nodes >= 2 (got nodes={nodes}); "
                              f"use strategy=single for one worker")
        self.check(cfg, nodes)
        kwargs = strategy_kwargs(cfg)
        kwargs["timeout"] = timedelta(seconds=timeout_s)
        entry = StrategyRegistry[cfg.get("registry_name") or self.registry_name or f"asrbench_{self.name}"]
        try:
            return entry["strategy"](**entry["init_params"], **kwargs)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"strategy={cfg['name']}: {err}") from None

    # -- the simulated cluster -------------------------------------------------------------------
    def simulate(self, strategy: Any, ctx: SimContext) -> Simulation:
        raise NotImplementedError(f"strategy={self.name} has no simulation")

    # -- the cost model --------------------------------------------------------------------------
    def read_stats(self, stats: Mapping[str, Any], n: int) -> dict[str, float]:
        """The schedule's inputs from `stats`, checked (ValueError naming the key)."""
        return read_stats(self.name, self.stats_keys, stats, n)

    def schedule(self, stats: Mapping[str, float], n: int) -> list[Collective]:
        """The collectives of one optimizer step among `n` workers (block ends amortised by ``every``)."""
        return []

    def waiting(self, stats: Mapping[str, Any], n: int) -> tuple[int, int]:
        """(g, K): groups of g workers wait for their slowest member every step, all groups every K steps."""
        return n, 1

    # -- `asrbench bench` ------------------------------------------------------------------------
    codec_settings: tuple[Mapping[str, Any], ...] = ()  # keyword sets of benchmark_codec, one bench figure each

    def codec_label(self, setting: Mapping[str, Any]) -> str:
        """A setting of the codec in a figure's name, e.g. GTC's density as 1%."""
        return "_".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in setting.items()) or "default"

    def benchmark_codec(self, numel: int, repeats: int, seed: int, **setting: Any) -> dict[str, float]:
        """Best-of-`repeats` seconds of this strategy's per-step codec (compress + decompress of one
        worker's gradient) on `numel` fp32 elements, beside one torch.add pass over them: keys
        codec_s, add_s, ratio and what else describes the run (:func:`time_codec`)."""
        raise NotImplementedError(f"strategy={self.name} has no codec")


# Keys of conf/strategy/*.yaml read by the harness itself rather than passed to the strategy.
HARNESS_KEYS = frozenset({"name", "registry_name", "inner_optimizer"})


def strategy_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in HARNESS_KEYS}


def time_codec(codec: Any, numel: int, repeats: int, reset: Any = None) -> dict[str, float]:
    """Best-of-`repeats` seconds of `codec()` and of one ``torch.add`` over `numel` fp32 elements."""
    import time

    a, b = torch.randn(numel), torch.randn(numel)
    out = torch.empty(numel)

    def best(fn: Any) -> float:
        t = math.inf
        for _ in range(repeats + 1):
            if reset is not None:
                reset()
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        return t

    t_add = best(lambda: torch.add(a, b, out=out))
    t_codec = best(codec)
    return {"codec_s": t_codec, "add_s": t_add, "ratio": t_codec / t_add, "numel": float(numel),
            "threads": float(torch.get_num_threads())}
