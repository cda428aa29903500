"""The embedded default corpus: speech synthesised offline with eSpeak NG, in LibriSpeech layout.

Synthetic speakers read normalised sentences of the King James Bible (public domain). A
speaker is an eSpeak NG voice (an accent such as ``en-gb-scotland`` plus a voice variant such
as ``+m3``, ``+f2``, ``+klatt3``) with its own base speaking rate, pitch and pitch range. Each
utterance jitters rate and pitch, is resampled from eSpeak's 22050 Hz to ``sample_rate``,
scaled to a random peak level, padded with silence at both ends and mixed with white noise at
a random SNR (eSpeak's pauses are exact digital zeros, which would put every filterbank bin on
the log floor). Under ``root``::

    <split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt:04d>.flac   16-bit mono FLAC
    <split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt        `UTT-ID TRANSCRIPT` lines
    <split>/<speaker>/<chapter>/<speaker>-<chapter>.align.json       word and phoneme timings
    SPEAKERS.TXT    manifest.json    .done

Splits: ``train`` (training speakers), ``dev`` and ``test`` (held-out speakers, disjoint from
the training speakers and from each other: ``test`` is the unseen-speaker test) and
``test_seen`` (training speakers reading sentences that are not in ``train``). No sentence is
read twice anywhere in the corpus, except that with ``train_readers`` R > 1 each training sentence
is read by R training speakers (still never in a held-out split).

Timings. ``align.json`` maps each utterance to ``{"duration": s, "words": [[WORD, start, end],
...], "phonemes": [[PHONEME, start, end], ...]}`` in seconds of the written audio (leading
padding included), taken from eSpeak's WORD and PHONEME events at sample precision:

1. A phoneme lasts from its PHONEME event to the next PHONEME event (the last one to the end
   of eSpeak's audio). Pauses (``_``, ``_:``, ``_!``) are silence and are not listed. eSpeak
   plays a stop's closure before the stop's event, so inside a word the closure counts toward
   the preceding phoneme.
2. A phoneme event at the same sample as the next one (eSpeak folds a post-vocalic /l/ into
   the vowel's frames) shares the preceding phoneme's interval with it in equal parts.
3. A word starts at its WORD event when that falls inside the preceding interval (the closure
   of a word-initial stop), otherwise at its first phoneme, and ends where its last phoneme
   ends; silence between words belongs to no word.
4. Events are matched to transcript words by character position. eSpeak speaks some word
   pairs as one dictionary entry ("of the", "in the") with one WORD event; the phonemes of such
   a group are divided among its words in proportion to their letter counts, at least one
   each. Every transcript word thus gets one interval, in order, and the intervals do not
   overlap.

Phoneme names are eSpeak's ASCII mnemonics without stress marks (``aI``, ``dZ``, ``@``, ``;``
is eSpeak's linking /j/).

Reproducibility. eSpeak NG carries synthesiser state (glottal phase, flutter index, filter
memories) from one utterance to the next, even across espeak_Terminate/espeak_Initialize, so
the samples of an utterance depend on everything synthesised before it in the same process.
Every chapter is therefore synthesised by a fresh interpreter in a fixed order. eSpeak's own
noise generator (breath of variants such as ``f2``/``f3``/``f5``, Klatt aspiration), which
espeak_Initialize seeds from the clock, and libc's ``rand()`` are reseeded before each
utterance; every other random draw comes from a numpy generator keyed by (seed, speaker,
chapter, utterance); torch resamples on one thread. Generations with the same config on the
same eSpeak NG and torch builds give byte-identical files, whatever the number of workers.

Idempotence. A chapter is written into a hidden directory and renamed when complete, so an
interrupted generation resumes chapter by chapter with the same result. ``manifest.json``
records a hash of the config (without ``workers`` and the sentence file's path), the sentence
file's content and the eSpeak NG version; ``.done`` is written last. A rerun with the same
config does nothing (it does not re-verify the files: delete ``.done`` to have missing
chapters rewritten). A rerun with a different config deletes what this module wrote under
root (the split directories, SPEAKERS.TXT, manifest.json, .done) and generates anew; anything
else under root, such as a feature cache, is left alone. Split directories under root that no
manifest accounts for are an error, never deleted.
"""
from __future__ import annotations

import bisect
import ctypes
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asrbench.data.text import normalize
from asrbench.errors import ConfigError, CorpusError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the written files change for an unchanged config
ESPEAK_RATE = 22050  # Hz, eSpeak NG's fixed output rate
SPLITS = ("train", "dev", "test", "test_seen")
ROLE_SPLITS = {"train": ("train", "test_seen"), "dev": ("dev",), "test": ("test",)}
RATE_LIMITS = (80, 450)  # words/minute that espeakRATE accepts
MAX_CHAPTERS_PER_SPEAKER = 100  # chapter id = 100 * speaker id + k
_PACKAGE_PARENT = Path(__file__).resolve().parents[2]
_KEYS = {"sentences", "seed", "sample_rate", "snr_db", "peak_dbfs", "pad_s", "rate_jitter",
         "pitch_jitter", "chapter_size", "utterances", "speakers", "workers"}
_SPEAKER_KEYS = {"id", "voice", "role", "rate", "pitch", "range"}
_OPTIONAL_KEYS = {"max_words": None, "vocabulary": None, "train_readers": 1}  # keys a config may leave out; left out or null, they change nothing
_UNHASHED_KEYS = ("sentences", "workers")  # where the file lives and how many processes: same corpus


class SynthConfigError(ConfigError, ValueError):
    """A bad ``data.synth`` config: a ConfigError for the command line, a ValueError for callers."""


class CorpusExistsError(CorpusError):
    """data.root holds split directories that no asrbench manifest accounts for."""


# ------------------------------------------------------------------ eSpeak NG through ctypes
# speak_lib.h (API revision 12): espeak_AUDIO_OUTPUT, espeak_Initialize options, espeak_Synth
# flags, espeak_EVENT_TYPE and espeak_PARAMETER values used here.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS = 0x0001
_INIT_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
EVENT_WORD, EVENT_PHONEME = 1, 7
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    """espeak_EVENT; ``sample`` is the exact sample index that ``audio_position`` (ms) truncates."""

    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _EventId)]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                  ctypes.POINTER(_Event))

# (type, text_position (1-based character), length (characters), sample, phoneme name or "")
Event = tuple[int, int, int, int, str]


class ESpeak:
    """The eSpeak NG library shipped by ``espeakng-loader``, in synchronous mode with phoneme events.

    The library is process-global: one instance per process.
    """

    def __init__(self) -> None:
        import espeakng_loader

        self.data_path = Path(espeakng_loader.get_data_path())
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 500, str(self.data_path.parent).encode(),
                                     _INIT_PHONEME_EVENTS | _INIT_DONT_EXIT)
        if rate != ESPEAK_RATE:
            raise RuntimeError(f"eSpeak NG failed to initialise from {self.data_path} (returned {rate}); "
                               f"reinstall espeakng-loader")
        self._lib = lib
        self._libc = ctypes.CDLL(None)
        self._chunks: list[bytes] = []
        self._events: list[Event] = []
        self._callback = _SynthCallback(self._on_output)  # referenced for as long as the library may call it
        lib.espeak_SetSynthCallback(self._callback)
        self.version = lib.espeak_Info(None).decode()

    def _on_output(self, wav: Any, n: int, events: Any) -> int:
        if wav and n > 0:
            self._chunks.append(ctypes.string_at(wav, 2 * n))
        i = 0
        while events[i].type != 0:
            e = events[i]
            if e.type in (EVENT_WORD, EVENT_PHONEME):
                name = e.id.string.decode("utf-8", "replace") if e.type == EVENT_PHONEME else ""
                self._events.append((e.type, e.text_position, e.length, e.sample, name))
            i += 1
        return 0

    def has_voice(self, voice: str) -> bool:
        """Whether ``voice`` (``language[+variant]``) exists; eSpeak silently ignores unknown variants."""
        _, _, variant = voice.partition("+")
        if variant and not (self.data_path / "voices" / "!v" / variant).is_file():
            return False
        return self._lib.espeak_SetVoiceByName(voice.encode()) == 0

    def variant_sex(self, voice: str) -> str:
        """``M`` or ``F`` from the variant file's ``gender`` line; eSpeak's plain voices are male."""
        _, _, variant = voice.partition("+")
        if variant:
            for line in (self.data_path / "voices" / "!v" / variant).read_text(errors="replace").splitlines():
                words = line.split()
                if len(words) > 1 and words[0] == "gender":
                    return "F" if words[1].lower().startswith("f") else "M"
        return "M"

    def synth(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int,
              seed: int = 0) -> tuple[np.ndarray, list[Event]]:
        """int16 samples at 22050 Hz and the WORD/PHONEME events of one utterance.

        ``seed`` reseeds eSpeak's noise generator (breath noise of some variants, Klatt
        aspiration), which espeak_Initialize seeds from the clock, and libc's ``rand()``.
        """
        self._lib.espeak_ng_SetRandSeed(seed)
        self._libc.srand(ctypes.c_uint(seed))
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        for param, value in ((_PARAM_RATE, rate), (_PARAM_PITCH, pitch), (_PARAM_RANGE, pitch_range)):
            self._lib.espeak_SetParameter(param, int(value), 0)
        self._chunks, self._events = [], []
        data = text.encode()
        status = self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed with status {status} on {text!r}")
        audio = np.frombuffer(b"".join(self._chunks), dtype=np.int16).copy()
        return audio, self._events


def _chapter_worker() -> None:
    """Body of the fresh interpreter that synthesises one chapter: JSON job on stdin, npz on stdout."""
    job = json.loads(sys.stdin.buffer.read())
    espeak = ESpeak()
    audio, lengths, events, names = [], [], [], []
    for i, utt in enumerate(job["utterances"]):
        wav, evs = espeak.synth(utt["text"], job["voice"], utt["rate"], utt["pitch"], job["range"], utt["seed"])
        audio.append(wav)
        lengths.append(len(wav))
        events.extend((i, *e[:4]) for e in evs)
        names.extend(e[4] for e in evs)
    buf = io.BytesIO()
    np.savez(buf, audio=np.concatenate(audio), lengths=np.array(lengths, dtype=np.int64),
             events=np.array(events, dtype=np.int64).reshape(-1, 5), names=np.array(names, dtype=str),
             version=np.array(espeak.version))
    sys.stdout.buffer.write(buf.getvalue())


def _run_worker(job: Mapping[str, Any]) -> tuple[list[np.ndarray], list[list[Event]], str]:
    """Run :func:`_chapter_worker` in a fresh interpreter; per-utterance audio, events, eSpeak version."""
    cmd = [sys.executable, "-c", "from asrbench.data.synth import _chapter_worker; _chapter_worker()"]
    proc = subprocess.run(cmd, input=json.dumps(job).encode(), capture_output=True, cwd=_PACKAGE_PARENT)
    if proc.returncode != 0:
        raise RuntimeError(f"eSpeak NG worker for voice {job['voice']!r} failed:\n"
                           f"{proc.stderr.decode(errors='replace')}")
    with np.load(io.BytesIO(proc.stdout), allow_pickle=False) as npz:
        out = {k: npz[k] for k in npz.files}  # each npz[k] reads the array anew
    audio = np.split(out["audio"], np.cumsum(out["lengths"])[:-1])
    events: list[list[Event]] = [[] for _ in audio]
    for (utt, etype, pos, length, sample), name in zip(out["events"].tolist(), out["names"].tolist()):
        events[utt].append((etype, pos, length, sample, name))
    return audio, events, str(out["version"])


def check_voices(voices: Sequence[str], text: str = "and the cry of jerusalem is gone up") -> dict[str, bool]:
    """Which voices give byte-identical audio when the same job runs in two fresh processes.

    Each voice's job reads ``text`` twice, the second time after the state the first left, as a
    chapter does. A voice that fails (randomness that the seeds here do not reach) must not be
    used in a corpus.
    """
    job = {"voice": "", "range": 50, "utterances": []}
    runs = []
    for _ in range(2):
        audio: list[np.ndarray] = []
        for voice in voices:
            job.update(voice=voice, utterances=[{"text": text, "rate": 175, "pitch": 50, "seed": 1}] * 2)
            audio.extend(_run_worker(job)[0])
        runs.append(audio)
    return {v: all(np.array_equal(runs[0][2 * i + k], runs[1][2 * i + k]) for k in range(2))
            for i, v in enumerate(voices)}


# ------------------------------------------------------------------ timings from events
def _strip_stress(name: str) -> str:
    return name.lstrip("',%=")


def align_events(words: Sequence[str], events: Sequence[Event], n_samples: int) -> tuple[
        list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """Word and phoneme intervals, in eSpeak samples, from one utterance's events (rules 1-4 above).

    ``words`` is the transcript as spoken (``" ".join(words)`` was given to eSpeak, so event
    character positions index it, 1-based). Raises ValueError when a word group has fewer
    phonemes than words.
    """
    starts, pos = [], 1
    for w in words:
        starts.append(pos)
        pos += len(w) + 1

    def word_of(text_position: int) -> int:
        return max(bisect.bisect_right(starts, text_position) - 1, 0)

    # Rule 1: [name, start, end, word index or -1 for a pause]
    phon = [e for e in events if e[0] == EVENT_PHONEME]
    segs = []
    for k, (_, text_position, _, sample, name) in enumerate(phon):
        end = phon[k + 1][3] if k + 1 < len(phon) else n_samples
        assert sample <= end <= n_samples, (sample, end, n_samples)
        segs.append([_strip_stress(name), sample, end, -1 if name.startswith("_") else word_of(text_position)])

    # Rule 2: a run of zero-length phonemes shares the preceding phoneme's interval.
    k = 0
    while k < len(segs):
        run = k
        while run < len(segs) and segs[run][3] >= 0 and segs[run][1] == segs[run][2]:
            run += 1
        if run > k and k > 0 and segs[k - 1][3] >= 0:
            a, b, parts = segs[k - 1][1], segs[k - 1][2], run - k + 1
            cuts = [a + (b - a) * i // parts for i in range(parts + 1)]
            for i, m in enumerate(range(k - 1, run)):
                segs[m][1], segs[m][2] = cuts[i], cuts[i + 1]
        k = max(run, k + 1)
    segs = [s for s in segs if s[2] > s[1]]

    # Rule 3: a WORD event inside the preceding interval moves the word's start back to it.
    first = {}
    for i, s in enumerate(segs):
        if s[3] >= 0:
            first.setdefault(s[3], i)
    for etype, text_position, _, sample, _ in events:
        i = first.get(word_of(text_position)) if etype == EVENT_WORD else None
        if i is None or sample >= segs[i][1]:
            continue
        if i == 0:
            segs[0][1] = sample
        elif segs[i - 1][1] < sample:
            segs[i - 1][2] = segs[i][1] = sample
    phonemes = [(s[0], s[1], s[2]) for s in segs if s[3] >= 0]
    owner = [s[3] for s in segs if s[3] >= 0]

    # Rule 4: words without phonemes of their own share those of the preceding word.
    spans: list[tuple[str, int, int]] = []
    j = 0
    while j < len(words):
        group = j + 1
        while group < len(words) and group not in first:
            group += 1
        idx = [i for i, o in enumerate(owner) if j <= o < group]
        n_words, n_ph = group - j, len(idx)
        if n_ph < n_words:
            raise ValueError(f"eSpeak gave {n_ph} phonemes for the {n_words} word(s) "
                             f"{' '.join(words[j:group])!r}; use another sentence or voice")
        letters = np.cumsum([len(w) for w in words[j:group]])
        cut = [0]
        for m in range(1, n_words):
            c = round(n_ph * letters[m - 1] / letters[-1])
            cut.append(min(max(c, cut[-1] + 1), n_ph - (n_words - m)))
        cut.append(n_ph)
        for m in range(n_words):
            part = idx[cut[m]:cut[m + 1]]
            spans.append((words[j + m], phonemes[part[0]][1], phonemes[part[-1]][2]))
        j = group
    assert len(spans) == len(words)
    assert all(a < b for _, a, b in spans) and all(p[2] <= q[1] for p, q in zip(spans, spans[1:]))
    return spans, phonemes


# ------------------------------------------------------------------ config and plan
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


# ------------------------------------------------------------------ writing
def _render(wav: np.ndarray, utt: UtterancePlan, resample: Any) -> np.ndarray:
    """eSpeak int16 at 22050 Hz -> int16 at the corpus rate: resample, peak level, padding, noise."""
    import torch

    y = resample(torch.from_numpy(wav.astype(np.float32) / 32768.0)).numpy().astype(np.float64)
    y *= 10 ** (utt.peak_dbfs / 20) / max(np.abs(y).max(), 1e-9)
    noise_std = math.sqrt(float(np.mean(y**2)) / 10 ** (utt.snr_db / 10))
    out = np.concatenate([np.zeros(utt.pad[0]), y, np.zeros(utt.pad[1])])
    out += noise_std * np.random.default_rng((*utt.key, 1)).standard_normal(len(out))
    return np.clip(np.rint(out * 32768), -32768, 32767).astype(np.int16)


def _write_chapter(chapter: ChapterPlan, cfg: Mapping[str, Any], root: Path) -> None:
    """Synthesise one chapter in a fresh process and write it into place atomically."""
    import soundfile as sf
    import torchaudio

    sr = cfg["sample_rate"]
    resample = torchaudio.transforms.Resample(ESPEAK_RATE, sr)  # windowed sinc, kernel computed once
    spk = chapter.speaker
    job = {"voice": spk.voice, "range": spk.range,
           "utterances": [{"text": u.text.lower(), "rate": u.rate, "pitch": u.pitch, "seed": u.espeak_seed}
                          for u in chapter.utterances]}
    audio, events, _ = _run_worker(job)
    final = chapter.directory(root)
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lines, timings = [], []
    for utt, wav, evs in zip(chapter.utterances, audio, events):
        pcm = _render(wav, utt, resample)
        sf.write(tmp / f"{utt.utt_id}.flac", pcm, sr, format="FLAC", subtype="PCM_16")
        spans, phonemes = align_events(utt.text.split(), evs, len(wav))
        lead = utt.pad[0] / sr

        def seconds(sample: int) -> float:
            return round(lead + sample / ESPEAK_RATE, 4)

        entry = {"duration": round(len(pcm) / sr, 4),
                 "words": [[w, seconds(a), seconds(b)] for w, a, b in spans],
                 "phonemes": [[p, seconds(a), seconds(b)] for p, a, b in phonemes]}
        lines.append(f"{utt.utt_id} {utt.text}\n")
        timings.append(f"{json.dumps(utt.utt_id)}: {json.dumps(entry)}")
    prefix = f"{spk.id}-{chapter.id}"
    (tmp / f"{prefix}.trans.txt").write_text("".join(lines), encoding="utf-8")
    (tmp / f"{prefix}.align.json").write_text("{\n" + ",\n".join(timings) + "\n}\n", encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _write_chapters(chapters: Sequence[ChapterPlan], cfg: Mapping[str, Any], root: Path, progress: bool) -> None:
    """Write chapters on ``workers`` threads, each driving one eSpeak process at a time.

    torch runs one intra-op thread meanwhile: the chapters are the parallelism, and resampling
    gives the same floats whatever the machine's core count.
    """
    import torch
    from tqdm.auto import tqdm

    workers = min(cfg["workers"] or os.cpu_count() or 1, len(chapters))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool, tqdm(total=sum(len(c.utterances) for c in chapters), unit="utt",
                                                       desc=f"synthesising {root.name}", disable=not progress) as bar:
            futures = {pool.submit(_write_chapter, c, cfg, root): c for c in chapters}
            try:
                for future in as_completed(futures):
                    future.result()
                    bar.update(len(futures[future].utterances))
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        torch.set_num_threads(threads)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove_corpus(root: Path) -> None:
    """Delete what generate_corpus writes under root, .done first so a crash leaves no complete marker."""
    (root / ".done").unlink(missing_ok=True)
    for split in SPLITS:
        shutil.rmtree(root / split, ignore_errors=True)
    for name in ("SPEAKERS.TXT", "manifest.json"):
        (root / name).unlink(missing_ok=True)


def _summary(chapters: Sequence[ChapterPlan], root: Path) -> tuple[dict[str, Any], dict[tuple[int, str], float]]:
    """Per-split counts and hours, and seconds per (speaker, split), from the written align.json files."""
    splits: dict[str, Any] = {}
    seconds: dict[tuple[int, str], float] = {}
    for ch in chapters:
        path = ch.directory(root) / f"{ch.speaker.id}-{ch.id}.align.json"
        entries = json.loads(path.read_text(encoding="utf-8"))
        dur = sum(e["duration"] for e in entries.values())
        s = splits.setdefault(ch.split, {"speakers": [], "chapters": 0, "utterances": 0, "words": 0, "seconds": 0.0})
        if ch.speaker.id not in s["speakers"]:
            s["speakers"].append(ch.speaker.id)
        s["chapters"] += 1
        s["utterances"] += len(entries)
        s["words"] += sum(len(e["words"]) for e in entries.values())
        s["seconds"] += dur
        seconds[ch.speaker.id, ch.split] = seconds.get((ch.speaker.id, ch.split), 0.0) + dur
    for s in splits.values():
        s["hours"] = round(s["seconds"] / 3600, 4)
        s["seconds"] = round(s["seconds"], 2)
    return splits, seconds


def _speakers_txt(speakers: Sequence[Speaker], sexes: Mapping[int, str], seconds: Mapping[tuple[int, str], float],
                  version: str) -> str:
    rows = [f"; Synthetic speakers: eSpeak NG {version} voices (language+variant); see manifest.json for the config.",
            "; SUBSET is the speaker's own subset; training speakers also read test_seen, not counted in MINUTES.",
            "; RATE: base words/minute; PITCH, RANGE: eSpeak base pitch and pitch range (0-100, 50 = the voice's own).",
            ";ID  |SEX| SUBSET | MINUTES | VOICE                    | RATE | PITCH | RANGE"]
    for s in speakers:
        minutes = seconds.get((s.id, s.role), 0.0) / 60
        rows.append(f"{s.id:<5}| {sexes[s.id]} | {s.role:<6} | {minutes:7.2f} | {s.voice:<24} | {s.rate:4d} "
                    f"| {s.pitch:5d} | {s.range:5d}")
    return "\n".join(rows) + "\n"


def _finished(root: Path, config_sha: str) -> dict[str, Any] | None:
    """The manifest of a complete corpus generated with this config hash, else None."""
    manifest = _read_manifest(root)
    if manifest is not None and manifest.get("config_sha256") == config_sha and (root / ".done").is_file():
        return manifest
    return None


def generate_corpus(root: str | Path, cfg: Mapping, *, progress: bool = True) -> dict:
    """Generate the synthetic corpus under ``root`` unless it is already there; return its manifest.

    ``cfg`` is the ``data.synth`` section (DictConfig or plain mapping). Raises
    :class:`SynthConfigError` (a ValueError) for a bad config: a missing or unknown key, a value
    out of range, an unknown voice, too few sentences; :class:`CorpusExistsError` when root holds
    split directories or a manifest.json that this module did not write. Concurrent calls on one
    root (e.g. one per training process) wait for each other through ``<root>/.lock``. See the
    module docstring for the layout, the timing rules and what a rerun does.
    """
    root = Path(root)
    cfg = _check_config(cfg)
    path = _sentences_path(cfg["sentences"])
    espeak = ESpeak()
    sentences_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    identity = {"format_version": FORMAT_VERSION, "espeak_ng": espeak.version, "sentences_sha256": sentences_sha,
                "config": {k: v for k, v in cfg.items()
                           if k not in _UNHASHED_KEYS and not (k in _OPTIONAL_KEYS and v == _OPTIONAL_KEYS[k])}}
    config_sha = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    done = _finished(root, config_sha)
    if done is not None:
        return done

    for n, spk in enumerate(cfg["speakers"]):
        if not espeak.has_voice(spk["voice"]):
            raise SynthConfigError(f"data.synth.speakers[{n}].voice={spk['voice']!r} is not an eSpeak NG voice; "
                                   f"use language[+variant] from {espeak.data_path}/lang and "
                                   f"{espeak.data_path}/voices/!v")
    sentences = read_sentences(path, cfg["max_words"], cfg["vocabulary"])
    chapters = plan_corpus(cfg, sentences)
    old = _read_manifest(root)
    if old is None or "config_sha256" not in old:
        foreign = [name for name in (*SPLITS, "manifest.json") if (root / name).exists()]
        if foreign:
            raise CorpusExistsError(f"{root} already holds {', '.join(foreign)} not written by asrbench's "
                                    f"synthesiser; choose another data.root or remove them")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = _finished(root, config_sha)  # another process may have finished it meanwhile
        if done is not None:
            return done
        old = _read_manifest(root)
        if old is not None and old.get("config_sha256") != config_sha:
            log.warning("%s holds a corpus generated with another config; regenerating it", root)
            _remove_corpus(root)
        return _generate(root, cfg, chapters, espeak, config_sha, sentences_sha, len(sentences), progress)


def _generate(root: Path, cfg: Mapping[str, Any], chapters: Sequence[ChapterPlan], espeak: ESpeak, config_sha: str,
              sentences_sha: str, distinct: int, progress: bool) -> dict[str, Any]:
    """Write the missing chapters, then SPEAKERS.TXT, the manifest and .done."""
    speakers = [Speaker(**s) for s in cfg["speakers"]]
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "complete": False, "config_sha256": config_sha, "config": cfg,
        "seed": cfg["seed"], "sample_rate": cfg["sample_rate"],
        "sentences": {"path": str(cfg["sentences"]), "sha256": sentences_sha, "distinct": distinct,
                      "used": sum(len(c.utterances) for c in chapters)},
        "espeak_ng": espeak.version,
        "speakers": [{"id": s.id, "sex": espeak.variant_sex(s.voice), "voice": s.voice, "role": s.role,
                      "splits": list(ROLE_SPLITS[s.role]), "rate": s.rate, "pitch": s.pitch, "range": s.range}
                     for s in speakers],
    }
    _write_json(root / "manifest.json", manifest)
    todo = [c for c in chapters if not c.directory(root).is_dir()]
    if todo:
        _write_chapters(todo, cfg, root, progress)
    splits, seconds = _summary(chapters, root)
    sexes = {s["id"]: s["sex"] for s in manifest["speakers"]}
    (root / "SPEAKERS.TXT").write_text(_speakers_txt(speakers, sexes, seconds, espeak.version), encoding="utf-8")
    manifest.update(complete=True, splits=splits, hours=round(sum(s["hours"] for s in splits.values()), 4))
    _write_json(root / "manifest.json", manifest)
    (root / ".done").write_text(config_sha + "\n")
    return manifest

if __name__ == "__main__":
    # python -m asrbench.data.synth VOICE...: which voices are reproducible in fresh processes.
    for voice, ok in check_voices(sys.argv[1:]).items():
        print(f"{voice}\t{'reproducible' if ok else 'NOT reproducible'}")
