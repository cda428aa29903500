"""The strategy registry: every strategy module found, looked up by name and by class, unknown ones
refused, and no module outside asrbench/strategies/ spelling a strategy's name."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from asrbench import strategies
from asrbench.errors import ConfigError
from asrbench.strategies.contract import StrategySpec

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "asrbench"


def test_every_strategy_module_is_registered_with_a_yaml():
    names = strategies.names()
    assert names[0] == strategies.BASELINE
    assert set(names) == {p.stem for p in (ROOT / "conf" / "strategy").glob("*.yaml")}
    for name, entry in strategies.registry().items():
        assert isinstance(entry, StrategySpec) and entry.name == name and entry.summary


def test_an_unknown_name_or_class_is_an_error_not_dense_sync():
    with pytest.raises(ConfigError, match="strategy='nope' is unknown; use one of single, sync"):
        strategies.spec("nope")
    from asrbench.strategies.sync import SyncStrategy

    class MySync(SyncStrategy):  # a subclass is not silently simulated and priced as its parent
        pass

    assert strategies.spec_of(SyncStrategy()).name == "sync"
    with pytest.raises(ConfigError, match="MySync is not a registered strategy"):
        strategies.spec_of(MySync())


def _string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_module_outside_the_strategies_package_spells_a_strategy_name():
    names = set(strategies.names())
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(PACKAGE / "strategies"):
            continue
        found += [f"{path.relative_to(ROOT)}:{line}: {value!r}" for line, value in _string_constants(path)
                  if value in names]
    assert found == [], "strategy names outside asrbench/strategies/ (ask the registry):\n" + "\n".join(found)
