"""`asrbench <command> [hydra overrides]`: dispatch to the Hydra app of each command."""
from __future__ import annotations

import os
import sys

COMMANDS = {
    "prepare": "generate (synth) or scan (librispeech) the corpus and cache its features",
    "train": "train one run (strategy=single|sync|gtc|bmuf|gtc_bmuf|diloco, nodes=N)",
    "eval": "recompute metrics of a run: run=DIR [baseline=DIR] -> results.json, report.md",
    "align": "CTC forced alignment of a corpus with a trained run: run=DIR -> <subset>.ali",
    "bench": "measured speed against plain-PyTorch peers: bench=quick|full -> bench.json, bench.md",
    "reproduce": "the paper's table on the simulated cluster: reproduce=cpu|paper|tiny -> report.md + plots",
}
# Lightning restarts the script for ranks > 0 with the same arguments; the command travels in
# the environment because the first argument is removed before Hydra reads the overrides.
ENV = "ASRBENCH_COMMAND"


def usage() -> str:
    rows = "\n".join(f"  {name:<10} {what}" for name, what in COMMANDS.items())
    return (f"usage: asrbench <command> [hydra overrides] [--help | --cfg job | -m]\n\ncommands:\n{rows}\n\n"
            f"`asrbench <command> --help` lists that command's config groups and options.")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
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
    os.environ[ENV] = command
    sys.argv = [argv[0], *rest]
    from asrbench import apps

    apps.COMMANDS[command]()


if __name__ == "__main__":
    main()
