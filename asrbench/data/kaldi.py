"""Reading Kaldi data directories (as Kaldi, ESPnet and k2 recipes write them).

    <root>/<subset>/wav.scp    <recording-id> <audio file>         or  <recording-id> <command> |
    <root>/<subset>/text       <utterance-id> <words...>
    <root>/<subset>/segments   <utterance-id> <recording-id> <start_s> <end_s>    (optional)
    <root>/<subset>/utt2spk    <utterance-id> <speaker-id>                        (optional)

Without `segments` each recording is one utterance named by its recording id, read exactly as
the LibriSpeech reader reads a file (same samples, same cache key). With it, an utterance is
the span [start, end) of its recording (`end` -1: to the recording's end); a span that ends up
to MAX_OVERSHOOT_S past the recording is cut at the end, as Kaldi's extract-segments does, and
one that ends further out is a bad utterance (`data.on_bad_utterance`). Relative paths in
wav.scp are read from the directory asrbench runs in, as Kaldi reads them.

A wav.scp command (`sph2pipe -f wav x.sph |`) is refused unless `allow_pipes` is set: it runs
a shell command per utterance, and the cache key can only record its text, not the files it
reads. Transcripts are normalised like LibriSpeech's; an empty one is kept with `text == ""`.
"""
from __future__ import annotations

import io
import os
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from asrbench.data import text as textlib
from asrbench.data.features import file_stamp
from asrbench.data.utterance import AUDIO_SUFFIXES, Utterance, one_line, subdirs
from asrbench.errors import CorpusError

MAX_OVERSHOOT_S = 0.5  # s; Kaldi extract-segments' --max-overshoot default


def data_dir(root: str | Path, subset: str) -> Path:
    """`<root>/<subset>`, a directory holding at least wav.scp and text."""
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"data root {root} does not exist; set data.root to the directory holding the "
                          f"Kaldi data directories (a recipe's data/)")
    path = root / subset
    if not (path / "wav.scp").is_file():
        found = [d for d in subdirs(root) if (root / d / "wav.scp").is_file()]
        what = "no wav.scp" if path.is_dir() else "directory not found"
        raise CorpusError(f"{path}: {what}; Kaldi data directories under {root}: {', '.join(found) or 'none'}; "
                          f"fix data.root or the *_subsets lists")
    return path


def _table(path: Path, fields: int, what: str) -> list[tuple[int, list[str]]]:
    """Lines of a Kaldi table file split into `fields` fields (the last takes the rest of the line)."""
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{path}: cannot read ({one_line(exc)}); restore it") from None
    rows = []
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=fields - 1)
        if len(parts) < fields and not (what.endswith("[words...]") and len(parts) == 1):
            raise CorpusError(f"{path}:{lineno}: expected `{what}`, got {line.strip()!r}; fix the line")
        rows.append((lineno, parts))
    return rows


def _unique(path: Path, rows: list[tuple[int, list[str]]], kind: str) -> dict[str, tuple[int, list[str]]]:
    out: dict[str, tuple[int, list[str]]] = {}
    for lineno, parts in rows:
        if parts[0] in out:
            raise CorpusError(f"{path}:{lineno}: {kind} {parts[0]} appears twice (first on line "
                              f"{out[parts[0]][0]}); keep one line per {kind}")
        out[parts[0]] = (lineno, parts)
    return out


@dataclass(frozen=True)
class SegmentSource:
    """The span [start_s, end_s) of an audio file; end_s None: to the file's end."""

    path: Path
    start_s: float
    end_s: float | None
    where: str  # "line N of <segments>", for messages

    def samples(self) -> tuple[torch.Tensor, int]:
        try:
            with sf.SoundFile(str(self.path)) as f:
                sample_rate, total = f.samplerate, f.frames
                start, end = _span(self.path, self.start_s, self.end_s, sample_rate, total, self.where)
                f.seek(start)
                data = f.read(end - start, dtype="float32", always_2d=True)
        except (RuntimeError, OSError, ValueError) as exc:  # soundfile.LibsndfileError is a RuntimeError
            raise CorpusError(f"{self.path}: unreadable audio ({one_line(exc)}); re-extract or re-download "
                              f"it") from None
        if len(data) < end - start:
            raise CorpusError(f"{self.path}: truncated audio ({start + len(data)} of {total} samples); "
                              f"re-extract or re-download it")
        return _mono(data), sample_rate

    def stamp(self) -> str:
        return f"{file_stamp(self.path)}\t{self.start_s!r}\t{self.end_s!r}"

    def fbank(self, cfg: object) -> None:
        return None


@dataclass(frozen=True)
class PipeSource:
    """A wav.scp command's standard output (WAV), or the span [start_s, end_s) of it."""

    command: str
    wav_scp: Path
    start_s: float = 0.0
    end_s: float | None = None
    where: str = ""

    def samples(self) -> tuple[torch.Tensor, int]:
        data, sample_rate = _run_pipe(self.command, self.wav_scp)
        if self.start_s == 0.0 and self.end_s is None:
            return torch.from_numpy(data), sample_rate
        start, end = _span(self.wav_scp, self.start_s, self.end_s, sample_rate, len(data), self.where)
        return torch.from_numpy(data[start:end].copy()), sample_rate

    def stamp(self) -> str:
        return f"pipe\t{self.command}\t{self.start_s!r}\t{self.end_s!r}"

    def fbank(self, cfg: object) -> None:
        return None


def _mono(data: np.ndarray) -> torch.Tensor:
    mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(mono))


def _span(path: Path, start_s: float, end_s: float | None, sample_rate: int, total: int,
          where: str) -> tuple[int, int]:
    """Sample indices [start, end) of a segment, or a CorpusError when it lies beyond the recording."""
    start = round(start_s * sample_rate)
    end = total if end_s is None else round(end_s * sample_rate)
    if end > total + MAX_OVERSHOOT_S * sample_rate or start >= total:
        raise CorpusError(f"{path}: segment beyond recording end ({start_s:.2f}-"
                          f"{'end' if end_s is None else f'{end_s:.2f}'} s of a {total / sample_rate:.2f} s "
                          f"recording, {where}); fix its times in segments")
    return start, min(end, total)


@lru_cache(maxsize=2)  # consecutive segments of one recording run its command once
def _run_pipe(command: str, wav_scp: Path) -> tuple[np.ndarray, int]:
    try:
        proc = subprocess.run(command, shell=True, capture_output=True, check=False)
    except OSError as exc:
        raise CorpusError(f"{wav_scp}: unreadable audio (command {command!r}: {one_line(exc)}); fix the "
                          f"command") from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise CorpusError(f"{wav_scp}: unreadable audio (command {command!r} exited {proc.returncode}"
                          f"{': ' + err[-1] if err else ''}); fix the command")
    try:
        data, sample_rate = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError) as exc:
        raise CorpusError(f"{wav_scp}: unreadable audio (output of {command!r}: {one_line(exc)}); make the "
                          f"command write WAV to its standard output") from None
    return _mono(data).numpy(), sample_rate


def _decoded_file(command: str) -> Path | None:
    """The one existing FLAC or WAV file a wav.scp command reads, if it names exactly one."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    files = {Path(os.path.abspath(w)) for w in words if w.lower().endswith(AUDIO_SUFFIXES)}
    files = {f for f in files if f.is_file()}
    return files.pop() if len(files) == 1 else None


def _recordings(ddir: Path, allow_pipes: bool) -> dict[str, tuple[Path, str | None, int]]:
    """Recording id -> (audio path or wav.scp, pipe command or None, wav.scp line)."""
    wav_scp = ddir / "wav.scp"
    out = {}
    for rec, (lineno, (_, where)) in _unique(wav_scp, _table(wav_scp, 2, "<recording-id> <audio file>"),
                                                "recording").items():
        where = where.strip()
        if where.endswith("|"):
            if not allow_pipes:
                readable = _decoded_file(where[:-1])
                if readable is not None:  # e.g. lhotse's export_to_kaldi: `ffmpeg ... -i x.flac ... - |`
                    raise CorpusError(f"{wav_scp}:{lineno}: recording {rec} is a command that decodes {readable}, "
                                      f"a file asrbench reads itself; list the file instead (`{rec} {readable}`), "
                                      f"or set data.allow_pipes=true to run the command")
                raise CorpusError(f"{wav_scp}:{lineno}: recording {rec} is a command ({where!r}), not an audio "
                                  f"file; write each recording to a file (e.g. `sph2pipe -f wav {rec}.sph "
                                  f"{rec}.wav`) and list the files in wav.scp, or set data.allow_pipes=true to "
                                  f"run the commands")
            out[rec] = (wav_scp, where[:-1].strip(), lineno)
            continue
        path = Path(os.path.abspath(where))
        if not path.is_file():
            raise CorpusError(f"{wav_scp}:{lineno}: audio file {path} of recording {rec} does not exist; fix "
                              f"the path (relative paths are read from {os.getcwd()}) or delete the line")
        out[rec] = (path, None, lineno)
    return out


def scan_dir(ddir: Path, allow_pipes: bool = False) -> list[Utterance]:
    """Every utterance of one Kaldi data directory, in file order."""
    recordings = _recordings(ddir, allow_pipes)
    text_path, seg_path, spk_path = ddir / "text", ddir / "segments", ddir / "utt2spk"
    if not text_path.is_file():
        raise CorpusError(f"{text_path}: missing; write `<utterance-id> <words...>` lines (the transcripts) "
                          f"beside wav.scp")
    texts = _unique(text_path, _table(text_path, 2, "<utterance-id> [words...]"), "utterance")
    # utterance id -> (recording id, start_s, end_s or None, where)
    spans: dict[str, tuple[str, float, float | None, str]] = {}
    listed_in = ddir / "wav.scp"
    if seg_path.is_file():
        listed_in = seg_path
        rows = _table(seg_path, 4, "<utterance-id> <recording-id> <start_s> <end_s>")
        for utt, (lineno, parts) in _unique(seg_path, rows, "utterance").items():
            rec, start_s, end_s = parts[1], *_times(seg_path, lineno, parts[2], parts[3].split()[0])
            if rec not in recordings:
                raise CorpusError(f"{seg_path}:{lineno}: utterance {utt} refers to recording {rec}, which "
                                  f"{ddir / 'wav.scp'} does not list; add the recording or delete the line")
            spans[utt] = (rec, start_s, end_s, f"line {lineno} of {seg_path}")
    else:
        spans = {rec: (rec, 0.0, None, "") for rec in recordings}
    for utt, (lineno, _) in texts.items():
        if utt not in spans:
            raise CorpusError(f"{text_path}:{lineno}: utterance {utt} is not in {listed_in}; delete the line or "
                              f"add the utterance there")
    for utt in spans:
        if utt not in texts:
            raise CorpusError(f"{listed_in}: no transcript line for utterance {utt} in {text_path}; add the "
                              f"line or remove the utterance")
    speakers = {utt: utt for utt in spans}
    if spk_path.is_file():
        given = _unique(spk_path, _table(spk_path, 2, "<utterance-id> <speaker-id>"), "utterance")
        for utt, (lineno, parts) in given.items():
            if utt not in spans:
                raise CorpusError(f"{spk_path}:{lineno}: utterance {utt} is not in {listed_in}; delete the line "
                                  f"or add the utterance there")
            speakers[utt] = parts[1].strip()
        missing = [utt for utt in spans if utt not in given]
        if missing:  # Kaldi's validate_data_dir.sh refuses this too: every utterance has a speaker
            raise CorpusError(f"{spk_path}: no line for utterance {missing[0]}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''} of {listed_in}; "
                              f"add `<utterance-id> <speaker-id>` lines for every utterance or delete {spk_path.name}")
    utts = []
    for utt, (rec, start_s, end_s, where) in spans.items():
        path, command, _ = recordings[rec]
        if command is not None:
            source = PipeSource(command, path, start_s, end_s, where)
        elif start_s == 0.0 and end_s is None:
            source = None  # the whole file: read as the LibriSpeech reader reads it
        else:
            source = SegmentSource(path, start_s, end_s, where)
        words = texts[utt][1][1] if len(texts[utt][1]) > 1 else ""
        utts.append(Utterance(utt, speakers[utt], rec, path, textlib.normalize(words), text_path, source))
    return utts


def _times(path: Path, lineno: int, start: str, end: str) -> tuple[float, float | None]:
    try:
        start_s, end_s = float(start), float(end)
    except ValueError:
        start_s = end_s = float("nan")
    if not (start_s >= 0 and (end_s == -1 or end_s > start_s)):
        raise CorpusError(f"{path}:{lineno}: segment times {start} {end} are not seconds with 0 <= start < end "
                          f"(end -1: to the recording's end); fix the line")
    return start_s, None if end_s == -1 else end_s


def scan_kaldi(root: str | Path, subsets: Sequence[str], allow_pipes: bool = False) -> list[Utterance]:
    """Every utterance of the data directories `<root>/<subset>`, sorted by utterance id.

    Raises CorpusError for a missing directory or file, a malformed or duplicate line, a line
    naming an unknown utterance or recording, an utterance without a transcript, a wav.scp
    command without `allow_pipes`, or an utterance id found in two directories.
    """
    if isinstance(subsets, str):
        subsets = [subsets]
    utts: dict[str, Utterance] = {}
    for subset in subsets:
        ddir = data_dir(root, subset)
        found = scan_dir(ddir, allow_pipes)
        for utt in found:
            if utt.utt_id in utts:
                raise CorpusError(f"{ddir}: utterance id {utt.utt_id} also names one in "
                                  f"{utts[utt.utt_id].transcript_file.parent}; list each data directory once "
                                  f"and keep ids unique")
            utts[utt.utt_id] = utt
        if not found:
            raise CorpusError(f"{ddir}: no utterances (wav.scp and text are empty); check data.root and the "
                              f"*_subsets lists")
    return [utts[u] for u in sorted(utts)]
