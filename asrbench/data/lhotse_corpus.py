"""Reading lhotse manifests (as icefall and many newer recipes write them), with lhotse itself.

For each subset name S, `<root>` holds either a CutSet

    <root>/[<prefix>]cuts_S.jsonl.gz                  (icefall's data/fbank/librispeech_cuts_S.jsonl.gz)

or a recording set and a supervision set

    <root>/[<prefix>]recordings_S.jsonl.gz  and  <root>/[<prefix>]supervisions_S.jsonl.gz

(`.jsonl` works as well). Each supervision is one utterance named by its id, the span of its
recording that it covers; its audio is read by lhotse's loader, and its text is normalised
like LibriSpeech's. A span that ends up to MAX_OVERSHOOT_S past its recording is cut at the
end, one that ends further out is a bad utterance (`data.on_bad_utterance`).

With `precomputed_features`, the fbank frames stored in the cuts are used instead of the audio.
They must follow the convention of the features asrbench computes (`features.*`): Kaldi log-mel
filterbanks of samples scaled to 16-bit integers (`features.waveform_scale`), 80 bins every 10 ms
at 16 kHz by default, with Kaldi's `snip_edges=true` framing (1 + (samples - window) // shift
frames). The bins, shift and rate a cut records, and its frame count against its duration, are
checked; a mismatch (lhotse's own Fbank frames with snip_edges=false, 2 frames more) is refused in
one line. What cannot be checked is the sample scale: lhotse's extractors read samples in [-1, 1],
which shifts every log-mel value by log(32768^2) = -20.8; such features train, but not like
asrbench's own, so compute them with Kaldi's scale or let asrbench compute them from the audio.
lhotse is an optional dependency: `pip install 'asrbench[lhotse]'`.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asrbench.data import text as textlib
from asrbench.data.features import FeatureConfig, file_stamp
from asrbench.data.kaldi import MAX_OVERSHOOT_S
from asrbench.data.utterance import Utterance, one_line
from asrbench.errors import ConfigError, CorpusError

SUFFIXES = (".jsonl.gz", ".jsonl")


def import_lhotse() -> Any:
    try:
        import lhotse
    except ImportError as exc:
        raise ConfigError(f"data=lhotse reads manifests with lhotse, which cannot be imported ({one_line(exc)}); "
                          f"install it with `pip install 'asrbench[lhotse]'`") from None
    return lhotse


def manifest_files(root: str | Path, subset: str, prefix: str = "") -> dict[str, Path]:
    """`{"cuts": path}` or `{"recordings": path, "supervisions": path}` of one subset."""
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"data root {root} does not exist; set data.root to the directory holding the lhotse "
                          f"manifests (*cuts_<subset>.jsonl.gz or *recordings_/*supervisions_<subset>.jsonl.gz)")

    def find(kind: str) -> Path | None:
        found = sorted(p for p in root.glob(f"{prefix}*{kind}_{subset}.jsonl*")
                       if p.name.endswith(SUFFIXES) and p.name.rsplit(f"{kind}_{subset}", 1)[1] in SUFFIXES)
        if len(found) > 1:
            raise CorpusError(f"{root}: {len(found)} manifests match {kind}_{subset} ({', '.join(p.name for p in found)}); "
                              f"set data.prefix to the one to read")
        return found[0] if found else None

    cuts, recordings, supervisions = find("cuts"), find("recordings"), find("supervisions")
    if cuts is not None:
        return {"cuts": cuts}
    if recordings is not None and supervisions is not None:
        return {"recordings": recordings, "supervisions": supervisions}
    if recordings is not None or supervisions is not None:
        have, lack = ("recordings", "supervisions") if recordings is not None else ("supervisions", "recordings")
        raise CorpusError(f"{recordings or supervisions}: {have} of subset {subset!r} without {lack} "
                          f"({prefix}*{lack}_{subset}.jsonl.gz) or a CutSet ({prefix}*cuts_{subset}.jsonl.gz) "
                          f"in {root}; write the missing manifest")
    listing = sorted(p.name for p in root.iterdir() if p.name.endswith(SUFFIXES))
    raise CorpusError(f"{root}: no manifests of subset {subset!r} ({prefix}*cuts_{subset}.jsonl.gz, or "
                      f"{prefix}*recordings_ and *supervisions_{subset}.jsonl.gz); found: "
                      f"{', '.join(listing) or 'none'}; fix data.root or the *_subsets lists")


def _items(lhotse: Any, path: Path, kind: type) -> Iterator[Any]:
    try:
        manifest = lhotse.load_manifest_lazy(path)
        if not isinstance(manifest, kind):
            raise CorpusError(f"{path}: a {type(manifest).__name__}, expected a {kind.__name__}; rename the file "
                              f"after what it holds")
        yield from manifest
    except CorpusError:
        raise
    except Exception as exc:  # lhotse and its decoders raise anything on a damaged manifest
        raise CorpusError(f"{path}: not a readable lhotse manifest ({one_line(exc)}); write it again") from None


def _audio_path(recording: Any, manifest: Path) -> Path:
    """The recording's audio file, checked to exist; the manifest for audio that is not a file."""
    files = [s.source for s in recording.sources if s.type == "file"]
    if not files:
        return manifest
    path = Path(os.path.abspath(files[0]))
    if not path.is_file():
        raise CorpusError(f"{manifest}: audio file {path} of recording {recording.id} does not exist; restore "
                          f"it or fix the path (relative paths are read from {os.getcwd()})")
    return path


@dataclass(frozen=True)
class CutSource:
    """One supervision's span of a lhotse cut, read with lhotse."""

    cut: Any  # a lhotse Cut trimmed to one supervision
    audio: Path
    manifest: Path
    precomputed: bool

    def samples(self) -> tuple[torch.Tensor, int]:
        cut = self.cut
        recording = cut.recording
        end = cut.start + cut.duration
        if recording is None:
            raise CorpusError(f"{self.manifest}: unreadable audio (cut {cut.id} has no recording); write the "
                              f"cuts with their recordings")
        if end > recording.duration + MAX_OVERSHOOT_S or cut.start >= recording.duration:
            raise CorpusError(f"{self.audio}: segment beyond recording end ({cut.start:.2f}-{end:.2f} s of a "
                              f"{recording.duration:.2f} s recording, supervision {cut.id} in {self.manifest}); "
                              f"fix its start and duration")
        if end > recording.duration:
            cut = cut.truncate(duration=recording.duration - cut.start)
        try:
            data = cut.load_audio()
        except Exception as exc:  # lhotse's loaders raise whatever their backend raises
            raise CorpusError(f"{self.audio}: unreadable audio ({_first_cause(exc)}); re-extract or "
                              f"re-download it") from None
        data = np.asarray(data, dtype=np.float32)
        mono = data[0] if data.shape[0] == 1 else data.mean(axis=0, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(mono)), int(cut.sampling_rate)

    def stamp(self) -> str:
        cut = self.cut
        span = f"{cut.start!r}\t{cut.duration!r}\t{cut.channel!r}"
        if self.precomputed:
            f = cut.features
            stored = Path(f.storage_path) / f.storage_key
            stored = stored if stored.is_file() else Path(f.storage_path)
            where = file_stamp(stored) if stored.is_file() else "-"
            return f"fbank\t{f.storage_type}\t{f.storage_path}\t{f.storage_key}\t{where}\t{span}"
        return f"{file_stamp(self.audio) if self.audio != self.manifest else self.manifest}\t{span}"

    def fbank(self, cfg: FeatureConfig) -> torch.Tensor | None:
        if not self.precomputed:
            return None
        f = self.cut.features
        want = cfg.num_mel_bins + int(cfg.use_energy)
        if (f.num_features != want or not math.isclose(f.frame_shift, cfg.frame_shift_ms / 1000)
                or f.sampling_rate != cfg.sample_rate):
            raise ConfigError(f"{self.manifest}: cut {self.cut.id} carries {f.type} features of {f.num_features} "
                              f"bins every {f.frame_shift * 1000:g} ms at {f.sampling_rate} Hz, not the "
                              f"{want} bins every {cfg.frame_shift_ms:g} ms at {cfg.sample_rate} Hz that "
                              f"features.* describes; set data.precomputed_features=false to compute them from "
                              f"the audio")
        samples = round(self.cut.duration * cfg.sample_rate)
        shift = int(cfg.sample_rate * cfg.frame_shift_ms / 1000)
        expected = (1 + (samples - cfg.window_samples) // shift if cfg.snip_edges else (samples + shift // 2) // shift)
        if f.num_frames != max(expected, 0):
            raise ConfigError(f"{self.manifest}: cut {self.cut.id} carries {f.num_frames} frames for "
                              f"{self.cut.duration:g} s, not the {expected} of features.snip_edges="
                              f"{str(cfg.snip_edges).lower()} framing (lhotse's own Fbank uses snip_edges=false); "
                              f"store features in asrbench's convention (asrbench/data/lhotse_corpus.py) or set "
                              f"data.precomputed_features=false")
        try:
            feats = self.cut.load_features()
        except Exception as exc:  # storage backends raise anything on a damaged file
            cause = _first_cause(exc)
            if "lilcom" in cause.lower():  # lhotse's default storage; lhotse itself does not require it
                raise ConfigError(f"{self.manifest}: features of cut {self.cut.id} are stored with lilcom, which "
                                  f"cannot be imported; `pip install lilcom` (in asrbench's lhotse extra) or set "
                                  f"data.precomputed_features=false") from None
            raise ConfigError(f"{self.manifest}: features of cut {self.cut.id} unreadable ({cause[:200]}); restore "
                              f"{f.storage_path} or set data.precomputed_features=false") from None
        return torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))


def _first_cause(exc: BaseException) -> str:
    """The first backend's complaint of lhotse's AudioLoadingError (which lists every backend tried
    and the whole cut), or the message of any other error."""
    text = one_line(exc).split(" Exception #1 ")[0].split(" [extra info]")[0]
    return text.split("Exception #0 ", 1)[-1][:300]


def _cuts(lhotse: Any, files: dict[str, Path]) -> Iterator[tuple[Any, Path, Path]]:
    """(cut of one supervision, manifest it came from, manifest holding its audio's path), checking
    ids and references."""
    if "cuts" in files:
        path = files["cuts"]
        seen: set[str] = set()
        for cut in _items(lhotse, path, lhotse.CutSet):
            if cut.id in seen:
                raise CorpusError(f"{path}: cut id {cut.id} appears twice; keep ids unique")
            seen.add(cut.id)
            sups = cut.supervisions
            if len(sups) == 1 and sups[0].start == 0 and sups[0].duration == cut.duration:
                trimmed = [cut.with_id(sups[0].id)]
            else:  # one cut per supervision (a long recording), named by the supervision
                trimmed = cut.trim_to_supervisions(keep_overlapping=False)
            for one in trimmed:
                yield one, path, path
        return
    rec_path, sup_path = files["recordings"], files["supervisions"]
    recordings = {}
    for rec in _items(lhotse, rec_path, lhotse.RecordingSet):
        if rec.id in recordings:
            raise CorpusError(f"{rec_path}: recording id {rec.id} appears twice; keep ids unique")
        recordings[rec.id] = rec
    seen_sups: set[str] = set()
    for sup in _items(lhotse, sup_path, lhotse.SupervisionSet):
        if sup.id in seen_sups:
            raise CorpusError(f"{sup_path}: supervision id {sup.id} appears twice; keep ids unique")
        seen_sups.add(sup.id)
        rec = recordings.get(sup.recording_id)
        if rec is None:
            raise CorpusError(f"{sup_path}: supervision {sup.id} refers to recording {sup.recording_id}, which "
                              f"{rec_path} does not list; add the recording or delete the supervision")
        cut = lhotse.MonoCut(id=sup.id, start=sup.start, duration=sup.duration, channel=sup.channel,
                             supervisions=[sup.with_offset(-sup.start)], recording=rec)
        yield cut, sup_path, rec_path


def scan_lhotse(root: str | Path, subsets: Sequence[str], prefix: str = "",
                precomputed_features: bool = False) -> list[Utterance]:
    """Every supervision of the manifests of `subsets` under `root` as an utterance, sorted by id.

    Raises CorpusError for a missing root or manifest, a damaged manifest, a duplicate id, a
    supervision of an unknown recording, a missing audio file, or cuts without features when
    `precomputed_features` is asked for; ConfigError when lhotse is not installed.
    """
    if isinstance(subsets, str):
        subsets = [subsets]
    lhotse = import_lhotse()
    utts: dict[str, Utterance] = {}
    for subset in subsets:
        files = manifest_files(root, subset, prefix)
        found = 0
        for cut, manifest, audio_manifest in _cuts(lhotse, files):
            if precomputed_features and not cut.has_features:
                raise CorpusError(f"{manifest}: cut {cut.id} carries no features; compute them (e.g. icefall's "
                                  f"compute_fbank_*.py) or set data.precomputed_features=false")
            audio = (manifest if precomputed_features or cut.recording is None
                     else _audio_path(cut.recording, audio_manifest))
            sup = cut.supervisions[0]
            if cut.id in utts:
                raise CorpusError(f"{manifest}: utterance (supervision) id {cut.id} appears twice (also in "
                                  f"{utts[cut.id].transcript_file}); keep ids unique and list each subset once")
            utts[cut.id] = Utterance(cut.id, sup.speaker or cut.id, cut.recording_id if cut.has_recording else "",
                                     audio, textlib.normalize(sup.text or ""), manifest,
                                     CutSource(cut, audio, manifest, precomputed_features))
            found += 1
        if not found:
            raise CorpusError(f"{next(iter(files.values()))}: no supervisions; check data.root and the *_subsets "
                              f"lists")
    return [utts[u] for u in sorted(utts)]
