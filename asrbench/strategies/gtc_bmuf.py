"""GTC inside groups, BMUF across them (GTC-BMUF; Amazon, Interspeech 2019).

The N workers form N / g groups of g consecutive ranks. Inside a group every minibatch is
synchronous training with GTC-compressed gradients (Strom 2015; `asrbench.strategies.gtc`):
every member applies the same decoded mean gradient, so the group's replicas stay identical
and the group acts as one BMUF worker. Every K steps the group representatives (the first
rank of each group) run the BMUF update among themselves (Chen & Huo 2016;
`asrbench.strategies.bmuf`) and broadcast the result inside their group.

Symbols: g = ``group_size`` (workers per GTC group), G = N / g groups (the BMUF workers; the
default block momentum is η = 1 - 1/G), τ = ``tau`` (GTC threshold), K = ``block_size``,
ζ = ``block_lr``. A group of one communicates no gradient, so with g = 1 no GTC hook runs and
GTC-BMUF is BMUF; with g = N it is GTC plus a filter over one worker (η = 0, ζ = 1 is GTC).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import StrategyRegistry
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

from asrbench.knobs import Knob
from asrbench.errors import ConfigError
from asrbench.strategies.accounting import CommStats
from asrbench.strategies.bmuf import BMUF_KNOBS, BMUF_STATS_KEYS, BMUFAverager, BMUFConfig, BMUFLightning, bmuf_schedule, simulate_bmuf
from asrbench.strategies.contract import Collective, Simulation, StrategySpec
from asrbench.strategies.gtc import (GTC_KNOBS, GTC_SIZE_KEYS, GTC_STATS_KEYS, GTCStrategy, gtc_cost_stats, gtc_schedule,
                                     gtc_stacked_arrays, read_gtc_stats, simulate_gtc)

log = logging.getLogger(__name__)


def number_of_groups(world_size: int, group_size: int) -> int:
    """G = N / g, or a ConfigError when the workers do not split into whole groups."""
    if group_size < 1:
        raise ConfigError(f"strategy.group_size must be a positive value (workers per GTC group), got {group_size}")
    if world_size % group_size:
        raise ConfigError(f"nodes={world_size} is not a multiple of strategy.group_size={group_size}; "
                          f"pick a group_size that divides nodes")
    return world_size // group_size


class GroupBMUFAverager(BMUFAverager):
    """BMUF among group representatives, the result broadcast inside each group.

    `intra_group` is this rank's group (g consecutive ranks), `representatives` the group of the
    first rank of every group. Every rank runs the same filter on the same broadcast mean, so
    the replicated state is the same on all N ranks.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[Mapping[str, Any]],
                 config: BMUFConfig | None = None, *, group_size: int, intra_group: dist.ProcessGroup,
                 representatives: dist.ProcessGroup, comm_stats: CommStats | None = None, **knobs: Any) -> None:
        self.group_size = group_size
        self.num_groups = number_of_groups(dist.get_world_size(), group_size)
        self.intra_group = intra_group
        self.is_representative = dist.get_rank() % group_size == 0
        super().__init__(params, config, process_group=representatives, comm_stats=comm_stats, **knobs)

    def _num_workers(self) -> int:
        return self.num_groups

    def _broadcast_start(self, flat: torch.Tensor) -> None:
        dist.broadcast(flat, src=0)

    def _mean_over_workers(self, flat: torch.Tensor) -> torch.Tensor:
        """W̄ over the G representatives' models, then broadcast to the rest of each group."""
        if self.is_representative:
            flat = super()._mean_over_workers(flat)
        if self.group_size > 1:
            dist.broadcast(flat, group=self.intra_group, group_src=0)
            if self.comm_stats is not None:
                self.comm_stats.record_broadcast(flat, src=0, rank=dist.get_rank(self.intra_group),
                                                 world_size=self.group_size)
        return flat


def merge_comm_stats(gtc: CommStats, bmuf: CommStats) -> CommStats:
    """GTC's in-group exchange plus BMUF's collectives, one step per optimizer step.

    The dense equivalent is BMUF's record (sync SGD over all N workers); GTC's own is over its
    group only and is dropped. Element counts (density) are GTC's.
    """
    g, b = gtc.state_dict(), bmuf.state_dict()
    dense = ("dense_bytes", "dense_payload_bytes")

    def add(x: Mapping[str, float], y: Mapping[str, float]) -> dict[str, float]:
        out = {k: x.get(k, 0.0) + y.get(k, 0.0) for k in {*x, *y}}
        return out | {k: y.get(k, 0.0) for k in dense if k in y}

    merged = CommStats(bmuf.world_size, bmuf.rank)
    merged.load_state_dict({"steps": b["steps"], "sums": add(g["sums"], b["sums"]),
                            "last": add(g["last"], b["last"]), "by_kind": add(g["by_kind"], b["by_kind"])})
    return merged


class GTCBMUFStrategy(BMUFLightning, GTCStrategy):
    """GTC-BMUF (`strategy=gtc_bmuf`, registered `asrbench_gtc_bmuf`).

    Keywords: ``group_size`` (g, workers per GTC group), GTCStrategy's (``tau``, ``max_density``,
    ``pass_through``, ``bucket_cap_mb``, ...) and `BMUFConfig`'s fields; the rest go to Lightning's
    DDPStrategy. DDP runs over the group (``process_group`` = this rank's subgroup, built once
    the default group exists). Checkpoints hold GTC's per-rank residuals and BMUF's state.
    """

    registry_name = "asrbench_gtc_bmuf"

    def __init__(self, *, group_size: int = 2, **kwargs: Any) -> None:
        if group_size < 1:
            raise ValueError(f"Arg `group_size` must be a positive value (workers per GTC group), got {group_size}")
        self.group_size = int(group_size)
        self._bmuf_stats = CommStats(world_size=1)  # replaced once the world size is known
        self.intra_group: dist.ProcessGroup | None = None
        self.representatives: dist.ProcessGroup | None = None
        super().__init__(**kwargs)

    def setup_distributed(self) -> None:
        super().setup_distributed()
        number_of_groups(self.world_size, self.group_size)
        # Every rank creates every group, in the same order.
        self.intra_group, _ = dist.new_subgroups(self.group_size)
        self.representatives = dist.new_group(list(range(0, self.world_size, self.group_size)))
        self._ddp_kwargs["process_group"] = self.intra_group
        self.gtc_state.process_group = self.intra_group
        self._bmuf_stats = CommStats(self.world_size, self.global_rank)

    def _register_ddp_hooks(self) -> None:
        if self.group_size > 1:
            super()._register_ddp_hooks()
            return
        if self.is_global_zero:
            log.info("GTC-BMUF with group_size=1: a group of one sends no gradients, so no GTC hook runs (BMUF)")
        self.register_comm_hook(noop_hook)

    def bmuf_workers(self, nodes: int) -> int:
        """N, the models BMUF averages in a run of `nodes` workers: one per group."""
        return nodes // self.group_size

    def _make_averager(self, params: list[torch.Tensor]) -> BMUFAverager:
        assert self.intra_group is not None and self.representatives is not None
        return GroupBMUFAverager(params, self.bmuf_config, group_size=self.group_size, intra_group=self.intra_group,
                                 representatives=self.representatives, comm_stats=self._bmuf_stats)

    @property
    def bmuf_comm_stats(self) -> CommStats:
        return self._bmuf_stats

    @property
    def comm_stats(self) -> CommStats:
        """A merged view (`merge_comm_stats`) for comm_metrics/comm_summary; record into the parts."""
        return merge_comm_stats(self.gtc_state.comm_stats, self._bmuf_stats)


def _register() -> None:
    GTCBMUFStrategy.register_strategies(StrategyRegistry)


_register()


class GTCBMUFSpec(StrategySpec):
    name = "gtc_bmuf"
    summary = "GTC inside groups, BMUF across group representatives (2019)"
    order = 4
    strategy_class = GTCBMUFStrategy
    stats_keys = (*GTC_STATS_KEYS, *BMUF_STATS_KEYS, "group_size")
    size_keys = (*GTC_SIZE_KEYS, "model_bytes")
    compresses = True
    knobs = {**GTC_KNOBS, **BMUF_KNOBS, "group_size": Knob(int, 1)}

    def exchange_group(self, cfg: Mapping[str, Any], nodes: int) -> int:
        return int(cfg.get("group_size") or 1)

    def check(self, cfg: Mapping[str, Any], nodes: int) -> None:
        number_of_groups(nodes, int(cfg.get("group_size") or 1))

    def stacked_arrays(self, cfg: Mapping[str, Any], nodes: int) -> dict[str, int]:
        return gtc_stacked_arrays(cfg) if int(cfg.get("group_size") or 1) > 1 else {}

    def simulate(self, strategy: Any, ctx: Any) -> Simulation:
        g = strategy.group_size
        exchange = simulate_gtc(strategy, ctx, g)
        extra = None if exchange is not None else (lambda: gtc_cost_stats(None, ctx.numel, ctx.device))
        return Simulation(exchange=exchange, averager=simulate_bmuf(strategy, ctx, g), group_size=g, extra_stats=extra)

    def read_stats(self, stats: Mapping[str, Any], n: int) -> dict[str, float]:
        return read_gtc_stats(self.name, stats, n, self.stats_keys)

    def schedule(self, stats: Mapping[str, float], n: int) -> list[Collective]:
        """GTC among the g workers of each group every step; BMUF among the n / g representatives,
        broadcast within each group, once per block."""
        g = int(stats["group_size"])
        return [*gtc_schedule(stats, g), *bmuf_schedule(stats, n, g)]

    def waiting(self, stats: Mapping[str, Any], n: int) -> tuple[int, int]:
        return int(stats["group_size"]), int(stats["block_size"])


SPECS = [GTCBMUFSpec()]
