"""Error rates: WER/CER through jiwer (WER also by edit kind, and SER), FER against frame labels,
relative change vs a baseline."""
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
    utterance they let a bootstrap resample the test set (asrbench.stats).

    The word edits are also split by kind from one alignment per utterance (jiwer.process_words):
    ``sub``, ``del`` and ``ins`` (each counted against the reference words, so the three rates add
    up to the WER), and ``ser``, the sentence error rate (1 per utterance with any word error, of
    1). A strategy that only drops words reads differently from one that confuses them."""

    hyps = [h or "" for h in hyps]
    out: dict[str, list[int]] = {"wer_errors": [], "wer_counts": [], "cer_errors": [], "cer_counts": []}
    for ref, hyp in zip(refs, hyps, strict=True):
        out["wer_errors"].append(int(edit_distance(ref.split(), hyp.split())))
        out["wer_counts"].append(len(ref.split()))
        out["cer_errors"].append(int(edit_distance(list(ref), list(hyp))))
        out["cer_counts"].append(len(ref))
    out |= word_edit_kinds(refs, hyps)
    assert [s + d + i for s, d, i in zip(out["sub_errors"], out["del_errors"], out["ins_errors"])] == \
        out["wer_errors"], "jiwer's alignment and torchaudio's edit distance disagree on an utterance's word edits"
    return out


def word_edit_kinds(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, list[int]]:
    """Per utterance: substitutions, deletions and insertions of a minimal word alignment (jiwer, counted
    as jiwer counts them), each with the reference words as counts, and the sentence error (any word
    edit) of 1 utterance. Words are split on whitespace, as :func:`utterance_errors` splits them."""
    out: dict[str, list[int]] = {k: [] for k in ("sub_errors", "sub_counts", "del_errors", "del_counts",
                                                 "ins_errors", "ins_counts", "ser_errors", "ser_counts")}
    if not refs:
        return out
    aligned = jiwer.process_words([" ".join(r.split()) for r in refs], [" ".join((h or "").split()) for h in hyps])
    for ref, chunks in zip(aligned.references, aligned.alignments, strict=True):
        edits = {"substitute": 0, "delete": 0, "insert": 0, "equal": 0}
        for c in chunks:
            edits[c.type] += c.hyp_end_idx - c.hyp_start_idx if c.type == "insert" else c.ref_end_idx - c.ref_start_idx
        for key, kind in (("sub", "substitute"), ("del", "delete"), ("ins", "insert")):
            out[f"{key}_errors"].append(edits[kind])
            out[f"{key}_counts"].append(len(ref))
        out["ser_errors"].append(int(edits["substitute"] + edits["delete"] + edits["insert"] > 0))
        out["ser_counts"].append(1)
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
