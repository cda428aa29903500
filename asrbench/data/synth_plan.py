"""The synthetic corpus's config, its sentences and its plan: which speaker reads which sentence,
in which chapter, with which rate, pitch, level, padding, noise and seeds."""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asrbench.data.synth_espeak import _PACKAGE_PARENT
from asrbench.data.text import normalize
from asrbench.errors import ConfigError

SPLITS = ("train", "dev", "test", "test_seen")
ROLE_SPLITS = {"train": ("train", "test_seen"), "dev": ("dev",), "test": ("test",)}
RATE_LIMITS = (80, 450)  # words/minute that espeakRATE accepts
MAX_CHAPTERS_PER_SPEAKER = 100  # chapter id = 100 * speaker id + k
_KEYS = {"sentences", "seed", "sample_rate", "snr_db", "peak_dbfs", "pad_s", "rate_jitter",
         "pitch_jitter", "chapter_size", "utterances", "speakers", "workers"}
_SPEAKER_KEYS = {"id", "voice", "role", "rate", "pitch", "range"}
_OPTIONAL_KEYS = {"max_words": None, "vocabulary": None, "train_readers": 1}  # keys a config may leave out; left out or null, they change nothing


class SynthConfigError(ConfigError, ValueError):
    """A bad ``data.synth`` config: a ConfigError for the command line, a ValueError for callers."""


@dataclass(frozen=True)
class Speaker:
    id: int
    voice: str
    role: str  # train | dev | test: which splits the speaker reads (ROLE_SPLITS)
    rate: int  # words/minute before per-utterance jitter
    pitch: int  # eSpeak base pitch 0-100 (50 = the voice's own) before jitter
    range: int  # eSpeak pitch range 0-100 (50 = the voice's own)


@dataclass(frozen=True)
class UtterancePlan:
    utt_id: str
    text: str
    rate: int
    pitch: int
    snr_db: float
    peak_dbfs: float
    pad: tuple[int, int]  # samples of silence before and after the speech, at sample_rate
    espeak_seed: int  # seeds eSpeak's noise generator
    key: tuple[int, ...]  # (seed, speaker, chapter, utterance): keys the noise generator


@dataclass(frozen=True)
class ChapterPlan:
    split: str
    speaker: Speaker
    id: int
    utterances: tuple[UtterancePlan, ...]

    def directory(self, root: Path) -> Path:
        return root / self.split / str(self.speaker.id) / str(self.id)


def _pair(cfg: Mapping, key: str, low: float, high: float) -> tuple[float, float]:
    value = cfg[key]
    if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2
            or not all(isinstance(v, (int, float)) for v in value) or not low <= value[0] <= value[1] <= high):
        raise SynthConfigError(f"data.synth.{key}={value!r} must be [low, high] with {low} <= low <= high <= {high}")
    return float(value[0]), float(value[1])


def _int(cfg: Mapping, key: str, low: int, high: int, where: str = "data.synth") -> int:
    value = cfg[key]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SynthConfigError(f"{where}.{key}={value!r} must be an integer in [{low}, {high}]")
    return value


def _check_config(cfg: Mapping) -> dict[str, Any]:
    """The config as plain JSON data, every key present, typed and in range."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, Mapping):
        raise SynthConfigError(f"data.synth must be a mapping, got {type(cfg).__name__}")
    cfg = json.loads(json.dumps(dict(cfg)))
    for key, default in _OPTIONAL_KEYS.items():
        cfg.setdefault(key, default)
    missing, unknown = _KEYS - set(cfg), set(cfg) - _KEYS - set(_OPTIONAL_KEYS)
    if missing or unknown:
        raise SynthConfigError(f"data.synth: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}; "
                               f"see conf/data/synth.yaml for the expected keys")
    _int(cfg, "seed", 0, 2**63 - 1)
    if cfg["max_words"] is not None:
        _int(cfg, "max_words", 1, 10**4)
    if cfg["vocabulary"] is not None:
        _int(cfg, "vocabulary", 1, 10**7)
    _int(cfg, "sample_rate", 8000, 48000)
    _pair(cfg, "snr_db", -20, 120)
    _pair(cfg, "peak_dbfs", -60, 0)
    _pair(cfg, "pad_s", 0, 10)
    if not isinstance(cfg["rate_jitter"], (int, float)) or not 0 <= cfg["rate_jitter"] < 1:
        raise SynthConfigError(f"data.synth.rate_jitter={cfg['rate_jitter']!r} must be a fraction in [0, 1)")
    pitch_jitter = _int(cfg, "pitch_jitter", 0, 50)
    chapter_size = _int(cfg, "chapter_size", 1, 10000)
    if cfg["workers"] is not None:
        _int(cfg, "workers", 1, 1024)
    counts = cfg["utterances"]
    if not isinstance(counts, dict) or set(counts) != set(SPLITS):
        raise SynthConfigError(f"data.synth.utterances={counts!r} must give utterances per speaker for each "
                               f"of {list(SPLITS)}")
    for split in SPLITS:
        _int(counts, split, 0, 10**6, "data.synth.utterances")
    speakers = cfg["speakers"]
    if not isinstance(speakers, list) or not speakers:
        raise SynthConfigError("data.synth.speakers must be a non-empty list of {id, voice, role, rate, pitch, range}")
    ids = set()
    rate_jitter = float(cfg["rate_jitter"])
    for n, spk in enumerate(speakers):
        where = f"data.synth.speakers[{n}]"
        if not isinstance(spk, dict) or set(spk) != _SPEAKER_KEYS:
            raise SynthConfigError(f"{where}={spk!r} must have exactly the keys {sorted(_SPEAKER_KEYS)}")
        sid = _int(spk, "id", 0, 10**6, where)
        if sid in ids:
            raise SynthConfigError(f"{where}.id={sid} is used twice; speaker ids must be unique")
        ids.add(sid)
        if not isinstance(spk["voice"], str) or not spk["voice"]:
            raise SynthConfigError(f"{where}.voice={spk['voice']!r} must be an eSpeak NG voice such as 'en-us+m3'")
        if spk["role"] not in ROLE_SPLITS:
            raise SynthConfigError(f"{where}.role={spk['role']!r} must be one of {list(ROLE_SPLITS)}")
        rate = _int(spk, "rate", *RATE_LIMITS, where)
        if not RATE_LIMITS[0] <= rate * (1 - rate_jitter) <= rate * (1 + rate_jitter) <= RATE_LIMITS[1]:
            raise SynthConfigError(f"{where}.rate={rate} with rate_jitter={rate_jitter} leaves eSpeak's range "
                                   f"{list(RATE_LIMITS)}")
        pitch = _int(spk, "pitch", 0, 100, where)
        if not 0 <= pitch - pitch_jitter <= pitch + pitch_jitter <= 100:
            raise SynthConfigError(f"{where}.pitch={pitch} with pitch_jitter={pitch_jitter} leaves eSpeak's "
                                   f"range [0, 100]")
        _int(spk, "range", 0, 100, where)
        n_chapters = sum(math.ceil(counts[s] / chapter_size) for s in ROLE_SPLITS[spk["role"]])
        if n_chapters > MAX_CHAPTERS_PER_SPEAKER:
            raise SynthConfigError(f"{where} needs {n_chapters} chapters (> {MAX_CHAPTERS_PER_SPEAKER}); raise "
                                   f"data.synth.chapter_size")
    trainers = sum(s["role"] == "train" for s in speakers)
    readers = _int(cfg, "train_readers", 1, max(trainers, 1))
    if counts["train"] % readers:
        raise SynthConfigError(f"data.synth.utterances.train={counts['train']} must be a multiple of "
                               f"data.synth.train_readers={readers} (each training sentence is read by that many "
                               f"training speakers)")
    for role in ROLE_SPLITS:
        if not any(s["role"] == role for s in speakers):
            raise SynthConfigError(f"data.synth.speakers has no speaker with role {role!r}; every split needs speakers")
    return cfg


def _sentences_path(path: str | Path) -> Path:
    """``path`` as given, else relative to the directory holding the asrbench package."""
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (_PACKAGE_PARENT / p).is_file():
        p = _PACKAGE_PARENT / p
    if not p.is_file():
        raise SynthConfigError(f"data.synth.sentences={str(path)!r}: no such file; point it at a text file "
                               f"with one sentence per line (e.g. data/text/kjv_sentences.txt)")
    return p


def read_sentences(path: Path, max_words: int | None = None, vocabulary: int | None = None) -> list[str]:
    """Normalised, non-empty, distinct sentences in file order; with `max_words`, only those of at
    most that many words (short requests, as a voice assistant hears them); with `vocabulary`, only
    those whose every word is among the file's `vocabulary` most frequent words (ties broken by
    first occurrence): a closed vocabulary, as a command-and-control task has."""
    seen: dict[str, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        s = normalize(line)
        if s:
            seen.setdefault(s)
    sentences = list(seen)
    if vocabulary is not None:
        counts = Counter(w for s in sentences for w in s.split())
        kept = {w for w, _ in counts.most_common(vocabulary)}
        sentences = [s for s in sentences if all(w in kept for w in s.split())]
    return [s for s in sentences if max_words is None or len(s.split()) <= max_words]


def _texts(cfg: Mapping[str, Any], speakers: Sequence[Speaker], sentences: Sequence[str]) -> dict[tuple[int, str], list[str]]:
    """The sentences each speaker reads in each of its splits, dealt from one seeded permutation.

    With ``train_readers`` 1, sentences are dealt speaker by speaker in config order, split by split,
    so no sentence is read twice. With R > 1, the held-out splits (test_seen, dev, test) are dealt
    first the same way, then D = S x utterances.train / R training sentences: training speaker i of S
    reads the ``utterances.train`` consecutive ones from i x D / S on (wrapping around), so each
    training sentence is read by exactly R training speakers and no held-out sentence is trained on.
    """
    counts, readers = cfg["utterances"], cfg["train_readers"]
    trainers = [s for s in speakers if s.role == "train"]
    shared = "train" if readers > 1 else None
    held = sum(counts[split] for s in speakers for split in ROLE_SPLITS[s.role] if split != shared)
    block = counts["train"] // readers
    needed = held + (len(trainers) * block if shared else 0)
    if needed > len(sentences):
        raise SynthConfigError(f"data.synth needs {needed} distinct sentences but {cfg['sentences']} has "
                               f"{len(sentences)}; lower data.synth.utterances, raise data.synth.train_readers "
                               f"or give more sentences")
    order = np.random.default_rng(cfg["seed"]).permutation(len(sentences))
    dealt = iter(order[:held])
    texts = {(s.id, split): [sentences[next(dealt)] for _ in range(counts[split])]
             for s in speakers for split in ROLE_SPLITS[s.role] if split != shared}
    if shared:
        pool = [sentences[j] for j in order[held:needed]]
        for i, s in enumerate(trainers):
            texts[(s.id, "train")] = [pool[(i * block + k) % len(pool)] for k in range(counts["train"])]
    return texts


def plan_corpus(cfg: Mapping[str, Any], sentences: Sequence[str]) -> list[ChapterPlan]:
    """Every chapter and utterance with its parameters; a pure function of the config and sentences.

    Which speaker reads which sentence: :func:`_texts`. Chapter ``k`` of speaker ``s`` has id
    ``100 * s + k``.
    """
    speakers = [Speaker(**s) for s in cfg["speakers"]]
    texts = _texts(cfg, speakers, sentences)
    seed, sr = cfg["seed"], cfg["sample_rate"]
    chapters = []
    for spk in speakers:
        k = 0
        for split in ROLE_SPLITS[spk.role]:
            lines = texts[(spk.id, split)]
            for first in range(0, len(lines), cfg["chapter_size"]):
                chapter_id = MAX_CHAPTERS_PER_SPEAKER * spk.id + k
                k += 1
                utts = []
                for n, line in enumerate(lines[first:first + cfg["chapter_size"]]):
                    key = (seed, spk.id, chapter_id, n)
                    rng = np.random.default_rng(key)
                    utts.append(UtterancePlan(
                        utt_id=f"{spk.id}-{chapter_id}-{n:04d}",
                        text=line,
                        rate=round(spk.rate * (1 + rng.uniform(-cfg["rate_jitter"], cfg["rate_jitter"]))),
                        pitch=spk.pitch + int(rng.integers(-cfg["pitch_jitter"], cfg["pitch_jitter"] + 1)),
                        snr_db=float(rng.uniform(*cfg["snr_db"])),
                        peak_dbfs=float(rng.uniform(*cfg["peak_dbfs"])),
                        pad=tuple(int(round(x * sr)) for x in rng.uniform(*cfg["pad_s"], size=2)),
                        espeak_seed=int(rng.integers(2**31)),
                        key=key))
                chapters.append(ChapterPlan(split, spk, chapter_id, tuple(utts)))
    return chapters
