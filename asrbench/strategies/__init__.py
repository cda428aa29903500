"""Training strategies by config name; each is a Lightning Strategy registered as `asrbench_<name>`.

| name      | what it is                                                    | module   |
|-----------|---------------------------------------------------------------|----------|
| single    | one worker, no communication (the baseline)                   | -        |
| sync      | synchronous SGD: Lightning's DDPStrategy, dense all-reduce    | sync     |
| gtc       | gradient threshold compression (Strom 2015) as a DDP hook     | gtc      |
| bmuf      | blockwise model-update filtering (Chen & Huo 2016)            | bmuf     |
| diloco    | bmuf preset with DiLoCo's outer Nesterov SGD                  | bmuf     |
| gtc_bmuf  | GTC inside groups, BMUF across group representatives (2019)   | gtc_bmuf |
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from asrbench.errors import ConfigError

MODULES = {"sync": "sync", "gtc": "gtc", "bmuf": "bmuf", "diloco": "bmuf", "gtc_bmuf": "gtc_bmuf"}
NAMES = ("single", *MODULES)
# Keys of conf/strategy/*.yaml read by the harness itself rather than passed to the strategy.
HARNESS_KEYS = frozenset({"name", "registry_name", "inner_optimizer"})


def strategy_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in HARNESS_KEYS}


def exchange_group(name: str, nodes: int, group_size: int = 1) -> int:
    """Workers whose gradients one exchange combines: N for sync and GTC, the group size g for
    GTC-BMUF, 1 for BMUF and its presets (whose workers step alone) and a single worker."""
    return {"sync": nodes, "gtc": nodes, "gtc_bmuf": group_size}.get(name, 1)


def build_strategy(cfg: Mapping[str, Any], *, nodes: int, timeout_s: float) -> Any:
    """The Lightning Strategy for `strategy=<name>`, or the string Lightning takes for one worker."""
    name = cfg["name"]
    if name not in NAMES:
        raise ConfigError(f"strategy={name!r} is unknown; use one of {', '.join(NAMES)}")
    if name == "single":
        if nodes != 1:
            raise ConfigError(f"strategy=single runs one worker but nodes={nodes}; set nodes=1 "
                              f"or pick strategy=sync|gtc|bmuf|gtc_bmuf")
        return "auto"
    if nodes < 2:
        raise ConfigError(f"strategy={name} needs nodes >= 2 (got nodes={nodes}); "
                          f"use strategy=single for one worker")
    importlib.import_module(f"asrbench.strategies.{MODULES[name]}")  # registers the strategy
    from lightning.pytorch.strategies import StrategyRegistry  # heavy: only when a strategy is built

    registry_name = cfg.get("registry_name") or f"asrbench_{name}"
    kwargs = strategy_kwargs(cfg)
    kwargs["timeout"] = timedelta(seconds=timeout_s)
    if name == "gtc_bmuf":
        from asrbench.strategies.gtc_bmuf import number_of_groups  # gtc_bmuf imports this package

        number_of_groups(nodes, int(kwargs.get("group_size", 1)))  # fails before any process starts
    entry = StrategyRegistry[registry_name]
    try:
        return entry["strategy"](**entry["init_params"], **kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"strategy={name}: {err}") from None
