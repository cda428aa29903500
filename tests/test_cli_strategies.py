"""`asrbench strategies`: the registry's table, kept per version of the sources so that listing it
does not import torch and Lightning every time."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from asrbench import cli

LIST_THEN_REPORT = ("import sys; from asrbench import cli; table = cli.strategies_table(); "
                    "print(table.count('\\n'), 'torch' in sys.modules, 'lightning' in sys.modules)")


def _run(code: str, cache: Path) -> str:
    env = {"PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(cache), "HOME": str(cache)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                          timeout=300).stdout.split()


def test_cached_table_is_the_registrys_and_lists_without_torch(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    table = cli.strategies_table()  # built here from the registry, and kept
    assert cli._table_cache().read_text(encoding="utf-8") == table == cli._build_strategies_table()
    listed = _run(LIST_THEN_REPORT, tmp_path)
    assert listed == [str(table.count("\n")), "False", "False"]  # read back without torch or Lightning


def test_every_registered_strategy_is_listed(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from asrbench import strategies

    rows = [line.split(" | ")[0].lstrip("| ") for line in cli.strategies_table().splitlines()[2:] if line.startswith("| ")]
    assert rows == list(strategies.names())


def test_an_edited_source_names_another_cache_file(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    package = tmp_path / "pkg"
    (package / "strategies").mkdir(parents=True)
    module = package / "strategies" / "new.py"
    module.write_text("SPECS = []\n")
    before = cli._table_cache(package)
    assert before.parent == tmp_path / "cache" / "asrbench"
    module.write_text("SPECS = [1]\n")
    assert cli._table_cache(package) != before
    (package / "strategies" / "fp8.py").write_text("")
    assert len({before, cli._table_cache(package)}) == 2


def test_an_unwritable_cache_still_lists(tmp_path: Path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file: the cache directory cannot be made
    assert cli.strategies_table().startswith("| strategy |")


def test_old_tables_are_pruned(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = tmp_path / "asrbench"
    cached.mkdir()
    for i in range(cli.KEPT_TABLES + 3):
        (cached / f"strategies-old{i:02d}.md").write_text("stale")
    cli.strategies_table()
    kept = sorted(p.name for p in cached.glob("strategies-*.md"))
    assert len(kept) == cli.KEPT_TABLES and cli._table_cache().name in kept
