"""The figures asrbench reproduces: Table of the Interspeech 2019 GTC-BMUF paper (Amazon).

Speedup over one GPU and relative word-error-rate change against the single-GPU model, for
32, 64 and 128 GPUs. "Below baseline" (GTC-BMUF at 32) is recorded as a negative change of
unknown size: NaN with `below_baseline=True`.
"""
from __future__ import annotations

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
