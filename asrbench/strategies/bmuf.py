"""Blockwise model-update filtering (BMUF; Chen & Huo, ICASSP 2016) and DiLoCo as its preset.

Each of N workers trains its own replica for a block of K optimizer steps with no gradient
communication; then the workers' models are averaged (one all-reduce of the flat parameters)
and the change of the block is filtered with block momentum before the next block starts.

Symbols (Chen & Huo 2016, Sec. 2; the config key in brackets)

    ======  ==========================  ================================================
    K       ``block_size``              optimizer steps per block (per worker)
    N                                   workers averaged per block
    eta     ``block_momentum`` (η)      block momentum, 0 <= η < 1 (default 1 - 1/N)
    zeta    ``block_lr`` (ζ)            block learning rate, ζ > 0 (default 1)
    W_i(t)                              worker i's model at the end of block t
    W̄(t)                               mean_i W_i(t), the one all-reduce per block
    S(t)                                block start: the model every worker starts block t+1 from
    G(t)                                block gradient W̄(t) - S(t-1)
    Δ(t)    ``delta``                   filtered update (the paper's Δ)
    W_g(t)  ``global_model``            global model
    ======  ==========================  ================================================

Both forms filter alike, Δ(t) = η Δ(t-1) + ζ G(t), and differ only in the point Δ(t) is
added to:

    nesterov_form: paper                        nesterov_form: cntk
    (Chen & Huo 2016, Sec. 2)                   (CNTK BlockMomentumSGD, fairseq FairseqBMUF)
    keeps W_g beside the block start            keeps only the block start
    W_g(t) = W_g(t-1) + Δ(t)                    W_g(t) = S(t-1) + Δ(t)
    S(t)   = W_g(t) + η Δ(t)     (NBM)          S(t)   = W_g(t) + η Δ(t)     (NBM)
    S(t)   = W_g(t)              (CBM)          S(t)   = W_g(t)              (CBM)

(In the cntk form W_g(t) is the start without its look-ahead, the model CNTK restores at the
end of an epoch.)

With classical block momentum (CBM) S(t-1) = W_g(t-1) and the forms coincide. With NBM the
paper's form equals an outer ``torch.optim.SGD(lr=ζ, momentum=η, nesterov=True)`` stepped on
the pseudo-gradient S(t-1) - W̄(t), which is DiLoCo's outer optimizer (Douillard et al. 2023,
Alg. 1); the CNTK form adds Δ(t) to the previous start, look-ahead included. CNTK all-reduces
the sum Σ_i (S - W_i) and filters it with gain (1 - η)·block_lr; on the mean that is
ζ = N (1 - η)·block_lr, i.e. ζ = block_lr when η = 1 - 1/N (`block_lr_from_cntk`).

CNTK gives K in samples over all workers (``globalModelAggregationBlockSize``, here
``block_size_samples``) and η as a time constant in samples
(``blockMomentumAsTimeConstant``, here ``block_momentum_time_constant``):
η = exp(-block_size_samples / time_constant).

The core (configuration, filters, :class:`BMUFAverager`) is :mod:`asrbench.strategies.bmuf_averager`;
this module wires it into Lightning (:class:`BMUFStrategy`), the simulated cluster and the cost
model. Every name stays importable from here.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch import Tensor
from torch.optim import Optimizer

from asrbench.knobs import Knob
from asrbench.errors import CheckpointError
from asrbench.strategies.accounting import CommStats
from asrbench.strategies.base import AccountedDDPStrategy, refuse_hook_keywords
from asrbench.strategies.contract import Collective, Simulation, StrategySpec
# The core lives in its own module; every name stays importable from here.
from asrbench.strategies.bmuf_averager import (NESTEROV_FORMS, STATE_DTYPE, BlockMomentumFilter,  # noqa: F401
                                               BMUFAverager, BMUFConfig, OuterOptimizerFilter, _optimizer_classes,
                                               _optimizer_state_tensors, _tensors, block_lr_from_cntk, flatten,
                                               momentum_from_time_constant, steps_per_block, unflatten_into)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Lightning edge
# ---------------------------------------------------------------------------------------------

CHECKPOINT_KEY = "asrbench_bmuf"  # checkpoint entry: replicated BMUF state + every rank's local model


class BMUFLightning:
    """BMUF wired into a Lightning DDP strategy: mixed in before the strategy class.

    After every optimizer step `BMUFAverager.average_parameters` runs (where DDPStrategy runs
    its post-local-SGD averager); at the end of fit the partial block is closed and W_g is
    written into the model. Checkpoints carry the averager's replicated state (rank 0's copy,
    checked equal on every rank first) and every rank's local parameters and optimizer state
    (gathered to rank 0, which writes the file), so a run stopped mid-block resumes exactly.
    """

    bmuf_config: BMUFConfig
    averager: BMUFAverager | None

    def __init__(self, *, block_size: int | None = None, block_size_samples: int | None = None,
                 batch_size: int | None = None, block_momentum: float | None = None,
                 block_momentum_time_constant: float | None = None, block_lr: float = 1.0,
                 nesterov: bool = True, nesterov_form: str = "paper", outer_optimizer: str = "filter",
                 outer_optimizer_kwargs: Mapping[str, Any] | None = None, reset_momentum: bool = False,
                 warmup_steps: int = 0, average_sync: bool = False, **kwargs: Any) -> None:
        self.bmuf_config = BMUFConfig(
            block_size=block_size, block_size_samples=block_size_samples, batch_size=batch_size,
            block_momentum=block_momentum, block_momentum_time_constant=block_momentum_time_constant,
            block_lr=block_lr, nesterov=nesterov, nesterov_form=nesterov_form, outer_optimizer=outer_optimizer,
            outer_optimizer_kwargs=dict(outer_optimizer_kwargs or {}), reset_momentum=reset_momentum,
            warmup_steps=warmup_steps, average_sync=average_sync)
        super().__init__(**kwargs)
        self.averager = None
        self._params: list[torch.Tensor] = []

    def block_steps(self, nodes: int) -> int:
        """K in optimizer steps for a run of `nodes` workers, known before any process starts (a run
        checks that its data yields one block)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the averager resolves K again and warns then
            return self.bmuf_config.resolve(self.bmuf_workers(nodes))[0]

    # Hooks for the hierarchical variant.
    def bmuf_workers(self, nodes: int) -> int:
        """N, the models BMUF averages in a run of `nodes` workers: every worker's."""
        return nodes

    def _make_averager(self, params: list[torch.Tensor]) -> BMUFAverager:
        return BMUFAverager(params, self.bmuf_config, comm_stats=self.bmuf_comm_stats)

    @property
    def bmuf_comm_stats(self) -> CommStats:
        """Where the averager's collectives are counted."""
        return self.comm_stats

    def _close_step(self) -> None:
        """Close the step's byte count (the averager recorded its collectives as it ran them)."""
        stats = self.bmuf_comm_stats
        stats.record_dense(sum(p.numel() * p.element_size() for p in self._params))  # sync SGD's all-reduce
        stats.step()

    # Lightning hooks.
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if len(self.optimizers) != 1:
            raise ValueError(f"BMUF averages after one local optimizer's step; the module configures "
                             f"{len(self.optimizers)} optimizers")
        assert self.lightning_module is not None
        self._params = [p for p in self.lightning_module.parameters() if p.requires_grad]
        self.averager = self._make_averager(self._params)
        if self.is_global_zero:
            log.info("BMUF: K = %d steps, eta = %.4f, zeta = %g, %s (%s form), N = %d", self.averager.block_size,
                     self.averager.block_momentum, self.averager.block_lr,
                     "NBM" if self.bmuf_config.nesterov else "CBM", self.bmuf_config.nesterov_form,
                     self.averager.num_workers)

    def _local_optimizer(self) -> Optimizer:
        opt = self.optimizers[0]
        return opt._optimizer if isinstance(opt, LightningOptimizer) else opt

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any],
                       model: pl.LightningModule | torch.nn.Module | None = None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.averager is not None:
            self.averager.average_parameters(self._params, self._local_optimizer())
            self._close_step()
        return out

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.averager is not None:
            self.averager.finalize(self._params)

    def comm_summary(self) -> dict[str, float]:
        """Per-step byte means (CommStats.per_step keys) plus the schedule that ran, prefixed `bmuf_`."""
        out = super().comm_summary()
        if self.averager is not None:
            out |= {"bmuf_block_size": float(self.averager.block_size),
                    "bmuf_block_momentum": self.averager.block_momentum, "bmuf_block_lr": self.averager.block_lr,
                    "bmuf_blocks": float(self.averager.filter.num_blocks)}
        return out

    # Checkpoints.
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Called on every rank: gathers the rank-local state to rank 0, which writes the file."""
        if self.averager is not None:
            entry = self._gather_bmuf_state()
            if self.is_global_zero:
                checkpoint = {**checkpoint, CHECKPOINT_KEY: entry}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def _gather_bmuf_state(self) -> dict[str, Any]:
        assert self.averager is not None
        replicated = self.averager.state_dict()
        _assert_replicas_agree(replicated)
        local = {"params": [p.detach().cpu().clone() for p in self._params],
                 "optimizer": self._local_optimizer().state_dict(),
                 "comm_stats": self.bmuf_comm_stats.state_dict()}
        gathered: list[Any] | None = [None] * self.world_size if self.is_global_zero else None
        dist.gather_object(local, gathered, dst=0)
        return {"world_size": self.world_size, "replicated": replicated, "ranks": gathered}

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        super().load_optimizer_state_dict(checkpoint)
        if self.averager is None:
            return
        entry = checkpoint.get(CHECKPOINT_KEY)
        if entry is None:
            raise CheckpointError(f"the checkpoint has no `{CHECKPOINT_KEY}` entry (written by another strategy?); "
                                  "resume it with that strategy or start afresh")
        if entry["world_size"] != self.world_size:
            raise CheckpointError(f"the checkpoint holds BMUF state of {entry['world_size']} workers but this run "
                                  f"has {self.world_size}; resume with nodes={entry['world_size']}")
        self.averager.load_state_dict(entry["replicated"])
        mine = entry["ranks"][self.global_rank]
        with torch.no_grad():
            torch._foreach_copy_(self._params, [t.to(self.root_device) for t in mine["params"]])
        optimizer = self._local_optimizer()
        optimizer.load_state_dict(mine["optimizer"])
        _optimizer_to_device(optimizer, self.root_device)
        self.bmuf_comm_stats.load_state_dict(mine["comm_stats"])


def _assert_replicas_agree(state: Mapping[str, Any]) -> None:
    """Internal invariant: every rank holds the same replicated state (elementwise max == min)."""
    tensors = [t for t in state["filter"].values() if torch.is_tensor(t) and t.is_floating_point()]
    flat = torch.cat([t.reshape(-1) for t in tensors] + [tensors[0].new_tensor([float(state["step"])])])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    assert torch.equal(hi, lo), "BMUF replicas diverged: the replicated state differs between ranks"


class BMUFStrategy(BMUFLightning, AccountedDDPStrategy):
    """DDP without gradient communication plus BMUF (`strategy=bmuf`, registered `asrbench_bmuf`).

    Keywords: `BMUFConfig`'s fields; others go to Lightning's DDPStrategy (`timeout` in seconds
    or a timedelta, `start_method`, ...). Gradients stay local: DDP runs PyTorch's debugging
    `noop_hook`, registered on CPU as well (Lightning's DDPStrategy registers comm hooks only on
    CUDA). Keeping the DDP wrapper rather than dropping it keeps the model set-up (start
    broadcast, forward redirection, unused-parameter handling) the same as for the sync and GTC
    strategies, so runs differ only in what crosses the wire. Buffers are synced at the start
    only (`forward_sync_buffers=False`, torch's successor of `broadcast_buffers=False`): after
    that they are part of each worker's local model.
    """

    registry_name = "asrbench_bmuf"

    def __init__(self, **kwargs: Any) -> None:
        refuse_hook_keywords(kwargs, "strategy=bmuf communicates no gradients")
        super().__init__(forward_sync_buffers=False, **kwargs)

    def _register_ddp_hooks(self) -> None:
        self.register_comm_hook(noop_hook)


def _register() -> None:
    BMUFStrategy.register_strategies(StrategyRegistry)


_register()


# ---------------------------------------------------------------------------------------------
# On the simulated cluster, and in the cost model
# ---------------------------------------------------------------------------------------------
FP32_BYTES = STATE_DTYPE.itemsize


class _NoProcessGroup:
    """Stands for the process group of an averager whose workers are rows of one tensor."""


class SimulatedBMUFAverager(BMUFAverager):
    """:class:`BMUFAverager` over the rows of P: its schedule, filter and optimizer-state sync, unchanged.

    The workers it averages are the group representatives, rows 0, g, 2g, ... of `stacked`
    (every row of a group is equal). Call :meth:`average_parameters` with ``[stacked[0]]`` (it
    writes the next block start into row 0) and then copy row 0 into every row, as the
    broadcast inside each group does; :meth:`broadcast_row0` does that copy.
    `comm_stats` receives worker 0's collectives, as :class:`GroupBMUFAverager` records them.
    """

    def __init__(self, stacked: Tensor, config: BMUFConfig, *, group_size: int = 1,
                 comm_stats: CommStats | None = None) -> None:
        nodes, numel = stacked.shape
        assert nodes % group_size == 0
        self.stacked, self.group_size, self.num_groups = stacked, group_size, nodes // group_size
        super().__init__([stacked[0]], config, process_group=_NoProcessGroup(),  # type: ignore[arg-type]
                         comm_stats=comm_stats)
        assert self.numel == numel

    def _num_workers(self) -> int:
        return self.num_groups

    def _broadcast_start(self, flat: Tensor) -> None:
        assert torch.equal(self.stacked, flat.expand_as(self.stacked)), "workers must start from one model"

    def _mean_over_workers(self, flat: Tensor) -> Tensor:
        """W̄ over the representatives' rows; or, for ``average_sync``, the mean of their optimizer state.

        `flat` is ``flatten`` of what the averager hands over: row 0 (n elements: parameters) or
        the optimizer's state tensors of the N rows, row by row (N x T x n elements), written back.
        """
        nodes, g = self.stacked.shape[0], self.group_size
        if flat.numel() == self.stacked.shape[1]:
            torch.mean(self.stacked[::g], 0, out=flat)
            nbytes = flat.numel() * FP32_BYTES
        else:
            per_worker = flat.view(nodes, -1, self.stacked.shape[1])
            per_worker.copy_(per_worker[::g].mean(0, keepdim=True).expand_as(per_worker))
            nbytes = flat.numel() // nodes * FP32_BYTES
        if self.comm_stats is not None:
            self.comm_stats.record_all_reduce(nbytes, self.num_groups)
            if g > 1:
                self.comm_stats.record_broadcast(nbytes, src=0, rank=0, world_size=g)
        return flat

    @torch.no_grad()
    def broadcast_row0(self) -> None:
        self.stacked[1:].copy_(self.stacked[0].expand(self.stacked.shape[0] - 1, -1))

    # -- what the simulated cluster calls (contract.SimulatedAverager) --------------------------
    @torch.no_grad()
    def after_step(self, optimizer: Optimizer) -> bool:
        """After the optimizer step of every row: count it, and at a block end filter the mean of the
        representatives and write the next start into every row. True when it synced."""
        synced = self.average_parameters([self.stacked[0]], optimizer)
        if synced:
            self.broadcast_row0()
        if self.comm_stats is not None:
            self.comm_stats.record_dense(self.numel * FP32_BYTES)  # BMUFLightning._close_step
            self.comm_stats.step()
        return synced

    @torch.no_grad()
    def finalize(self) -> None:  # type: ignore[override]
        """End of training: close a partial block and write W_g into every row."""
        super().finalize([self.stacked[0]])
        self.broadcast_row0()

    def cost_stats(self, optimizer: Optimizer) -> dict[str, float]:
        """Bytes all-reduced at a block end (parameters, plus the optimizer state with average_sync), K, g."""
        nodes = self.stacked.shape[0]
        state = sum(v.numel() for per_row in optimizer.state.values() for k, v in per_row.items()
                    if k != "step" and torch.is_tensor(v) and v.is_floating_point()) // nodes
        synced_state = state if self.config.average_sync else 0
        return {"model_bytes": float((self.numel + synced_state) * FP32_BYTES),
                "block_size": float(self.block_size), "group_size": float(self.group_size)}



BMUF_STATS_KEYS = ("model_bytes", "block_size")
BMUF_KNOBS = {
    "block_size": Knob(int, 1, nullable=True),
    "block_size_samples": Knob(int, 1, nullable=True),
    "block_momentum": Knob(float, 0, 1, high_open=True, nullable=True),
    "block_momentum_time_constant": Knob(float, 0, low_open=True, nullable=True),
    "block_lr": Knob(float, 0, low_open=True),
    "nesterov": Knob(bool),
    "nesterov_form": Knob(str, choices=("paper", "cntk")),
    "outer_optimizer": Knob(str, choices=("filter", *sorted(_optimizer_classes()))),
    "reset_momentum": Knob(bool),
    "warmup_steps": Knob(int, 0),
    "average_sync": Knob(bool),
}


def simulate_bmuf(strategy: Any, ctx: Any, group_size: int) -> SimulatedBMUFAverager:
    """BMUF over the representatives of groups of `group_size` rows, filling the strategy's BMUF stats."""
    stats = strategy.bmuf_comm_stats
    stats.world_size, stats.rank = ctx.nodes, 0
    averager = SimulatedBMUFAverager(ctx.P, strategy.bmuf_config, group_size=group_size, comm_stats=stats)
    strategy.averager = averager  # BMUFLightning.comm_summary reads the schedule from it
    log.info("BMUF: K = %d steps, eta = %.4f, zeta = %g over %d workers", averager.block_size,
             averager.block_momentum, averager.block_lr, averager.num_workers)
    return averager


def bmuf_schedule(s: Mapping[str, float], n: int, group_size: int = 1) -> list[Collective]:
    """Once per block of K steps: a ring all-reduce of the model among the n / g group
    representatives (every worker for plain BMUF) and, in groups, the pipelined broadcast of the
    result within each group."""
    K = s["block_size"]
    out = [Collective("block_allreduce", "all_reduce", n // group_size, nbytes=s["model_bytes"], stride=group_size,
                      every=K)]
    if group_size > 1:
        out.append(Collective("block_broadcast", "broadcast", group_size, nbytes=s["model_bytes"], every=K))
    return out


class BMUFSpec(StrategySpec):
    name = "bmuf"
    summary = "blockwise model-update filtering (Chen & Huo 2016)"
    order = 3
    strategy_class = BMUFStrategy
    stats_keys = BMUF_STATS_KEYS
    size_keys = ("model_bytes",)
    knobs = BMUF_KNOBS

    def exchange_group(self, cfg: Mapping[str, Any], nodes: int) -> int:
        return 1  # workers step alone

    def simulate(self, strategy: Any, ctx: Any) -> Simulation:
        return Simulation(averager=simulate_bmuf(strategy, ctx, 1))

    def schedule(self, stats: Mapping[str, float], n: int) -> list[Collective]:
        return bmuf_schedule(stats, n)

    def waiting(self, stats: Mapping[str, Any], n: int) -> tuple[int, int]:
        return 1, int(stats["block_size"])


class DiLoCoSpec(BMUFSpec):
    """DiLoCo (Douillard et al. 2023) is BMUF's class with its own preset (conf/strategy/diloco.yaml)."""

    name = "diloco"
    summary = "bmuf preset with DiLoCo's outer Nesterov SGD"
    order = 5
    strategy_class = None  # built as asrbench_bmuf (the yaml's registry_name): simulated and priced as bmuf


SPECS = [BMUFSpec(), DiLoCoSpec()]
