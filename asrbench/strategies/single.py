"""One worker, no communication: the baseline every other run is compared with."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from asrbench.errors import ConfigError
from asrbench.strategies.contract import SimContext, Simulation, StrategySpec


class SingleSpec(StrategySpec):
    name = "single"
    summary = "one worker, no communication (the baseline)"
    order = 0

    def exchange_group(self, cfg: Mapping[str, Any], nodes: int) -> int:
        return 1

    def build(self, cfg: Mapping[str, Any], *, nodes: int, timeout_s: float) -> Any:
        if nodes != 1:
            raise ConfigError(f"strategy=single runs one worker but nodes={nodes}; set nodes=1 or pick a "
                              f"distributed strategy (asrbench strategies lists them)")
        return "auto"  # Lightning's own single-device strategy

    def simulate(self, strategy: Any, ctx: SimContext) -> Simulation:
        return Simulation()

    def waiting(self, stats: Mapping[str, Any], n: int) -> tuple[int, int]:
        return 1, 1


SPECS = [SingleSpec()]
