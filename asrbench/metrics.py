"""Error rates: WER/CER through jiwer, FER against frame labels, relative change vs a baseline."""
from __future__ import annotations

import math
from collections.abc import Sequence

import jiwer
import torch
from torchaudio.functional import edit_distance


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus word error rate: total edits / total reference words (jiwer)."""
    if not refs:
        return math.nan
    return float(jiwer.wer(list(refs), [h if h else "" for h in hyps]))


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus character error rate (jiwer)."""
    if not refs:
        return math.nan
    return float(jiwer.cer(list(refs), list(hyps)))


def utterance_errors(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, list[int]]:
    """Per utterance: word edits and reference words, character edits and reference characters
    (Levenshtein distance, torchaudio). Their sums give the corpus WER and CER that jiwer gives; per
    utterance they let a bootstrap resample the test set (asrbench.stats)."""

    out: dict[str, list[int]] = {"wer_errors": [], "wer_counts": [], "cer_errors": [], "cer_counts": []}
    for ref, hyp in zip(refs, hyps, strict=True):
        hyp = hyp or ""
        out["wer_errors"].append(int(edit_distance(ref.split(), hyp.split())))
        out["wer_counts"].append(len(ref.split()))
        out["cer_errors"].append(int(edit_distance(list(ref), list(hyp))))
        out["cer_counts"].append(len(ref))
    return out


def frame_errors(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[int, int]:
    """(wrong frames, counted frames) of argmax(logits) against labels; padding ignored."""
    mask = labels != ignore_index
    wrong = (logits.argmax(-1) != labels) & mask
    return int(wrong.sum()), int(mask.sum())


def frame_errors_per_row(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
                         ) -> tuple[list[int], list[int]]:
    """(wrong frames, counted frames) per utterance (row) of a padded batch."""
    mask = labels != ignore_index
    wrong = (logits.argmax(-1) != labels) & mask
    return wrong.sum(-1).tolist(), mask.sum(-1).tolist()


def relative_change(value: float, baseline: float) -> float:
    """(value - baseline) / baseline: the paper's relative error-rate change (0.031 = +3.1 %)."""
    if baseline is None or value is None or not math.isfinite(baseline) or baseline == 0:
        return math.nan
    return (value - baseline) / baseline
