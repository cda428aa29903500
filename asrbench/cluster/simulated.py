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
   row by row, each update's temporaries stay the size of one model. Where the rows of each
   group are equal (sync, gtc: no averager), it steps each group's first row and the others
   copy its parameters and state, bit for bit the same (tests/cluster/test_simulated_fast_paths.py).
5. BMUF (bmuf, gtc_bmuf): :class:`BMUFAverager` counts the step and, at a block end, filters
   the mean of the group representatives' rows and writes the next block start into every row.
6. Divergence: a non-finite loss or gradient (before step 2) or parameter (after step 5) stops
   the cluster with :class:`Diverged`, naming the step and the worker.

Batched sync (``batched_sync=True``, sync only; off by default): every row is equal before a sync
step, so steps 1-2 are one forward and backward of the model (bound to P[0] and G[0]) over the N
workers' batches concatenated, on the mean of the N workers' losses
(:meth:`AcousticModule.worker_losses`: each reduced over its own worker's utterances and frames
exactly as alone), whose gradient is the all-reduce's mean of the N gradients. Results equal the
per-worker path's up to float summation order, not bit for bit (tests/cluster/test_batched_sync.py
states the tolerance). What the per-worker path records stays: every worker's padded frames
(the straggler factor), worker 0's byte counts (the exchange of the one mean row), clipping (once,
of the mean gradient every row holds), each worker's loss and the step of a divergence (a
non-finite gradient is then the mean's: no worker's own gradient is formed). The cost model
charges compute per worker step, which the batched step does not measure: every
``timing_sample_every``-th step (the first included) also times one worker's forward and backward
alone (workers in turn, into a scratch gradient that training never reads), and
:meth:`SimulatedCluster.compute_s_per_worker_step` is the mean of those samples. Refused for every
other strategy, and for a model with dropout (each worker's own random stream cannot be replayed
in one batch). The concatenated batch holds N workers' activations at once.

A checkpoint (:meth:`SimulatedCluster.state_dict`, :func:`resume_state`) holds everything the
next step reads: P, the optimizer and its lr schedulers, every tensor and counter the
strategy's exchange and averager keep (GTC residuals; BMUF's S, W_g, Δ and step in the block;
PowerSGD's, top-k's and 1-bit SGD's error memories and PowerSGD's random state; worker 0's
byte counts), the workers' RNG states and the loop's position inside the epoch. The strategy
modules stay unaware of it (:func:`object_state` reads their objects' attributes), and a run
resumed from it continues bit for bit (tests/cluster/test_simulated_faults.py).

Where the parts live: the rows, their optimizer and clipping in :mod:`asrbench.cluster.rows`,
the strategies' objects' checkpoint state in :mod:`asrbench.cluster.state`, the training loop
and its checkpoint entry in :mod:`asrbench.cluster.loop`, the memory check and the device in
:mod:`asrbench.cluster.memory`; every public name is importable from this module.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from asrbench import strategies
from asrbench.cluster import cost
from asrbench.cluster.loop import (CHECKPOINT_KEY, TRAINER_KEYS, TRAINER_KEYS_WITHOUT_EFFECT, FitOutcome,
                                   LoopConfig, fit, load_resume_state, parse_max_time, resume_state,
                                   worker_loaders)
from asrbench.cluster.memory import activation_bytes, available_memory, check_memory, resolve_device, stacked_arrays
from asrbench.cluster.rows import (RowBinding, build_worker_optimizer, clip_rows, row_parameters,
                                   step_schedulers)
from asrbench.cluster.state import load_object_state, object_state, rng_state, set_rng_state
from asrbench.data.dataset import IGNORE_INDEX
from asrbench.errors import CheckpointError, ConfigError
from asrbench.strategies import spec_of
from asrbench.strategies.contract import FP32_BYTES, SimContext
from asrbench.strategies.contract import synchronize as _synchronize

__all__ = [  # the cluster's public names, wherever they live
    "CHECKPOINT_KEY", "TRAINER_KEYS", "TRAINER_KEYS_WITHOUT_EFFECT", "Diverged", "FitOutcome", "LoopConfig",
    "RowBinding", "SimulatedCluster", "Timings", "activation_bytes", "available_memory", "build_worker_optimizer",
    "check_memory", "clip_rows", "fit", "load_object_state", "load_resume_state", "object_state", "parse_max_time",
    "predict", "resolve_device", "resume_state", "rng_state", "row_parameters", "set_rng_state", "stacked_arrays",
    "step_schedulers", "worker_loaders",
]


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


def _concatenated(batches: Sequence[Mapping[str, Any]], device: torch.device) -> dict[str, Any]:
    """The workers' batches as one, in worker order, padded as the collate pads (feats and targets
    with 0, frame labels with IGNORE_INDEX) to the longest of all; no valid frame reads the padding
    (a unidirectional LSTM), nor does a loss (lengths, ignored labels)."""
    out: dict[str, Any] = {}
    for key in batches[0]:
        values = [b[key] for b in batches]
        if not torch.is_tensor(values[0]):
            out[key] = [v for vs in values for v in vs]
        elif values[0].dim() == 1:
            out[key] = torch.cat(values).to(device, non_blocking=True)
        else:
            shape = [sum(v.shape[0] for v in values), *(max(v.shape[d] for v in values)
                                                        for d in range(1, values[0].dim()))]
            joined = values[0].new_full(shape, IGNORE_INDEX if key == "frame_labels" else 0)
            row = 0
            for v in values:
                joined[(slice(row, row + v.shape[0]), *(slice(0, s) for s in v.shape[1:]))] = v
                row += v.shape[0]
            out[key] = joined.to(device, non_blocking=True)
    return out


def _copy_state(source: dict[str, Any], target: dict[str, Any]) -> None:
    """One parameter's optimizer state written into another's: tensors in place where they exist."""
    for key, value in source.items():
        if torch.is_tensor(value) and torch.is_tensor(target.get(key)) and target[key].shape == value.shape:
            target[key].copy_(value)
        else:
            target[key] = value.clone() if torch.is_tensor(value) else value


@dataclass
class Timings:
    """Seconds spent in each part of the cluster's steps (all workers together)."""

    compute_s: float = 0.0  # forward + backward of every worker (batched sync: of the one batched step)
    exchange_s: float = 0.0  # the gradient exchange (sync's mean, GTC's encode/decode)
    optimizer_s: float = 0.0  # clipping + the optimizer step of the N rows
    averaging_s: float = 0.0  # BMUF's block syncs
    worker_steps: int = 0
    frames: int = 0
    # padded frames (batch x longest utterance: what the LSTM runs over) of each worker, per step
    worker_frames: list[list[int]] = field(default_factory=list)
    # batched sync: one worker's forward + backward timed alone every timing_sample_every steps
    sampled_compute_s: float = 0.0
    sampled_steps: int = 0


class SimulatedCluster:
    """N workers of one strategy as rows of P (parameters) and G (gradients), on one device.

    `module` is the run's :class:`AcousticModule` (built with ``world_size=nodes``), `strategy`
    what ``asrbench.strategies.build_strategy`` returns for the run's config: it supplies the
    strategy's settings (τ, g, the BMUF config) and the accounting the real strategy keeps, so
    :meth:`comm_summary` has the real path's keys. Call :meth:`train_step` with one batch per
    worker, then :meth:`finalize` once; the model then holds the model to evaluate.

    `batched_sync` (sync only) computes the workers' mean gradient in one forward and backward over
    their concatenated batches, timing one worker's step alone every `timing_sample_every` steps
    (module docstring: Batched sync).
    """

    def __init__(self, module: Any, strategy: Any, nodes: int, *, device: str | torch.device = "cpu",
                 gradient_clip_val: float | None = None, gradient_clip_algorithm: str = "norm",
                 batched_sync: bool = False, timing_sample_every: int = 10) -> None:
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
        self._P_views, self._G_views = self.binding.cut(self.P), self.binding.cut(self.G)
        # Rows of a group stay equal without an averager (equal start, equal exchanged gradients): the
        # optimizer steps each group's first row and the others copy it (step_representatives).
        self.step_representatives = self.averager is None and self.group_size > 1
        self.batched_sync = bool(batched_sync)
        if self.batched_sync:
            self._check_batched_sync(timing_sample_every)
            self.timing_sample_every = int(timing_sample_every)
            self._scratch = torch.zeros(n, device=self.device)  # the sampled worker step's gradient
            self._scratch_views = self.binding.views(self._scratch)
        self.binding.bind(self.P[0])

    def _check_batched_sync(self, every: int) -> None:
        """Batched sync is exact (up to float order) only where every row is equal before the step and
        the exchange is the plain mean: strategy=sync; and only without dropout (module docstring)."""
        if self.kind != strategies.MEAN_OF_EQUAL_ROWS or self.averager is not None or self.group_size != self.nodes:
            raise ConfigError(f"cluster.batched_sync=true holds only for strategy=sync (one mean gradient of equal "
                              f"rows); this run has strategy={self.kind}: set cluster.batched_sync=false")
        if self._rng is not None:
            raise ConfigError("cluster.batched_sync=true cannot replay each worker's own dropout stream in one batch; "
                              "set model.dropout=0 or cluster.batched_sync=false")
        if int(every) < 1:
            raise ConfigError(f"timing_sample_every={every} must be a positive number of steps")

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
            self.binding.bind_views(self._P_views[i], self._G_views[i])
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

    def _batched_gradients(self, batches: Sequence[Mapping[str, Any]]) -> Tensor:
        """Steps 1-2 of batched sync: the N workers' mean gradient into G[0] by one forward and backward
        of their concatenated batches; returns the N losses, each its worker's own."""
        t = self.timings
        t.worker_frames.append([int(b["feats"].shape[0] * b["feats"].shape[1]) for b in batches])
        sizes = [int(b["feats"].shape[0]) for b in batches]
        batch = _concatenated(batches, self.device)
        self.G[0].zero_()
        self.binding.bind_views(self._P_views[0], self._G_views[0])
        _synchronize(self.device)
        t0 = time.perf_counter()
        losses = self.module.worker_losses(self.module(batch["feats"], batch["feat_lens"]), batch, sizes)
        losses.mean().backward()
        _synchronize(self.device)
        t.compute_s += time.perf_counter() - t0
        t.frames += int(batch["feat_lens"].sum())
        t.worker_steps += len(batches)
        if self.steps % self.timing_sample_every == 0 or not t.sampled_steps:
            self._time_worker_step(batches[(self.steps // self.timing_sample_every) % self.nodes])
        return losses.detach()

    def _time_worker_step(self, batch: Mapping[str, Any]) -> None:
        """One worker's forward and backward alone, timed for the cost model (its gradient discarded)."""
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        self._scratch.zero_()
        self.binding.bind_views(self._P_views[0], self._scratch_views)
        _synchronize(self.device)
        t0 = time.perf_counter()
        self.module.loss(self.module(batch["feats"], batch["feat_lens"]), batch).backward()
        _synchronize(self.device)
        self.timings.sampled_compute_s += time.perf_counter() - t0
        self.timings.sampled_steps += 1
        self.binding.bind_views(self._P_views[0], self._G_views[0])

    def train_step(self, batches: Sequence[Mapping[str, Any]]) -> Tensor:
        """One optimizer step of every worker (steps 1-5 of the module docstring); returns the N losses."""
        if len(batches) != self.nodes:
            raise ValueError(f"train_step needs one batch per worker ({self.nodes}), got {len(batches)}")
        batched = self.batched_sync
        losses = self._batched_gradients(batches) if batched else self._local_gradients(batches)
        self._check_finite(losses)
        t = self.timings
        t0 = time.perf_counter()
        grads = self.G[:1] if batched else self.G  # batched: G[0] holds the mean already, its accounting follows
        if self.exchange is not None:
            self.exchange.exchange(grads, self.steps)
        _synchronize(self.device)
        t1 = time.perf_counter()
        if self.clip_val is not None:
            clip_rows(grads, self.binding, self.clip_val, 1 if batched else self.group_size, self.clip_algorithm,
                      self.clip_split)
        if batched and self.nodes > 1:
            self.G[1:].copy_(self.G[:1].expand(self.nodes - 1, self.numel))  # every row holds the exchanged gradient
        if self.step_representatives:
            self._step_representatives()
        else:
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

    @torch.no_grad()
    def _step_representatives(self) -> None:
        """Step 4 where the rows of each group of g are equal (sync, gtc): the optimizer steps the
        first row of each group alone (the others' gradients hidden from it, so it skips them), then
        every other row copies its representative's parameters and optimizer state. Adam, AdamW
        and SGD update each row from its own values alone, so this equals stepping all N rows."""
        g, n = self.group_size, self.numel
        followers = [(row, row.grad) for i, row in enumerate(self.rows) if i % g]
        for row, _ in followers:
            row.grad = None
        try:
            self.optimizer.step()
        finally:
            for row, grad in followers:
                row.grad = grad
        groups = self.P.view(-1, g, n)
        groups[:, 1:].copy_(groups[:, :1].expand(-1, g - 1, n))
        state = self.optimizer.state
        for i, row in enumerate(self.rows):
            if i % g:
                _copy_state(state[self.rows[i - i % g]], state[row])

    def _check_finite(self, losses: Tensor) -> None:
        """Step 1's losses and gradients are finite, or :class:`Diverged` names the first worker whose are not."""
        step = self.steps + 1
        bad = (~torch.isfinite(losses)).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise Diverged(step, f"the loss of worker {i} is {float(losses[i])}")
        if self.batched_sync:
            if not _finite(self.G[0]):
                raise Diverged(step, "the workers' mean gradient holds NaN or inf (batched sync forms no "
                                     "worker's own gradient)")
        elif not _finite(self.G):
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
        self.binding.bind_views(self._P_views[i])

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
        """Measured seconds of one worker's step without communication: forward + backward (batched
        sync: the mean of the sampled unbatched steps), plus its share (1/N) of the clipping and the
        optimizer step over the rows of P."""
        t = self.timings
        if not t.worker_steps:
            return 0.0
        if self.batched_sync:  # the batched step is no worker's: the sampled unbatched steps are
            return t.sampled_compute_s / t.sampled_steps + t.optimizer_s / t.worker_steps
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
