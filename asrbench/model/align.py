"""Viterbi forced alignment with a trained CTC model, and frame-label files.

The best CTC path constrained to the reference transcript (torchaudio.functional.forced_align)
labels every stacked frame with a character or the blank. These labels are the targets of
frame cross-entropy training (`criterion=ce`) and the reference of the frame error rate (FER).

File format, one file per subset: `<dir>/<subset>.ali` (Kaldi-like text), a line per utterance
`UTT-ID l1 l2 ... lT` with the character ids of asrbench.data.text (0 = blank).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torchaudio.functional as AF

from asrbench.data import text
from asrbench.data.dataset import SpeechDataset, make_loader
from asrbench.errors import CorpusError

log = logging.getLogger(__name__)
SPACE_ID = text.encode(" ")[0]


def force_align(log_probs: torch.Tensor, targets: Sequence[int]) -> torch.Tensor | None:
    """Frame labels (T,) of the best path through `targets`; None if the utterance is too short.

    CTC needs one frame per target plus one per repeated neighbour (the blank between them).
    """
    tgt = torch.as_tensor(list(targets), dtype=torch.int32)
    repeats = int((tgt[1:] == tgt[:-1]).sum()) if len(tgt) > 1 else 0
    if len(tgt) == 0 or log_probs.shape[0] < len(tgt) + repeats:
        return None
    labels, _ = AF.forced_align(log_probs[None].float().cpu(), tgt[None], blank=0)
    return labels[0].long()


def word_spans(labels: torch.Tensor) -> list[tuple[int, int]]:
    """(first frame, last frame + 1) of each word: runs of non-blank, non-space labels between spaces.

    Blank frames inside a word belong to it; a word starts at its first emitted character and
    ends after its last emitted character.
    """
    spans: list[tuple[int, int]] = []
    start = end = None
    for t, lab in enumerate(labels.tolist()):
        if lab == SPACE_ID:
            if start is not None:
                spans.append((start, end))
                start = None
        elif lab != 0:
            if start is None:
                start = t
            end = t + 1
    if start is not None:
        spans.append((start, end))
    return spans


def boundary_accuracy(alignments: Mapping[str, torch.Tensor], timings: Mapping[str, list],
                      frame_s: float, tolerance_s: float) -> tuple[float, int]:
    """Share of word starts within `tolerance_s` of the reference timings, and words compared.

    `timings[utt] = [(WORD, start_s, end_s), ...]`; utterances whose word count differs from
    the alignment's are left out (they are counted in the log).
    """
    hits = total = mismatched = 0
    for utt, labels in alignments.items():
        ref = timings.get(utt)
        if not ref:
            continue
        spans = word_spans(labels)
        if len(spans) != len(ref):
            mismatched += 1
            continue
        for (s, _), (_, rs, _) in zip(spans, ref):
            hits += abs(s * frame_s - rs) <= tolerance_s
            total += 1
    if mismatched:
        log.info("boundary check: %d utterances with a different word count left out", mismatched)
    return (hits / total if total else float("nan")), total


def write_alignments(path: Path, alignments: Mapping[str, torch.Tensor]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for utt in sorted(alignments):
            f.write(utt + " " + " ".join(map(str, alignments[utt].tolist())) + "\n")
    tmp.replace(path)


def read_alignments(directory: Path, subsets: Iterable[str]) -> dict[str, torch.Tensor]:
    """Frame labels of every utterance in `<directory>/<subset>.ali` for the given subsets."""
    out: dict[str, torch.Tensor] = {}
    for subset in subsets:
        path = Path(directory) / f"{subset}.ali"
        if not path.is_file():
            raise CorpusError(f"{path}: no alignment for subset {subset!r}; run `asrbench align` "
                              f"for it or leave data.alignments unset")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            try:
                out[parts[0]] = torch.tensor([int(x) for x in parts[1:]], dtype=torch.long)
            except (IndexError, ValueError):
                raise CorpusError(f"{path}:{n}: malformed alignment line; re-run `asrbench align`") from None
    return out


@torch.no_grad()
def align_split(model: torch.nn.Module, split, batch_size: int = 32) -> tuple[dict[str, torch.Tensor], int]:
    """Forced alignment of every utterance of a split; returns labels by utterance and the skip count."""

    model.eval()
    out: dict[str, torch.Tensor] = {}
    skipped = 0
    for batch in make_loader(SpeechDataset(split), batch_size=batch_size, shuffle=False, seed=0):
        log_probs = model(batch["feats"], batch["feat_lens"]).log_softmax(-1)
        for i, utt in enumerate(batch["utt_ids"]):
            labels = force_align(log_probs[i, : batch["feat_lens"][i]],
                                 batch["targets"][i, : batch["target_lens"][i]].tolist())
            if labels is None:
                skipped += 1
            else:
                out[utt] = labels
    if skipped:
        log.warning("%d utterances too short for their transcript were not aligned", skipped)
    return out, skipped
