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
from pathlib import Path

from asrbench.data import text as textlib
from asrbench.data.utterance import AUDIO_SUFFIXES, Utterance, one_line, subdirs
from asrbench.errors import CorpusError


def subset_dir(root: str | Path, subset: str) -> Path:
    """`<root>/LibriSpeech/<subset>` or `<root>/<subset>`, whichever exists."""
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"data root {root} does not exist; set data.root to the directory holding "
                          f"LibriSpeech/<subset>/ or the <subset>/ directories")
    for candidate in (root / "LibriSpeech" / subset, root / subset):
        if candidate.is_dir():
            return candidate
    found = sorted(set(subdirs(root)) | set(subdirs(root / "LibriSpeech")) - {"LibriSpeech"})
    raise CorpusError(f"subset {subset!r} not found under {root} (looked for {root / 'LibriSpeech' / subset} "
                      f"and {root / subset}); found: {', '.join(found) or 'nothing'}; fix data.root or the "
                      f"*_subsets lists")


def _read_transcripts(path: Path) -> dict[str, str]:
    lines: dict[str, str] = {}
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{path}: cannot read transcript file ({one_line(exc)}); restore it") from None
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
        for speaker in subdirs(sdir):
            for chapter in subdirs(sdir / speaker):
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
            raise CorpusError(f"{path}: malformed alignment file ({one_line(exc)}); expected "
                              f'{{utt_id: {{"words": [[WORD, start_s, end_s], ...]}}}}; regenerate it') from None
    return timings
