"""The figures asrbench reproduces: Table of the Interspeech 2019 GTC-BMUF paper (Amazon).

Speedup over one GPU and relative word-error-rate change against the single-GPU model, for
32, 64 and 128 GPUs. "Below baseline" (GTC-BMUF at 32) is recorded as a negative change of
unknown size: NaN with `below_baseline=True`. The paper's accuracy claims, as orderings of these
figures, are :data:`CLAIMS`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PAPER_TABLE: dict[str, dict[int, dict[str, float | bool]]] = {
    "gtc": {32: {"speedup": 26.0, "rel_wer": 0.014},
            64: {"speedup": 17.0, "rel_wer": 0.028},
            128: {"speedup": 11.0, "rel_wer": 0.156}},
    "bmuf": {32: {"speedup": 36.6, "rel_wer": 0.035},
             64: {"speedup": 57.0, "rel_wer": 0.089},
             128: {"speedup": 80.0, "rel_wer": 0.096}},
    "gtc_bmuf": {32: {"speedup": 31.0, "rel_wer": float("nan"), "below_baseline": True},
                 64: {"speedup": 42.0, "rel_wer": 0.031},
                 128: {"speedup": 97.0, "rel_wer": 0.047}},
}


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
PAPER_NODES = (32, 64, 128)  # the paper's tiers; an experiment restates them over its own three counts


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
        """The claim's text at `nodes` (the paper's worker counts replaced by the experiment's)."""
        text = self.text
        for i, paper in enumerate(PAPER_NODES):
            text = text.replace(f"{{{paper}}}", str(nodes[i]) if i < len(nodes) else f"(the tier of {paper}: not run)")
        return text

    def paper_text(self) -> str:
        def rel(cell):
            return "baseline" if cell[0] == "single" else paper_rel_wer_text(cell[0], PAPER_NODES[cell[1]])
        return f"{rel(self.lower)} vs {' / '.join(rel(h) for h in self.higher)}"


BASELINE = ("single", None)
CLAIMS: tuple[Claim, ...] = (
    Claim("{32}: GTC-BMUF below the baseline", ("gtc_bmuf", 0), (BASELINE,), None),
    Claim("{32}: GTC-BMUF < GTC", ("gtc_bmuf", 0), (("gtc", 0),), None),
    Claim("{32}: GTC < BMUF", ("gtc", 0), (("bmuf", 0),), 0.021),
    Claim("{64}: GTC < GTC-BMUF", ("gtc", 1), (("gtc_bmuf", 1),), 0.003),
    Claim("{64}: GTC-BMUF < BMUF", ("gtc_bmuf", 1), (("bmuf", 1),), 0.058),
    Claim("{128}: GTC-BMUF < BMUF", ("gtc_bmuf", 2), (("bmuf", 2),), 0.049),
    Claim("{128}: BMUF < GTC", ("bmuf", 2), (("gtc", 2),), 0.060),
    Claim("trend: BMUF's loss grows from {32} to {64} workers", ("bmuf", 0), (("bmuf", 1),), 0.054),
    Claim("trend: BMUF's loss grows from {64} to {128} workers", ("bmuf", 1), (("bmuf", 2),), 0.007),
    Claim("trend: GTC collapses at {128} (worse than at {64})", ("gtc", 1), (("gtc", 2),), 0.128),
    Claim("trend: the hybrid is the most accurate at {128}", ("gtc_bmuf", 2), (("gtc", 2), ("bmuf", 2)), 0.049),
)
