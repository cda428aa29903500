"""Reading a corpus in LibriSpeech layout.

    <root>/[LibriSpeech/]<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
    <root>/[LibriSpeech/]<subset>/<speaker>/<chapter>/<utt_id>.flac
    <root>/[LibriSpeech/]<subset>/<speaker>/<chapter>/<speaker>-<chapter>.align.json   (optional)

A transcript file has one line per utterance, `UTT-ID WORDS...`. The optional alignment file,
written by the synthetic corpus, holds exact word timings:
`{utt_id: {"words": [[WORD, start_s, end_s], ...], "phonemes": [...]}}`.

Structural problems (a missing directory, audio without a transcript line, a transcript line
without audio) are errors. An empty transcript line is kept with `text == ""`; feature
preparation decides whether to skip it (`data.on_bad_utterance`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import soundfile as sf
import torch

from asrbench.data import text as textlib
from asrbench.errors import CorpusError

if TYPE_CHECKING:
    from asrbench.data.features import FeatureConfig

AUDIO_SUFFIXES = (".flac", ".wav")


class AudioSource(Protocol):
    """Where an utterance's samples come from when it is not a whole audio file (a Kaldi segment,
    a pipe command, a lhotse cut). Errors a user can act on are CorpusErrors reading
    `"<utterance's audio>: <kind> (<detail>); <fix>"`, the form feature preparation skips by."""

    def samples(self) -> tuple[torch.Tensor, int]:
        """Float32 mono samples and their sample rate."""

    def stamp(self) -> str:
        """What the feature cache key records for this utterance (file size and mtime, span, ...)."""

    def fbank(self, cfg: FeatureConfig) -> torch.Tensor | None:
        """Precomputed (T, num_mel_bins) filterbank frames to use instead of the audio, or None;
        ConfigError when they are not the filterbank `cfg` describes."""


@dataclass(frozen=True)
class Utterance:
    utt_id: str
    speaker: str
    chapter: str  # LibriSpeech chapter; the recording id of a Kaldi or lhotse corpus
    audio: Path
    text: str  # normalised with asrbench.data.text.normalize; "" for an empty transcript line
    text_file: Path | None = None  # where the transcript line is, when not <speaker>-<chapter>.trans.txt
    source: AudioSource | None = field(default=None, compare=False, repr=False)  # None: the whole file

    @property
    def transcript_file(self) -> Path:
        if self.text_file is not None:
            return self.text_file
        return self.audio.parent / f"{self.speaker}-{self.chapter}.trans.txt"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _subdirs(path: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []


def subset_dir(root: str | Path, subset: str) -> Path:
    """`<root>/LibriSpeech/<subset>` or `<root>/<subset>`, whichever exists."""
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"data root {root} does not exist; set data.root to the directory holding "
                          f"LibriSpeech/<subset>/ or the <subset>/ directories")
    for candidate in (root / "LibriSpeech" / subset, root / subset):
        if candidate.is_dir():
            return candidate
    found = sorted(set(_subdirs(root)) | set(_subdirs(root / "LibriSpeech")) - {"LibriSpeech"})
    raise CorpusError(f"subset {subset!r} not found under {root} (looked for {root / 'LibriSpeech' / subset} "
                      f"and {root / subset}); found: {', '.join(found) or 'nothing'}; fix data.root or the "
                      f"*_subsets lists")


def _read_transcripts(path: Path) -> dict[str, str]:
    lines: dict[str, str] = {}
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{path}: cannot read transcript file ({_one_line(exc)}); restore it") from None
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        utt_id, _, words = line.strip().partition(" ")
        if utt_id in lines:
            raise CorpusError(f"{path}:{lineno}: utterance {utt_id} appears twice; keep one line per utterance")
        lines[utt_id] = textlib.normalize(words)
    return lines


def _scan_chapter(chapter_dir: Path, speaker: str, chapter: str) -> list[Utterance]:
    audio: dict[str, Path] = {}
    for entry in sorted(os.scandir(chapter_dir), key=lambda e: e.name):
        stem, suffix = os.path.splitext(entry.name)
        if suffix in AUDIO_SUFFIXES and entry.is_file():
            audio.setdefault(stem, Path(entry.path))  # .flac wins over .wav (sorted order)
    trans_path = chapter_dir / f"{speaker}-{chapter}.trans.txt"
    if not trans_path.is_file():
        if not audio:
            return []
        raise CorpusError(f"{chapter_dir}: {len(audio)} audio files but no transcript file {trans_path.name}; "
                          f"restore it or remove the directory")
    texts = _read_transcripts(trans_path)
    for utt_id in texts:
        if utt_id not in audio:
            raise CorpusError(f"{trans_path}: utterance {utt_id} has no audio file {utt_id}.flac in "
                              f"{chapter_dir}; restore the file or delete its transcript line")
    for utt_id, path in audio.items():
        if utt_id not in texts:
            raise CorpusError(f"{path}: no transcript line for {utt_id} in {trans_path}; add the line or "
                              f"remove the audio file")
    return [Utterance(u, speaker, chapter, audio[u], t) for u, t in texts.items()]


def scan_subsets(root: str | Path, subsets: Sequence[str]) -> list[Utterance]:
    """Every utterance of `subsets` under `root`, sorted by utterance id.

    Raises CorpusError for a missing root or subset, a subset without utterances, a chapter
    whose audio files and transcript lines do not pair up, or an utterance id seen twice.
    """
    if isinstance(subsets, str):
        subsets = [subsets]
    utts: dict[str, Utterance] = {}
    for subset in subsets:
        sdir = subset_dir(root, subset)
        found = 0
        for speaker in _subdirs(sdir):
            for chapter in _subdirs(sdir / speaker):
                for utt in _scan_chapter(sdir / speaker / chapter, speaker, chapter):
                    if utt.utt_id in utts:
                        raise CorpusError(f"{utt.audio}: utterance id {utt.utt_id} also names "
                                          f"{utts[utt.utt_id].audio}; list each subset once and keep ids unique")
                    utts[utt.utt_id] = utt
                    found += 1
        if not found:
            raise CorpusError(f"{sdir}: no utterances found (expected <speaker>/<chapter>/"
                              f"<speaker>-<chapter>.trans.txt beside <utt_id>.flac files); check data.root")
    return [utts[u] for u in sorted(utts)]


def load_word_timings(utts: Sequence[Utterance]) -> dict[str, list[tuple[str, float, float]]]:
    """Reference word timings `{utt_id: [(WORD, start_s, end_s), ...]}` from `*.align.json` files.

    Utterances of chapters without an alignment file are absent; a LibriSpeech copy has none,
    so the result is `{}`.
    """
    wanted = {u.utt_id for u in utts}
    files = sorted({u.audio.parent / f"{u.speaker}-{u.chapter}.align.json" for u in utts})
    timings: dict[str, list[tuple[str, float, float]]] = {}
    for path in files:
        if not path.is_file():
            continue
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
            for utt_id, entry in entries.items():
                if utt_id in wanted:
                    timings[utt_id] = [(str(w), float(s), float(e)) for w, s, e in entry["words"]]
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CorpusError(f"{path}: malformed alignment file ({_one_line(exc)}); expected "
                              f'{{utt_id: {{"words": [[WORD, start_s, end_s], ...]}}}}; regenerate it') from None
    return timings


def decode_audio(path: Path) -> tuple[torch.Tensor, int]:
    """Float32 mono samples (channels averaged) and the file's sample rate.

    Raises CorpusError if the file cannot be decoded or holds fewer samples than its header says.
    """
    try:
        with sf.SoundFile(str(path)) as f:
            sample_rate, expected = f.samplerate, f.frames
            data = f.read(dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError) as exc:  # soundfile.LibsndfileError is a RuntimeError
        raise CorpusError(f"{path}: unreadable audio ({_one_line(exc)}); re-extract or re-download it") from None
    if len(data) < expected:
        raise CorpusError(f"{path}: truncated audio ({len(data)} of {expected} samples); re-extract or "
                          f"re-download it")
    mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(mono)), sample_rate


def check_sample_rate(path: Path, found: int, expected: int) -> None:
    if found != expected:
        raise CorpusError(f"{path}: sample rate {found} Hz, expected {expected} Hz; resample the corpus "
                          f"(e.g. `sox in.flac -r {expected} out.flac`) or set features.sample_rate={found}")


def read_audio(path: Path, expected_sr: int) -> torch.Tensor:
    """Float32 mono samples `(num_samples,)` of an audio file recorded at `expected_sr` Hz."""
    samples, sample_rate = decode_audio(path)
    check_sample_rate(path, sample_rate, expected_sr)
    return samples
