"""Frame phone labels from the synthetic corpus's exact phoneme timings: the reference of FER.

The synthesiser writes every utterance's phonemes with their start and end in seconds of the
written audio (asrbench/data/synth.py, ``*.align.json``). Each stacked input frame gets the
phoneme that covers the centre of its span, or silence (id 0) where none does:

    stacked frame t spans [t s, t s + (stack - 1) f + w), centre c_t = t s + ((stack - 1) f + w) / 2,

with f the fbank frame shift, w the window length and s = skip f the stacked frame shift
(asrbench.data.features.stack_frames). Phoneme ids are 1.. in the sorted order of the phonemes
the training subsets use; a phoneme that only an evaluation subset uses is ignored (-100).

These labels need no model, so the frame error rate measured against them (a phone classifier
on the acoustic model's top layer, asrbench.model.lstm) is the same reference for every run and
every seed, unlike a forced alignment made with one trained model.
"""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from asrbench.errors import CorpusError

SILENCE = "sil"
IGNORE_INDEX = -100
Timings = Mapping[str, Sequence[Sequence]]  # utt -> [[PHONEME, start_s, end_s], ...]


def read_timings(root: Path, subsets: Iterable[str]) -> dict[str, dict[str, list]]:
    """{subset: {utt: [[PHONEME, start_s, end_s], ...]}} from every ``*.align.json`` under each subset
    (parsed once per process while the files are unchanged: one `train` needs them twice)."""
    out: dict[str, dict[str, list]] = {}
    for subset in subsets:
        files = tuple(sorted((Path(root) / subset).rglob("*.align.json")))
        if not files:
            raise CorpusError(f"{Path(root) / subset}: no *.align.json phoneme timings; data.phone_labels=true "
                              f"needs a corpus written by the synthesiser (data=synth*), or set it false")
        out[subset] = _parse_timings(files, tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in files))
    return out


@functools.lru_cache(maxsize=8)
def _parse_timings(files: tuple[Path, ...], stamps: tuple[tuple[int, int], ...]) -> dict[str, list]:
    del stamps  # part of the cache key only: a rewritten file is parsed again
    timings: dict[str, list] = {}
    for path in files:
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
            timings.update({utt: list(e["phonemes"]) for utt, e in entries.items()})
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CorpusError(f"{path}: damaged phoneme timings; delete the corpus directory to have it "
                              f"synthesised again") from None
    return timings


def inventory(timings: Iterable[Timings]) -> list[str]:
    """The label set: silence first, then every phoneme of `timings`, sorted."""
    phones = {str(p[0]) for t in timings for seq in t.values() for p in seq}
    phones.discard(SILENCE)
    return [SILENCE, *sorted(phones)]


def frame_centres(num_frames: int, frame_shift_ms: float, frame_length_ms: float, stack: int,
                  skip: int) -> torch.Tensor:
    """Seconds at the centre of each stacked frame's span (module docstring)."""
    shift_s = skip * frame_shift_ms / 1000
    half = ((stack - 1) * frame_shift_ms + frame_length_ms) / 2000
    return torch.arange(num_frames, dtype=torch.float64) * shift_s + half


def frame_labels(phonemes: Sequence[Sequence], centres: torch.Tensor, ids: Mapping[str, int]) -> torch.Tensor:
    """Label of each frame centre: the id of the phoneme whose [start, end) holds it, 0 (silence)
    where none does, IGNORE_INDEX for a phoneme outside `ids`."""
    labels = torch.zeros(len(centres), dtype=torch.long)
    if not len(phonemes) or not len(centres):
        return labels
    # centres ascend, so the frames of [start, end) are one slice: its bounds by binary search, all at once
    bounds = torch.tensor([[float(start), float(end)] for _, start, end in phonemes], dtype=centres.dtype)
    first, stop = torch.searchsorted(centres, bounds, side="left").T.tolist()
    for (name, _, _), lo, hi in zip(phonemes, first, stop):
        labels[lo:hi] = ids.get(str(name), IGNORE_INDEX)
    return labels


def phone_frame_labels(timings: Mapping[str, Timings], lengths: Mapping[str, int], phones: Sequence[str], *,
                       frame_shift_ms: float, frame_length_ms: float, stack: int, skip: int
                       ) -> dict[str, torch.Tensor]:
    """Frame labels (T,) of every utterance that has both timings and features (`lengths`: stacked frames)."""
    ids = {p: i for i, p in enumerate(phones)}
    out = {}
    longest = max(lengths.values(), default=0)
    centres = frame_centres(longest, frame_shift_ms, frame_length_ms, stack, skip)
    for per_subset in timings.values():
        for utt, seq in per_subset.items():
            n = lengths.get(utt)
            if n is not None:
                out[utt] = frame_labels(seq, centres[:n], ids)
    return out


def check_labels(labels: Mapping[str, torch.Tensor], num_phones: int) -> float:
    """Share of labelled frames that are silence (a sanity figure for the log); raises if any id is out of range."""
    frames = silence = 0
    for utt, lab in labels.items():
        valid = lab[lab != IGNORE_INDEX]
        if len(valid) and int(valid.max()) >= num_phones:
            raise CorpusError(f"phone labels of {utt} use id {int(valid.max())}, beyond the {num_phones} phones")
        frames += len(valid)
        silence += int((valid == 0).sum())
    return silence / frames if frames else math.nan
