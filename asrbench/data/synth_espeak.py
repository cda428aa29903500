"""eSpeak NG through ctypes, and the fresh interpreter that synthesises one chapter.

eSpeak NG carries synthesiser state from one utterance to the next, so every chapter runs in a
fresh process with eSpeak's and libc's random generators reseeded before each utterance (see
Reproducibility in :mod:`asrbench.data.synth`).
"""
from __future__ import annotations

import ctypes
import io
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ESPEAK_RATE = 22050  # Hz, eSpeak NG's fixed output rate
_PACKAGE_PARENT = Path(__file__).resolve().parents[2]


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
    cmd = [sys.executable, "-c", "from asrbench.data.synth_espeak import _chapter_worker; _chapter_worker()"]
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

