"""The figures asrbench reproduces: the table of the Interspeech 2019 GTC-BMUF paper (Amazon).

Speedup over one GPU and relative word-error-rate change against the single-GPU model, for
32, 64 and 128 GPUs, and the paper's accuracy claims as orderings of these figures
(:data:`CLAIMS`), read from conf/paper.yaml. "Below baseline" (GTC-BMUF at 32) is recorded as a
negative change of unknown size: NaN with `below_baseline=True`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

PAPER_FILE = Path(__file__).resolve().parents[1] / "conf" / "paper.yaml"
_PAPER = yaml.safe_load(PAPER_FILE.read_text())
PAPER_TABLE: dict[str, dict[int, dict[str, float | bool]]] = _PAPER["table"]


def paper_value(strategy: str, nodes: int, key: str) -> float | None:
    return PAPER_TABLE.get(strategy, {}).get(nodes, {}).get(key)


def paper_rel_wer_text(strategy: str, nodes: int) -> str:
    row = PAPER_TABLE.get(strategy, {}).get(nodes)
    if not row:
        return "-"
    if row.get("below_baseline"):
        return "below baseline"
    return f"{row['rel_wer'] * 100:+.1f}%"


# ------------------------------------------------------------------------------------------------
# The paper's accuracy claims, one ordering each, over three worker-count tiers
# ------------------------------------------------------------------------------------------------
PAPER_NODES = tuple(_PAPER["nodes"])  # the paper's tiers; an experiment restates them over its own three counts


@dataclass(frozen=True)
class Claim:
    """One accuracy claim as an ordering of relative WER: `lower` ends below `higher` (with several
    cells in `higher`, below the best of them). Cells are (strategy, tier), tier 0-2 standing for
    the paper's 32 / 64 / 128 workers; ("single", None) is the baseline. `margin` is the paper's
    higher minus lower in relative WER (None where the paper gives no number)."""

    text: str
    lower: tuple[str, int | None]
    higher: tuple[tuple[str, int | None], ...]
    margin: float | None

    def cells(self, nodes: Sequence[int]) -> tuple[tuple[str, int], tuple[tuple[str, int], ...]] | None:
        """The claim's cells at an experiment's worker counts `nodes` (smallest first); None when a
        tier it needs was not run."""
        if any(t is not None and t >= len(nodes) for _, t in (self.lower, *self.higher)):
            return None

        def at(cell: tuple[str, int | None]) -> tuple[str, int]:
            return (cell[0], 1) if cell[1] is None else (cell[0], int(nodes[cell[1]]))
        return at(self.lower), tuple(at(h) for h in self.higher)

    def describe(self, nodes: Sequence[int]) -> str:
        """The claim's text at `nodes` (the paper's worker counts replaced by the experiment's). A claim
        that needs a tier the experiment did not run keeps the paper's counts and says so."""
        text = self.text
        named = [i for i, paper in enumerate(PAPER_NODES) if f"{{{paper}}}" in text]
        if self.cells(nodes) is None or any(i >= len(nodes) for i in named):
            for paper in PAPER_NODES:
                text = text.replace(f"{{{paper}}}", str(paper))
            return f"{text} (the paper's workers; tier not run)"
        for i in named:
            text = text.replace(f"{{{PAPER_NODES[i]}}}", str(nodes[i]))
        return text

    def paper_text(self) -> str:
        def rel(cell):
            return "baseline" if cell[1] is None else paper_rel_wer_text(cell[0], PAPER_NODES[cell[1]])
        return f"{rel(self.lower)} vs {' / '.join(rel(h) for h in self.higher)}"


def _cell(cell: Sequence) -> tuple[str, int | None]:
    return str(cell[0]), None if cell[1] is None else int(cell[1])


CLAIMS: tuple[Claim, ...] = tuple(
    Claim(c["text"], _cell(c["lower"]), tuple(_cell(h) for h in c["higher"]), c["margin"]) for c in _PAPER["claims"])
