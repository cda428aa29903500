"""`asrbench <command> [hydra overrides]`: dispatch to the Hydra app of each command."""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path


# The one command registry: name -> (what it does, the function of asrbench.apps that runs it).
COMMANDS = {
    "prepare": ("generate (synth) or read (librispeech, kaldi, lhotse) the corpus and cache its features", "prepare"),
    "train": ("train one run (strategy=NAME nodes=N; `asrbench strategies` lists the names)", "train"),
    "eval": ("recompute metrics of a run: run=DIR [baseline=DIR] -> results.json, report.md", "evaluate"),
    "align": ("CTC forced alignment of a corpus with a trained run: run=DIR -> <subset>.ali", "align"),
    "bench": ("measured speed against plain-PyTorch peers: bench=quick|full -> bench.json, bench.md", "bench"),
    "calibrate": ("time this machine's collectives, fit a network preset: -> network.yaml (cluster.network=FILE)",
                  "calibrate"),
    "reproduce": ("the paper's table on the simulated cluster: reproduce=cpu|cpu_paper_n|cpu_sgd|gpu|paper|tiny "
                  "-> report.md + plots", "reproduce"),
    "report": ("one report over finished runs: runs=[DIR,...] [baseline=DIR] -> report.md + curves, trade-off",
               "report_runs"),
}
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
# Lightning restarts the script for ranks > 0 with the same arguments; the command travels in
# the environment because the first argument is removed before Hydra reads the overrides.
ENV = "ASRBENCH_COMMAND"


def strategies_table() -> str:
    """`asrbench strategies`: every registered strategy, what it is and what it accepts.

    Building the table imports every strategy module, hence torch and Lightning (~5 s on 2 cores), so
    it is kept in a cache file named by a digest of asrbench's sources (:func:`_table_cache`): a listing
    is the registry's own answer for exactly the code on disk, and any edit there rebuilds it."""
    cache = _table_cache()
    try:
        return cache.read_text(encoding="utf-8")
    except OSError:
        pass
    table = _build_strategies_table()
    try:  # a cache that cannot be written only costs the next listing its speed
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=cache.parent, delete=False) as tmp:
            tmp.write(table)
        os.replace(tmp.name, cache)
        for stale in sorted(cache.parent.glob("strategies-*.md"), key=os.path.getmtime)[:-KEPT_TABLES]:
            stale.unlink(missing_ok=True)
    except OSError:
        pass
    return table


KEPT_TABLES = 8  # cached strategies tables kept (one per version of the sources; several checkouts share the cache)


def _table_cache(package: Path | None = None) -> Path:
    """Where the strategies table of these sources is kept: $XDG_CACHE_HOME/asrbench (~/.cache/asrbench),
    named by a digest of every .py file of the package (asrbench/) and the interpreter's version."""
    digest = hashlib.sha256(sys.version.encode())
    package = package or Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "asrbench"
    return root / f"strategies-{digest.hexdigest()[:20]}.md"


def _build_strategies_table() -> str:
    from asrbench import strategies  # the registry imports each strategy module (torch, Lightning)

    lines = ["| strategy | what it is | module | knobs (strategy.KEY=...) |", "|---|---|---|---|"]
    for name, entry in strategies.registry().items():
        module = type(entry).__module__.rsplit(".", 1)[-1]
        lines.append(f"| {name} | {entry.summary} | asrbench/strategies/{module}.py | "
                     f"{', '.join(entry.knobs) or '-'} |")
    return "\n".join(lines) + "\n\nDefaults and units: conf/strategy/<name>.yaml."


def usage() -> str:
    rows = "\n".join(f"  {name:<10} {what}" for name, (what, _) in COMMANDS.items())
    rows += f"\n  {'strategies':<10} list the registered strategies, their modules and knobs"
    return (f"usage: asrbench <command> [hydra overrides] [--help | --cfg job | -m]\n\ncommands:\n{rows}\n\n"
            f"`asrbench <command> --help` lists that command's config groups and options.")


# Flags after which Hydra prints and exits without creating an output directory.
_NO_OUTPUT = ("-h", "--help", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc")
MIN_FREE_BYTES = 50 * 2**20  # less than this free where the run would write: refuse before starting


def output_root(command: str, rest: list[str]) -> str:
    """The directory a command will write to: hydra.run.dir / hydra.sweep.dir up to its first
    interpolation, else the run dir for eval/align (they write inside it), else Hydra's default
    roots (outputs/, multirun/) relative to the working directory."""
    multirun = any(a in ("-m", "--multirun") for a in rest)
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    for arg in rest:
        if arg.startswith(key):
            return arg[len(key):].split("${")[0] or "."
    if command in ("eval", "align"):
        for arg in rest:
            if arg.startswith("run=") and len(arg) > 4:
                return arg[4:]
    return "multirun" if multirun else "outputs"


def check_output_dir(target: str) -> str | None:
    """Why `target` cannot take a run's output (one line), or None when it can."""

    path = os.path.abspath(target)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return (f"output directory {path}: {existing} is a file, not a directory; remove it or write elsewhere "
                f"with hydra.run.dir=DIR")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return (f"output directory {path}: cannot write in {existing} ({err.strerror}); make it writable or "
                f"write elsewhere with hydra.run.dir=DIR")
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        return (f"output directory {path}: only {free / 2**20:.0f} MiB free on its disk; free space or write "
                f"elsewhere with hydra.run.dir=DIR")
    return None


def check_overrides(command: str, rest: list[str]) -> str | None:
    """Hydra's own refusal of an override (an unknown key, a config group option that does not exist,
    a malformed value), as one line; None when the config composes. Sweeps (-m) and flags are left to
    Hydra, which composes each job itself."""
    if any(a.startswith("-") for a in rest):
        return None
    from hydra import compose, initialize_config_dir  # Hydra only, not torch: --help stays fast
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [a for a in rest if not a.lstrip("+~").startswith("hydra.")]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose(config_name=command, overrides=overrides)  # conf/<command>.yaml
    except (HydraException, OmegaConfBaseException) as err:
        text = str(err)
        if "Could not find" in text and "Available options" in text:  # a config group option that does not exist
            group = text.split("Could not find '", 1)[1].split("'", 1)[0]
            options = []
            for line in text.split("Available options", 1)[1].splitlines()[1:]:
                if not line.startswith("\t"):  # the option list ends where Hydra's search path starts
                    break
                options.append(line.strip())
            name, _, option = group.rpartition("/")
            return f"{name}={option} does not exist; use one of {', '.join(options)} (conf/{name}/)"
        if text.startswith("Could not override '"):
            key = text.split("'", 2)[1]
            value = next((a.split("=", 1)[1] for a in overrides if a.split("=", 1)[0] == key), "")
            return (f"{key}={value}: {command}'s config has no key {key}; `asrbench {command} --help` lists the keys "
                    f"(+{key}=... adds a new one)")
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("    ")]
        return "; ".join(lines)[:400]
    return None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if argv[1:2] == ["strategies"]:
        print(strategies_table())
        sys.exit(0)
    if len(argv) > 2 and argv[1] in ("-m", "--multirun") and argv[2] in COMMANDS:
        argv = [argv[0], argv[2], argv[1], *argv[3:]]  # `asrbench -m train ...` == `asrbench train -m ...`
    if len(argv) > 1 and argv[1] in COMMANDS:
        command, rest = argv[1], argv[2:]
    elif os.environ.get(ENV) in COMMANDS and len(argv) > 1 and argv[1] not in ("-h", "--help"):
        command, rest = os.environ[ENV], argv[1:]
    else:
        asked = len(argv) > 1 and argv[1] in ("-h", "--help")
        print(usage(), file=sys.stdout if asked else sys.stderr)
        sys.exit(0 if asked else 2)
    if not any(a in _NO_OUTPUT for a in rest):
        problem = check_output_dir(output_root(command, rest))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
    from asrbench import slurm  # the resolvers conf/ uses, registered before Hydra composes it

    slurm.register_resolvers()
    problem = (slurm.task_layout_problem() if command == "train" else None) or check_overrides(command, rest)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    os.environ[ENV] = command
    sys.argv = [argv[0], *rest]

    from asrbench import apps  # torch, Lightning and Hydra load only for a real command, not for --help

    getattr(apps, COMMANDS[command][1])()


if __name__ == "__main__":
    main()
