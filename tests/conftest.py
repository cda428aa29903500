"""Shared fixtures: tiny corpora in LibriSpeech layout, written on the fly."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

WORDS = ("THE", "CAT", "SAT", "ON", "A", "MAT", "DOG'S", "BONE", "RED", "SKY", "AT", "NIGHT", "SHEPHERD",
         "DELIGHT", "RAIN", "SPAIN", "FALLS", "MAINLY", "PLAIN", "HELLO", "WORLD")


def speechlike(rng: np.random.Generator, seconds: float, sample_rate: int = 16000) -> np.ndarray:
    """Voiced-sounding audio: harmonics of a wandering pitch under a syllable-rate envelope, plus noise."""
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    f0 = rng.uniform(90, 240) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(rng.uniform(0.2, 1.0) / k * np.sin(k * phase) for k in range(1, 6))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 2 * np.pi))) ** 2
    x = 0.2 * envelope * voiced + 0.01 * rng.standard_normal(n)
    return np.clip(x, -1, 1).astype(np.float32)


def make_librispeech_tree(root: str | Path, subsets: Mapping[str, tuple[int, int, int]] | None = None, *,
                          nested: bool = True, sample_rate: int = 16000, seconds: tuple[float, float] = (0.6, 1.4),
                          seed: int = 0, align: bool = False) -> Path:
    """Write a corpus in LibriSpeech layout and return the directory to use as `data.root`.

    `subsets[name] = (speakers, chapters per speaker, utterances per chapter)`; speaker and
    chapter ids are unique across subsets. `nested` puts subsets under `<root>/LibriSpeech/`
    (as the openslr tarballs extract), otherwise directly under `<root>`. `align` adds the
    synthetic corpus's `<speaker>-<chapter>.align.json` with evenly spaced word timings.
    """
    subsets = {"train-clean-100": (2, 2, 3)} if subsets is None else subsets
    root = Path(root)
    base = root / "LibriSpeech" if nested else root
    rng = np.random.default_rng(seed)
    speaker = 100
    chapter = 1000
    for subset, (n_speakers, n_chapters, n_utts) in subsets.items():
        for _ in range(n_speakers):
            speaker += 1
            for _ in range(n_chapters):
                chapter += 1
                cdir = base / subset / str(speaker) / str(chapter)
                cdir.mkdir(parents=True)
                lines, timings = [], {}
                for k in range(n_utts):
                    utt_id = f"{speaker}-{chapter}-{k:04d}"
                    dur = float(rng.uniform(*seconds))
                    sf.write(cdir / f"{utt_id}.flac", speechlike(rng, dur, sample_rate), sample_rate,
                             subtype="PCM_16")
                    words = [str(w) for w in rng.choice(WORDS, size=int(rng.integers(2, 6)))]
                    lines.append(f"{utt_id} {' '.join(words)}\n")
                    step = dur / len(words)
                    timings[utt_id] = {"words": [[w, round(i * step, 3), round((i + 1) * step, 3)]
                                                 for i, w in enumerate(words)], "phonemes": []}
                (cdir / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines))
                if align:
                    (cdir / f"{speaker}-{chapter}.align.json").write_text(json.dumps(timings))
    return root


TINY_SUBSETS = {"train-clean-100": (2, 2, 3), "dev-clean": (1, 2, 2), "test-clean": (1, 1, 2)}


@pytest.fixture(name="make_librispeech_tree")
def _make_librispeech_tree() -> object:
    """The writer itself, for tests that need their own layout."""
    return make_librispeech_tree


@pytest.fixture
def librispeech_tree(tmp_path: Path) -> Path:
    """A tiny nested corpus: train-clean-100 (12 utterances), dev-clean (4), test-clean (2)."""
    return make_librispeech_tree(tmp_path / "corpus", TINY_SUBSETS)


@pytest.fixture(scope="session", autouse=True)
def gtc_kernel_built() -> None:
    """Build GTC's one-pass CPU encoder once, before any test's worker processes need it (they then
    load it from torch's extension cache instead of each waiting on the compiler)."""
    from asrbench.strategies import gtc_kernel

    gtc_kernel.load()
