"""Training strategies by config name: the registry every other part of asrbench asks.

Each module of this package that exports ``SPECS`` (a list of
:class:`~asrbench.strategies.contract.StrategySpec`) is a strategy; :func:`registry` finds them by
scanning the package, so a new strategy is its module, ``conf/strategy/<name>.yaml`` and its
tests, and nothing else. The simulated cluster, the cost model, reproduce, report, bench and the
command line look strategies up here (:func:`spec`, :func:`spec_of`, :func:`names`) and never
spell a strategy's name; an unknown name or Strategy class is an error, never dense sync.
``asrbench strategies`` lists what is registered.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from asrbench.errors import ConfigError
from asrbench.strategies.contract import StrategySpec, strategy_kwargs

__all__ = ["BASELINE", "MEAN_OF_EQUAL_ROWS", "StrategySpec", "build_strategy", "names", "registry", "spec", "spec_of",
           "strategy_kwargs"]

BASELINE = "single"  # the one-worker run every other is compared with (asrbench/strategies/single.py)
MEAN_OF_EQUAL_ROWS = "sync"  # the one whose exchange is the plain mean of equal rows (cluster.batched_sync)


@functools.cache
def registry() -> dict[str, StrategySpec]:
    """{name: spec} of every strategy module in this package, in table order."""
    found: dict[str, StrategySpec] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for entry in getattr(module, "SPECS", ()):
            assert entry.name not in found, f"strategy {entry.name!r} is registered twice"
            found[entry.name] = entry
    return dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))


def names() -> tuple[str, ...]:
    return tuple(registry())


def spec(name: str) -> StrategySpec:
    """The spec of `strategy=<name>`; a ConfigError naming the registered ones otherwise."""
    found = registry().get(str(name))
    if found is None:
        raise ConfigError(f"strategy={name!r} is unknown; use one of {', '.join(names())}")
    return found


def spec_of(strategy: Any) -> StrategySpec:
    """The spec of a strategy built by :func:`build_strategy` (the string of one worker, or an
    instance of exactly a registered class: a subclass of one is not silently simulated as it)."""
    if isinstance(strategy, str):
        return spec(BASELINE)
    for entry in registry().values():
        if entry.strategy_class is not None and type(strategy) is entry.strategy_class:
            return entry
    raise ConfigError(f"{type(strategy).__name__} is not a registered strategy; register its module's SPECS "
                      f"(asrbench/strategies/contract.py) or use one of {', '.join(names())}")


def build_strategy(cfg: Mapping[str, Any], *, nodes: int, timeout_s: float) -> Any:
    """The Lightning Strategy for `strategy=<name>`, or the string Lightning takes for one worker."""
    return spec(cfg["name"]).build(cfg, nodes=nodes, timeout_s=timeout_s)
