"""A simulated cluster: N logical workers in one process, on the cores of the real strategies.

The mechanics of ``asrbench train cluster=simulated nodes=128 strategy=gtc_bmuf``: 128 workers
in one process (on the CPU, or on one GPU). The run around them (data, logger, evaluation,
results.json) is :mod:`asrbench.experiment`'s, the same as over real processes; the step time
and speedup those workers would see on a network preset are :func:`predict`'s (the cost model,
:mod:`asrbench.cluster.cost`, on this run's measured statistics).

Nothing is re-derived here. Gradients come from the run's own model and loss
(:class:`AcousticModule`), each worker's data from ``make_loader(rank=i, world_size=N)`` with
Lightning's ``set_epoch`` calls, GTC from :func:`asrbench.strategies.gtc.encode` and
:func:`~asrbench.strategies.gtc.decode`, BMUF from :class:`BMUFAverager` (schedule, filter,
optimizer-state sync), the optimizer and its warm-up from ``AcousticModule.configure_optimizers``,
and bytes from the strategies' own :class:`CommStats`. Only the place the workers live changes:
a collective becomes a tensor operation over the worker dimension.

Symbols

    =====  ========================  =====================================================
    N      ``nodes``                 logical workers
    n                                trainable parameters of the model
    P      (N, n)                    every worker's parameters, one row each
    G      (N, n)                    every worker's gradient, then the exchanged one
    R      (N, n)                    GTC residuals r, one per worker (gtc, gtc_bmuf)
    g      ``strategy.group_size``   workers per group: N for sync and gtc, 1 for bmuf
    K      ``strategy.block_size``   optimizer steps per BMUF block
    =====  ========================  =====================================================

One optimizer step of the cluster:

1. Local gradients: for each worker i, the model's parameters and gradients become views of
   P[i] and G[i] (no copy); forward and backward on worker i's batch, whose padded frames are
   recorded (the cost model charges the slowest worker: :func:`cost.straggler_factor`).
2. Exchange over rows, within each group of g consecutive workers: sync, the mean of the rows
   (the all-reduce); gtc, :func:`encode` on each row, then :func:`decode` of the group's
   messages in rank order, as the hook does, written to every row of the group.
3. Gradient clipping of each worker's gradient as Lightning does it
   (``torch.nn.utils.clip_grad_norm_`` over that worker's parameters).
4. One ``torch.optim`` optimizer whose parameters are the N rows of P (views) steps them all.
   Adam, AdamW and SGD are elementwise, so this equals N optimizers, one per worker (tested);
   row by row, each update's temporaries stay the size of one model.
5. BMUF (bmuf, gtc_bmuf): :class:`BMUFAverager` counts the step and, at a block end, filters
   the mean of the group representatives' rows and writes the next block start into every row.
6. Divergence: a non-finite loss or gradient (before step 2) or parameter (after step 5) stops
   the cluster with :class:`Diverged`, naming the step and the worker.

A checkpoint (:meth:`SimulatedCluster.state_dict`, :func:`resume_state`) holds everything the
next step reads: P, the optimizer and its lr schedulers, every tensor and counter the
strategy's exchange and averager keep (GTC residuals; BMUF's S, W_g, Δ and step in the block;
PowerSGD's, top-k's and 1-bit SGD's error memories and PowerSGD's random state; worker 0's
byte counts), the workers' RNG states and the loop's position inside the epoch. The strategy
modules stay unaware of it (:func:`object_state` reads their objects' attributes), and a run
resumed from it continues bit for bit (tests/cluster/test_simulated_faults.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.core.optimizer import _configure_optimizers, _configure_schedulers_automatic_opt
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from asrbench.cluster import cost
from asrbench.data.dataset import make_loader, train_batches_per_epoch
from asrbench.errors import CheckpointError, ConfigError
from asrbench.model.module import AcousticModule
from asrbench import strategies
from asrbench.strategies import spec, spec_of
from asrbench.strategies.contract import FP32_BYTES, SimContext
from asrbench.strategies.contract import synchronize as _synchronize

log = logging.getLogger(__name__)

# Trainer keys (conf/trainer/) the simulated loop follows, and those with no meaning for it.
TRAINER_KEYS = frozenset({"max_epochs", "max_steps", "max_time", "val_check_interval", "check_val_every_n_epoch",
                          "log_every_n_steps", "gradient_clip_val", "gradient_clip_algorithm",
                          "enable_progress_bar"})
TRAINER_KEYS_WITHOUT_EFFECT = frozenset({"num_sanity_val_steps", "enable_model_summary", "enable_checkpointing",
                                         "benchmark", "default_root_dir"})


# ---------------------------------------------------------------------------------------------
# Workers as rows
# ---------------------------------------------------------------------------------------------
class RowBinding:
    """The model's trainable parameters (and gradients) as views into one row of P (and G).

    Binding a row costs a few attribute writes per parameter tensor, no copy: the forward and
    backward of worker i read P[i] and accumulate into G[i] directly.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.numel = sum(self.sizes)

    def flat(self) -> Tensor:
        """The model's current parameters as one flat fp32 vector (n,)."""
        return torch.cat([p.detach().reshape(-1).float() for p in self.params])

    def views(self, row: Tensor) -> list[Tensor]:
        """`row` (n,) cut into tensors shaped like the parameters (views)."""
        return [v.view(s) for v, s in zip(row.split(self.sizes), self.shapes)]

    @torch.no_grad()
    def bind(self, row: Tensor, grad_row: Tensor | None = None) -> None:
        """Make the model's parameters views of `row` and, if given, its gradients views of `grad_row`."""
        grads = self.views(grad_row) if grad_row is not None else [None] * len(self.params)
        for p, value, grad in zip(self.params, self.views(row), grads):
            p.data = value
            p.grad = grad


class _WorkerRows:
    """What `AcousticModule.configure_optimizers` reads, with the rows of P as the parameters."""

    def __init__(self, module: Any, rows: Sequence[nn.Parameter]) -> None:
        self.optim_cfg, self.world_size, self._params = module.optim_cfg, module.world_size, list(rows)
        self._module = module

    @property
    def steps_per_epoch(self) -> int:  # read by a step-wise lr decay at each step, once the data is known
        return self._module.steps_per_epoch

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(self._params)


def row_parameters(stacked: Tensor) -> list[nn.Parameter]:
    """The rows of `stacked` (N, n) as N parameters that share its storage."""
    return [nn.Parameter(row, requires_grad=True) for row in stacked.unbind(0)]


def build_worker_optimizer(module: Any, rows: Sequence[nn.Parameter]) -> tuple[torch.optim.Optimizer, list[Any]]:
    """The optimizer and lr schedulers of `module.configure_optimizers()` over the N worker rows.

    Adam, AdamW and SGD (with momentum and weight decay) update each element from that element's
    gradient and state alone, so one optimizer over the rows of P equals N optimizers, one per
    worker. The return value is parsed by Lightning's own parser, so the schedulers come back as
    its ``LRSchedulerConfig`` (scheduler, interval, frequency), stepped by :func:`step_schedulers`.
    """
    conf = AcousticModule.configure_optimizers(_WorkerRows(module, rows))
    optimizers, schedulers, monitor = _configure_optimizers(conf)
    if len(optimizers) != 1:
        raise ConfigError(f"cluster=simulated trains with one optimizer; the module configured {len(optimizers)}")
    configs = _configure_schedulers_automatic_opt(schedulers, monitor)
    if any(c.reduce_on_plateau for c in configs):
        raise ConfigError("cluster=simulated does not step ReduceLROnPlateau schedulers (they need a monitored "
                          "metric); use a step- or epoch-wise schedule")
    return optimizers[0], configs


def step_schedulers(configs: Sequence[Any], interval: str, index: int) -> None:
    """Lightning's rule: a scheduler of `interval` steps when (index + 1) % frequency == 0, `index`
    being the batch index in the epoch (interval step) or the epoch (interval epoch)."""
    for config in configs:
        if config.interval == interval and (index + 1) % config.frequency == 0:
            config.scheduler.step()


@torch.no_grad()
def clip_rows(grads: Tensor, binding: RowBinding, max_norm: float, group_size: int = 1,
              algorithm: str = "norm", split: int | None = None) -> None:
    """Lightning's gradient clipping applied to each worker's row of `grads`.

    ``norm``: ``torch.nn.utils.clip_grad_norm_`` per worker: the L2 norm ‖g‖ over all of that
    worker's parameter tensors (computed per tensor, then over the tensor norms, as torch does),
    and g <- g min(1, max_norm / (‖g‖ + 1e-6)). ``value``: clamp to [-max_norm, max_norm]. Rows
    of one group are equal after the exchange, so the norm is computed once per group. With
    `split`, the parameters before and from that index are clipped each by their own norm
    (:meth:`AcousticModule.configure_gradient_clipping`: the phone probe's own).
    """
    if algorithm == "value":
        grads.clamp_(-max_norm, max_norm)
        return
    workers = grads.shape[0]
    offsets = [0]
    for size in binding.sizes:
        offsets.append(offsets[-1] + size)
    parts = [(0, len(binding.sizes))] if split is None else [(0, split), (split, len(binding.sizes))]
    for a, b in parts:
        lo, hi = offsets[a], offsets[b]
        if hi == lo:
            continue
        block = grads[:, lo:hi]
        shapes = binding.shapes[a:b]
        norms = torch.stack([torch.nn.utils.get_total_norm([v.view(sh) for v, sh in
                                                            zip(block[i].split(binding.sizes[a:b]), shapes)])
                             for i in range(0, workers, group_size)])
        coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
        block.view(-1, group_size, hi - lo).mul_(coef.view(-1, 1, 1))


# ---------------------------------------------------------------------------------------------
# Checkpoints: the state of a strategy's simulation objects, as tensors and numbers
# ---------------------------------------------------------------------------------------------
_OBJECT, _OPTIMIZER, _NUMPY_RNG = "__object__", "__optimizer__", "__numpy_rng__"
# Classes whose objects' attributes are state: the strategies' own, and torch's hook states (PowerSGDState).
_STATE_MODULES = ("asrbench.", "torch.distributed.algorithms.")
_PLAIN = (bool, int, float, str, type(None))


def _attribute_names(obj: Any) -> list[str]:
    names = list(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else [n for n in slots if n not in ("__dict__", "__weakref__")]
    return list(dict.fromkeys(names))


class _Unsaved(Exception):
    """A value that is not state (a callable, a process group, a view of P): its attribute is left as it is."""


def _encode(value: Any, skip: Callable[[Any], bool], depth: int, attribute: bool = True) -> Any:
    """`value` as checkpoint state; objects (nested, optimizers, RNGs) only as attributes, not in containers."""
    if skip(value):
        raise _Unsaved
    if isinstance(value, _PLAIN):
        return value
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    if isinstance(value, (list, tuple)):
        items = [_encode(v, skip, depth, attribute=False) for v in value]
        return items if isinstance(value, list) else tuple(items)  # torch.Size as a plain tuple
    if isinstance(value, dict):
        if not all(isinstance(k, (*_PLAIN, tuple)) for k in value):
            raise _Unsaved
        return {k: _encode(v, skip, depth, attribute=False) for k, v in value.items()}
    if not attribute:
        raise _Unsaved
    if isinstance(value, torch.optim.Optimizer):
        return {_OPTIMIZER: value.state_dict()}
    if isinstance(value, np.random.RandomState):
        kind, keys, pos, has_gauss, gauss = value.get_state()
        return {_NUMPY_RNG: [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if depth > 0 and not callable(value) and type(value).__module__.startswith(_STATE_MODULES):
        return {_OBJECT: object_state(value, skip, depth - 1)}
    raise _Unsaved


def object_state(obj: Any, skip: Callable[[Any], bool], depth: int = 4) -> dict[str, Any]:
    """Every attribute of `obj` that is state, as tensors, numbers, strings and containers of them
    (loadable with ``torch.load(weights_only=True)``): tensors, counters, dicts and lists of them,
    torch optimizers (their state_dict), numpy RNGs, and the attributes of nested objects of
    asrbench's and torch's hook classes. Callables, process groups, hook handles and whatever
    `skip` names (the cluster's P, G, rows and optimizer, saved once by the cluster) are left out.
    """
    out: dict[str, Any] = {}
    for name in _attribute_names(obj):
        try:
            out[name] = _encode(getattr(obj, name), skip, depth)
        except (_Unsaved, AttributeError):
            pass
    return out


def _decode(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device, copy=True)
    if isinstance(value, (list, tuple)):
        return type(value)(_decode(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _decode(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def load_object_state(obj: Any, state: Mapping[str, Any], device: torch.device) -> None:
    """Write :func:`object_state`'s `state` back into `obj`: tensors in place where the shape
    matches (whatever shares them keeps sharing), nested objects attribute by attribute."""
    for name, value in state.items():
        current = getattr(obj, name, None)
        if isinstance(value, dict) and _OBJECT in value:
            assert current is not None, f"{type(obj).__name__}.{name} holds no object to load state into"
            load_object_state(current, value[_OBJECT], device)
        elif isinstance(value, dict) and _OPTIMIZER in value:
            current.load_state_dict(value[_OPTIMIZER])
        elif isinstance(value, dict) and _NUMPY_RNG in value:
            kind, keys, pos, has_gauss, gauss = value[_NUMPY_RNG]
            current.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        elif _copy_in_place(current, value):
            pass
        elif not _same(current, value):
            setattr(obj, name, _decode(value, current.device if torch.is_tensor(current) else device))


def _copy_in_place(current: Any, value: Any) -> bool:
    """Copy saved tensors into `current`'s own (a tensor, or a list, tuple or dict of them of the same
    layout), so views of one another (e.g. per-tensor views of a residual) keep sharing; False otherwise."""
    if torch.is_tensor(current) and torch.is_tensor(value):
        if current.shape != value.shape or current.dtype != value.dtype:
            return False
        current.copy_(value)
        return True
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)) and len(current) == len(value) \
            and len(value) and all(torch.is_tensor(v) for v in value):
        if not all(torch.is_tensor(c) and c.shape == v.shape and c.dtype == v.dtype for c, v in zip(current, value)):
            return False
        for c, v in zip(current, value):
            c.copy_(v)
        return True
    return False


def _same(current: Any, value: Any) -> bool:
    """Whether a setting already holds the saved value (a shape, a hyper-parameter): left untouched."""
    if torch.is_tensor(current) or torch.is_tensor(value):
        return False
    try:
        return bool(current == value)
    except (RuntimeError, TypeError, ValueError):  # containers of tensors
        return False


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random states (torch, CUDA, NumPy, Python), as tensors and numbers."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": [version, torch.tensor(internal, dtype=torch.int64), gauss_next]}


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss_next))


# ---------------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------------
class Diverged(FloatingPointError):
    """A worker's loss or gradient, or the workers' parameters, hold NaN or inf: training cannot go on.

    `step` is the optimizer step (counted from 1) that met it; str() names the step, the worker
    and what was not finite."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"step {step}: {what}")
        self.step = step


def _finite(t: Tensor) -> bool:
    """Whether every element of `t` is finite, without a t-sized temporary (max and min propagate NaN)."""
    return bool(torch.isfinite(torch.stack([t.amax(), t.amin()])).all())


def _first_nonfinite_row(rows: Tensor) -> int:
    return int((~torch.isfinite(rows.amax(1) - rows.amin(1))).nonzero()[0])


@dataclass
class Timings:
    """Seconds spent in each part of the cluster's steps (all workers together)."""

    compute_s: float = 0.0  # forward + backward of every worker
    exchange_s: float = 0.0  # the gradient exchange (sync's mean, GTC's encode/decode)
    optimizer_s: float = 0.0  # clipping + the optimizer step of the N rows
    averaging_s: float = 0.0  # BMUF's block syncs
    worker_steps: int = 0
    frames: int = 0
    # padded frames (batch x longest utterance: what the LSTM runs over) of each worker, per step
    worker_frames: list[list[int]] = field(default_factory=list)


class SimulatedCluster:
    """N workers of one strategy as rows of P (parameters) and G (gradients), on one device.

    `module` is the run's :class:`AcousticModule` (built with ``world_size=nodes``), `strategy`
    what ``asrbench.strategies.build_strategy`` returns for the run's config: it supplies the
    strategy's settings (τ, g, the BMUF config) and the accounting the real strategy keeps, so
    :meth:`comm_summary` has the real path's keys. Call :meth:`train_step` with one batch per
    worker, then :meth:`finalize` once; the model then holds the model to evaluate.
    """

    def __init__(self, module: Any, strategy: Any, nodes: int, *, device: str | torch.device = "cpu",
                 gradient_clip_val: float | None = None, gradient_clip_algorithm: str = "norm") -> None:
        if nodes < 1:
            raise ConfigError(f"nodes={nodes} must be a positive number of workers")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ConfigError(f"trainer.gradient_clip_algorithm={gradient_clip_algorithm!r} is unknown; "
                              f"use norm or value")
        self.spec = spec_of(strategy)
        self.kind = self.spec.name
        self.strategy, self.nodes = strategy, nodes
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.module.train()
        self.binding = RowBinding(module.model)
        probe = {id(p) for p in module.probe_parameters()}  # clipped by their own norm, as the module does
        self.clip_split = next((i for i, p in enumerate(self.binding.params) if id(p) in probe), None)
        n = self.numel = self.binding.numel
        self.clip_val = float(gradient_clip_val) if gradient_clip_val else None
        self.clip_algorithm = gradient_clip_algorithm
        self.P = self.binding.flat().to(self.device).expand(nodes, n).clone()
        self.G = torch.zeros(nodes, n, device=self.device)
        self.rows = row_parameters(self.P)
        for row, grad in zip(self.rows, self.G.unbind(0)):
            row.grad = grad
        self.optimizer, self.schedulers = build_worker_optimizer(module, self.rows)
        self.simulation = self.spec.simulate(strategy, SimContext(nodes, self.P, self.rows, self.optimizer,
                                                                  self.binding.shapes, self.device,
                                                                  self.binding.params))
        self.exchange, self.averager = self.simulation.exchange, self.simulation.averager
        self.group_size = self.simulation.group_size
        self.steps = 0
        self.synced = False  # whether the last step closed a block (BMUF, GTC-BMUF)
        self.batch_in_epoch = 0
        self.timings = Timings()
        self._rng = self._worker_rng_states(module.model)
        self.binding.bind(self.P[0])

    def _worker_rng_states(self, model: nn.Module) -> list[tuple[Tensor, Tensor | None]] | None:
        """Every worker starts from this process's RNG state, as every rank does after seed_everything."""
        random = any((isinstance(m, nn.RNNBase) and m.dropout > 0 and m.training) or
                     (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0) for m in model.modules())
        if not random:
            return None
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return [(torch.get_rng_state(), cuda)] * self.nodes

    @contextlib.contextmanager
    def _worker_rng(self, i: int) -> Iterator[None]:
        if self._rng is None:
            yield
            return
        cpu, cuda = self._rng[i]
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)
        yield
        self._rng[i] = (torch.get_rng_state(),
                        torch.cuda.get_rng_state(self.device) if cuda is not None else None)

    # -- one step -------------------------------------------------------------------------------
    def _local_gradients(self, batches: Sequence[Mapping[str, Any]]) -> Tensor:
        """Step 1: each worker's loss and gradient (into G[i]) on its own batch; returns the N losses."""
        losses = []
        self.G.zero_()
        t = self.timings
        t.worker_frames.append([int(b["feats"].shape[0] * b["feats"].shape[1]) for b in batches])
        for i, batch in enumerate(batches):
            batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            self.binding.bind(self.P[i], self.G[i])
            _synchronize(self.device)
            t0 = time.perf_counter()
            with self._worker_rng(i):
                loss = self.module.loss(self.module(batch["feats"], batch["feat_lens"]), batch)
                loss.backward()
            _synchronize(self.device)
            t.compute_s += time.perf_counter() - t0
            losses.append(loss.detach())
            t.frames += int(batch["feat_lens"].sum())
        t.worker_steps += len(batches)
        return torch.stack(losses)

    def train_step(self, batches: Sequence[Mapping[str, Any]]) -> Tensor:
        """One optimizer step of every worker (steps 1-5 of the module docstring); returns the N losses."""
        if len(batches) != self.nodes:
            raise ValueError(f"train_step needs one batch per worker ({self.nodes}), got {len(batches)}")
        losses = self._local_gradients(batches)
        self._check_finite(losses)
        t = self.timings
        t0 = time.perf_counter()
        if self.exchange is not None:
            self.exchange.exchange(self.G, self.steps)
        _synchronize(self.device)
        t1 = time.perf_counter()
        if self.clip_val is not None:
            clip_rows(self.G, self.binding, self.clip_val, self.group_size, self.clip_algorithm, self.clip_split)
        self.optimizer.step()
        _synchronize(self.device)
        t2 = time.perf_counter()
        if self.averager is not None:
            self.synced = self.averager.after_step(self.optimizer)
        step_schedulers(self.schedulers, "step", self.batch_in_epoch)
        self.batch_in_epoch += 1
        _synchronize(self.device)
        t.exchange_s += t1 - t0
        t.optimizer_s += t2 - t1
        t.averaging_s += time.perf_counter() - t2
        self.steps += 1
        if not _finite(self.P):
            raise Diverged(self.steps, f"the parameters of worker {_first_nonfinite_row(self.P)} hold NaN or inf "
                                       f"after the exchange and the optimizer step")
        return losses

    def _check_finite(self, losses: Tensor) -> None:
        """Step 1's losses and gradients are finite, or :class:`Diverged` names the first worker whose are not."""
        step = self.steps + 1
        bad = (~torch.isfinite(losses)).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise Diverged(step, f"the loss of worker {i} is {float(losses[i])}")
        if not _finite(self.G):
            raise Diverged(step, f"the gradient of worker {_first_nonfinite_row(self.G)} holds NaN or inf")

    # -- checkpoints -----------------------------------------------------------------------------
    def _not_state(self, value: Any) -> bool:
        """What :func:`object_state` must not save from the strategy's objects: the model, P, G (and
        views of them), the rows and the optimizer, which this cluster saves once itself."""
        if id(value) in self._own or isinstance(value, nn.Module):
            return True
        if torch.is_tensor(value) and value.device == self.device:
            ptr = value.untyped_storage().data_ptr()
            return ptr in (self.P.untyped_storage().data_ptr(), self.G.untyped_storage().data_ptr())
        return False

    @property
    def _own(self) -> set[int]:
        return {id(x) for x in (self.P, self.G, self.optimizer, self.module, self.module.model, *self.rows,
                                *self.binding.params)}

    def state_dict(self) -> dict[str, Any]:
        """Everything the next step reads, as tensors and numbers (module docstring). Tensors of P and
        the optimizer state are the live ones on the CPU: save them before the next step."""
        def strategy_state(obj: Any) -> dict[str, Any] | None:
            return None if obj is None else object_state(obj, self._not_state)

        return {"format": 1, "strategy": self.kind, "nodes": self.nodes, "numel": self.numel,
                "P": self.P.detach().cpu(), "optimizer": self.optimizer.state_dict(),
                "schedulers": [c.scheduler.state_dict() for c in self.schedulers],
                "exchange": strategy_state(self.exchange), "averager": strategy_state(self.averager),
                "steps": self.steps, "synced": self.synced, "batch_in_epoch": self.batch_in_epoch,
                "timings": dataclasses.asdict(self.timings),
                "worker_rng": None if self._rng is None else [list(r) for r in self._rng]}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a cluster of the same strategy, workers and model."""
        found = (state.get("strategy"), state.get("nodes"), state.get("numel"))
        if found != (self.kind, self.nodes, self.numel):
            raise CheckpointError(f"the checkpoint holds a simulated cluster of strategy={found[0]}, nodes={found[1]}, "
                                  f"{found[2]} parameters; this run has strategy={self.kind}, nodes={self.nodes}, "
                                  f"{self.numel}: resume with the settings it was written by")
        self.P.copy_(state["P"])
        self.optimizer.load_state_dict(state["optimizer"])
        for config, saved in zip(self.schedulers, state["schedulers"], strict=True):
            config.scheduler.load_state_dict(saved)
        for part, saved in ((self.exchange, state["exchange"]), (self.averager, state["averager"])):
            assert (part is None) == (saved is None), "the same strategy simulates with the same parts"
            if part is not None:
                load_object_state(part, saved, self.device)
        self.steps, self.synced = int(state["steps"]), bool(state["synced"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.timings = Timings(**state["timings"])
        if state["worker_rng"] is not None:
            self._rng = [(cpu.clone(), None if cuda is None else cuda.clone()) for cpu, cuda in state["worker_rng"]]
        self.binding.bind(self.P[0])

    def end_epoch(self, epoch: int) -> None:
        """Step the epoch-wise lr schedulers, as Lightning does after each training epoch."""
        step_schedulers(self.schedulers, "epoch", epoch)
        self.batch_in_epoch = 0

    @torch.no_grad()
    def finalize(self) -> None:
        """End of training: an averager (BMUF) closes a partial block and writes W_g into every row
        (as BMUFLightning.on_train_end does); the model is then bound to the one model of the run."""
        if self.averager is not None:
            self.averager.finalize()
        assert torch.equal(self.P, self.P[:1].expand_as(self.P)), "the workers must end with one model"
        self.binding.bind(self.P[0])

    def bind_worker(self, i: int) -> None:
        """Point the model at worker i's current parameters (no copy)."""
        self.binding.bind(self.P[i])

    @property
    def blockwise(self) -> bool:
        """Whether the run's one model exists only at block ends (BMUF, GTC-BMUF): validate there."""
        return self.averager is not None

    def bind_global_model(self) -> None:
        """Point the model at the run's one model, the one a validation should score (no copy):
        W_g of the last block for BMUF and GTC-BMUF (Chen & Huo's global model, without the
        Nesterov look-ahead; workers' local parameters drift inside a block), otherwise worker 0
        (every worker, or every worker of a GTC group, holds the same parameters)."""
        if self.averager is not None:
            self.binding.bind(self.averager.global_model)
        else:
            self.binding.bind(self.P[0])

    # -- what happened ----------------------------------------------------------------------------
    def comm_metrics(self) -> dict[str, float]:
        """Worker 0's last step, the keys the real strategy logs under comm/."""
        return dict(self.strategy.comm_metrics()) if hasattr(self.strategy, "comm_metrics") else {}

    def comm_summary(self) -> dict[str, float]:
        """Worker 0's means per step, the keys the real strategy's comm_summary() gives results.json."""
        return dict(self.strategy.comm_summary()) if hasattr(self.strategy, "comm_summary") else {}

    def cost_stats(self) -> dict[str, float]:
        """The per-worker, per-step inputs of :func:`asrbench.cluster.cost.step_time` for this run."""
        stats: dict[str, float] = {"dense_bytes_per_worker_per_step": float(self.numel * FP32_BYTES)}
        stats |= self.simulation.cost_stats(self.optimizer)
        stats["straggler_factor"] = self.straggler_factor(stats)
        return stats

    def straggler_factor(self, stats: Mapping[str, float] | None = None) -> float:
        """The slowest worker's compute over the mean worker's, from every worker's padded frames per
        step and this strategy's waiting (:func:`asrbench.cluster.cost.straggler_factor`)."""
        g, k = self.spec.waiting(stats if stats is not None else self.cost_stats(), self.nodes)
        return cost.straggler_factor(self.timings.worker_frames, g, k)

    def compute_s_per_worker_step(self) -> float:
        """Measured seconds of one worker's step without communication: forward + backward, plus
        its share (1/N) of the clipping and the optimizer step over the rows of P."""
        t = self.timings
        if not t.worker_steps:
            return 0.0
        return t.compute_s / t.worker_steps + t.optimizer_s / t.worker_steps

    def encode_s_per_worker_step(self) -> float:
        """Measured seconds of one worker's compression (e.g. GTC's encode, steps 1-4 of the hook), 0 without."""
        if self.exchange is None or not self.timings.worker_steps:
            return 0.0
        return self.exchange.encode_s / self.timings.worker_steps


# ---------------------------------------------------------------------------------------------
# The cost model applied to this run
# ---------------------------------------------------------------------------------------------
def predict(cluster: SimulatedCluster, network: Mapping[str, Any], *, profile: Mapping[str, Any] | None = None,
            overlap: float = 0.0, frames_per_worker_step: float | None = None) -> dict[str, Any]:
    """The cost model's step time and speedup for this run's strategy, N and measured statistics.

    T_1 = compute + the network file's single-worker overhead (one worker, no communication);
    T_N = s (compute + GTC encode) + communication + this strategy's overhead (:func:`cost.step_time`),
    s the run's straggler factor (measured from every worker's batches); speedup = N T_1 / T_N
    (:func:`cost.speedup`). The ``*_without_stragglers`` figures take s = 1.
    """
    kind = cluster.kind
    stats = cluster.cost_stats()
    measured = cluster.compute_s_per_worker_step()
    compute = float(profile["compute_s_per_worker_step"]) if profile else measured
    encode_s = (float(profile.get("gtc_encode_s_per_worker_step", 0.0)) if profile
                else cluster.encode_s_per_worker_step())
    if profile and profile.get("decode_rate") and "decode_rate" in stats:
        stats["decode_rate"] = float(profile["decode_rate"])
    if compute <= 0:
        raise ConfigError("no worker step was measured (the run trained 0 steps); train at least one step")
    t_1 = compute + cost.step_overhead(network, strategies.BASELINE)  # one worker: its own loop's overhead, no communication
    step = cost.step_time(kind, compute + encode_s, stats, cluster.nodes, network, overlap=overlap)
    even = cost.step_time(kind, compute + encode_s, stats | {"straggler_factor": 1.0}, cluster.nodes, network,
                     overlap=overlap)
    out = {
        "simulated": True,
        "network": network["name"],
        "compute_source": profile["path"] if profile else "measured",
        "compute_s_per_worker_step": compute,
        "measured_compute_s_per_worker_step": measured,
        "gtc_encode_s_per_worker_step": encode_s,
        "predicted_step_s": step["total_s"],
        "predicted_comm_s": step["comm_s"],
        "predicted_comm_parts": cost.comm_parts(kind, stats, cluster.nodes, network),
        "predicted_speedup": cost.speedup(cluster.nodes, step["total_s"], t_1),
        "predicted_overhead_s": step["overhead_s"],
        "straggler_factor": stats.get("straggler_factor", 1.0),
        "predicted_straggler_s": step["straggler_s"],
        "predicted_step_s_without_stragglers": even["total_s"],
        "predicted_speedup_without_stragglers": cost.speedup(cluster.nodes, even["total_s"], t_1),
        "cost_model": {"strategy": kind, "n": cluster.nodes, "overlap": overlap, "stats": stats,
                       "network": dict(network)},
    }
    if frames_per_worker_step:
        out["predicted_train_frames_per_s"] = cluster.nodes * frames_per_worker_step / step["total_s"]
    return out


# ---------------------------------------------------------------------------------------------
# The loop: epochs, stopping, validation, as Lightning's fit loop runs them
# ---------------------------------------------------------------------------------------------
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
    total = per_epoch * loop.max_epochs if loop.max_epochs is not None else None
    if loop.max_steps >= 0:
        total = loop.max_steps if total is None else min(total, loop.max_steps)
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
        for loader in loaders:
            _set_sampler_epoch(loader, epoch)
            if out.batch_in_epoch:
                loader.batch_sampler.resume_at(epoch, out.batch_in_epoch)
        iterators = [iter(loader) for loader in loaders]
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
            if 0 <= loop.max_steps <= out.steps:
                stop, out.stopped_by = True, "max_steps"
            elif loop.max_time_s is not None and time.perf_counter() - t_start >= loop.max_time_s:
                stop, out.stopped_by = True, "max_time"
            elif stop_requested is not None and stop_requested():
                stop, out.stopped_by = True, "interrupted"
            if stop:
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


# ---------------------------------------------------------------------------------------------
# Memory: refuse what cannot fit before starting
# ---------------------------------------------------------------------------------------------
def stacked_arrays(strategy_cfg: Mapping[str, Any], optim: Mapping[str, Any], nodes: int) -> dict[str, int]:
    """How many (N, n) fp32 arrays a run holds: name -> count (the strategy's own from its spec)."""
    name = optim.get("name", "adam")
    arrays = {"parameters": 1, "gradients": 1}
    if name in ("adam", "adamw"):
        arrays["optimizer state"] = 2  # exp_avg, exp_avg_sq
    elif name == "sgd" and float(optim.get("momentum", 0.0) or 0.0) > 0:
        arrays["optimizer state"] = 1  # momentum buffer
    return arrays | spec(strategy_cfg["name"]).stacked_arrays(strategy_cfg, nodes)


def activation_bytes(model_cfg: Mapping[str, Any], input_dim: int, num_classes: int, batch_size: int,
                     max_frames: int) -> int:
    """Rough upper bound of one worker's forward + backward memory: per frame, the input, each
    LSTM layer's gates and states (kept for backward, plus their gradients), the logits."""
    hidden = int(model_cfg.get("hidden_size", 320))
    layers = int(model_cfg.get("num_layers", 3))
    per_frame = 2 * input_dim + layers * 16 * hidden + 4 * num_classes
    return int(FP32_BYTES * batch_size * max_frames * per_frame)


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes free, what) on the device: GPU memory, or the RAM the kernel reports available."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), "GPU memory"
    try:
        import psutil  # optional: not a declared dependency

        return int(psutil.virtual_memory().available), "RAM"
    except ImportError:
        pass
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "RAM"
    raise RuntimeError("cannot read the available memory (no psutil, no MemAvailable in /proc/meminfo)")


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_memory(nodes: int, numel: int, arrays: Mapping[str, int], device: torch.device, *,
                 activations: int = 0, fraction: float = 0.9, report: bool = True) -> int:
    """Bytes the run needs (logged when `report`); a one-line ConfigError when more than `fraction`
    of the free memory."""
    per_array = nodes * numel * FP32_BYTES
    need = sum(arrays.values()) * per_array + activations + 8 * numel * FP32_BYTES  # + n-sized buffers
    free, what = available_memory(device)
    parts = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in arrays.items())
    if report:
        log.info("cluster=simulated: %s for %d workers x %d parameters (%s: %d arrays of N x n x 4 bytes = %s each; "
                 "activations %s); %s free", _gib(need), nodes, numel, parts, sum(arrays.values()),
                 _gib(per_array), _gib(activations), _gib(free))
    if need > fraction * free:
        raise ConfigError(f"cluster=simulated with nodes={nodes} needs {_gib(need)} ({sum(arrays.values())} arrays "
                          f"of nodes x {numel} parameters x 4 bytes: {parts}; activations {_gib(activations)}) but "
                          f"{_gib(free)} of {what} is free; lower nodes or batch_size, or pick a smaller model")
    return need


# ---------------------------------------------------------------------------------------------
# The device the workers live on
# ---------------------------------------------------------------------------------------------
def resolve_device(accelerator: str) -> torch.device:
    """cpu, or the first GPU for accelerator=gpu (auto: gpu when CUDA is visible)."""
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("accelerator=gpu but no CUDA device is visible; use accelerator=cpu")
        return torch.device("cuda", 0)
    if accelerator != "cpu":
        raise ConfigError(f"accelerator={accelerator!r} is unknown to cluster=simulated; use cpu, gpu or auto")
    return torch.device("cpu")
