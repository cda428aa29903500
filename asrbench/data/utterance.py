"""What every corpus reader yields: an utterance, where its samples come from, and how audio
files are decoded (soundfile), whatever the layout (LibriSpeech, Kaldi data directories, lhotse)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import soundfile as sf
import torch

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


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (every corpus error a user sees is one line)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def subdirs(path: Path) -> list[str]:
    """The visible subdirectories of `path`, sorted; none when it cannot be listed."""
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []


def decode_audio(path: Path) -> tuple[torch.Tensor, int]:
    """Float32 mono samples (channels averaged) and the file's sample rate.

    Raises CorpusError if the file cannot be decoded or holds fewer samples than its header says.
    """
    try:
        with sf.SoundFile(str(path)) as f:
            sample_rate, expected = f.samplerate, f.frames
            data = f.read(dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError) as exc:  # soundfile.LibsndfileError is a RuntimeError
        raise CorpusError(f"{path}: unreadable audio ({one_line(exc)}); re-extract or re-download it") from None
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
