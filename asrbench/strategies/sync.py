"""Synchronous SGD: Lightning's DDPStrategy as it is, plus byte accounting.

DDP all-reduces every trainable parameter's gradient once per optimizer step (in ~25 MB buckets,
overlapped with the backward pass), so the bytes follow from the parameter count P and the
gradient's element size s: a ring all-reduce of b = P s bytes, i.e. 2 (N-1)/N b sent and received
per worker per step (see :mod:`asrbench.strategies.accounting`). Module buffers, which DDP
broadcasts at each forward when the model has any (an LSTM has none), are not counted.
On the simulated cluster the all-reduce is the mean over the worker rows (:class:`DenseMean`).
"""
from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Callable

import torch
from lightning.pytorch.strategies import StrategyRegistry
from torch import Tensor
from torch.optim import Optimizer

from asrbench.knobs import Knob
from asrbench.strategies.accounting import CommStats
from asrbench.strategies.base import AccountedDDPStrategy
from asrbench.strategies.contract import FP32_BYTES, Collective, SimContext, Simulation, StrategySpec


class SyncStrategy(AccountedDDPStrategy):
    """Synchronous SGD: Lightning's DDPStrategy (dense all-reduce of every gradient each step)."""

    registry_name = "asrbench_sync"

    def __init__(self, bucket_cap_mb: float = 25.0, gradient_as_bucket_view: bool = False,
                 timeout: timedelta | float | None = None, **kwargs: Any) -> None:
        """``bucket_cap_mb`` and ``gradient_as_bucket_view`` are DDP's (its defaults); the rest go to DDPStrategy."""
        super().__init__(timeout=timeout, bucket_cap_mb=bucket_cap_mb,
                         gradient_as_bucket_view=gradient_as_bucket_view, **kwargs)

    def configure_ddp(self) -> None:
        super().configure_ddp()
        self._grad_numel = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self._grad_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        stats = self.comm_stats
        stats.record_all_reduce(self._grad_bytes)
        stats.record_dense(self._grad_bytes)
        stats.record_elements(self._grad_numel, self._grad_numel)
        stats.step()
        return out




SyncStrategy.register_strategies(StrategyRegistry)  # Trainer(strategy="asrbench_sync")


class DenseMean:
    """Sync SGD's all-reduce over worker rows: every worker gets the mean of all N gradients.

    `stats` is worker 0's, filled as :class:`SyncStrategy` fills it: one ring all-reduce of the
    n fp32 gradient elements per step.
    """

    encode_s = 0.0

    def __init__(self, stats: CommStats, nodes: int, numel: int) -> None:
        self.stats, self.nodes, self.numel, self.group_size = stats, nodes, numel, nodes
        stats.world_size, stats.rank = nodes, 0

    @torch.no_grad()
    def exchange(self, grads: Tensor, step: int) -> None:
        grads.copy_(grads.mean(0, keepdim=True).expand_as(grads))
        nbytes = self.numel * FP32_BYTES
        self.stats.record_all_reduce(nbytes)
        self.stats.record_dense(nbytes)
        self.stats.record_elements(self.numel, self.numel)
        self.stats.step()

    def cost_stats(self) -> dict[str, float]:
        return {}


class SyncSpec(StrategySpec):
    name = "sync"
    summary = "synchronous SGD: Lightning's DDPStrategy, dense all-reduce"
    order = 1
    strategy_class = SyncStrategy
    stats_keys = ("dense_bytes_per_worker_per_step",)
    size_keys = stats_keys
    knobs = {"bucket_cap_mb": Knob(float, 0, low_open=True), "gradient_as_bucket_view": Knob(bool)}

    def simulate(self, strategy: Any, ctx: SimContext) -> Simulation:
        return Simulation(exchange=DenseMean(strategy.comm_stats, ctx.nodes, ctx.numel), group_size=ctx.nodes)

    def schedule(self, stats: Mapping[str, float], n: int) -> list[Collective]:
        """A ring all-reduce of the dense gradient among all n workers, every step."""
        return [Collective("allreduce", "all_reduce", n, nbytes=stats["dense_bytes_per_worker_per_step"])]


SPECS = [SyncSpec()]
