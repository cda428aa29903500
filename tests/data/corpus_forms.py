"""Writers of the same tiny corpus in other forms: Kaldi data directories and lhotse manifests,
made from a LibriSpeech-layout tree (its audio files and transcripts)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from asrbench.data.librispeech import scan_subsets


def raw_transcripts(utts) -> dict[str, str]:
    """The transcript lines as written (before normalisation), by utterance id."""
    lines = {}
    for trans in sorted({u.transcript_file for u in utts}):
        for line in trans.read_text().splitlines():
            utt, _, words = line.partition(" ")
            lines[utt] = words
    return lines


def write_kaldi_dir(tree: Path, subset: str, out: Path, *, segments: bool = False,
                    lower_case: bool = True) -> Path:
    """`out` as a Kaldi data dir of `subset`: one recording per file, or with `segments` one
    recording per chapter (the chapter's files concatenated) cut back into utterances."""
    utts = scan_subsets(tree, [subset])
    texts = raw_transcripts(utts)
    out.mkdir(parents=True)
    wav, text, utt2spk, seg = [], [], [], []
    if segments:
        chapters: dict[tuple[str, str], list] = {}
        for u in utts:
            chapters.setdefault((u.speaker, u.chapter), []).append(u)
        for (speaker, chapter), members in sorted(chapters.items()):
            rec = f"{speaker}-{chapter}"
            parts = [sf.read(u.audio, dtype="float32")[0] for u in members]
            path = out / "audio" / f"{rec}.flac"
            path.parent.mkdir(exist_ok=True)
            sf.write(path, np.concatenate(parts), 16000, subtype="PCM_16")
            wav.append(f"{rec} {path}\n")
            start = 0
            for u, samples in zip(members, parts):
                seg.append(f"{u.utt_id} {rec} {start / 16000!r} {(start + len(samples)) / 16000!r}\n")
                start += len(samples)
    else:
        wav = [f"{u.utt_id} {u.audio}\n" for u in utts]
    for u in utts:
        words = texts[u.utt_id]
        text.append(f"{u.utt_id} {words.lower() + ',' if lower_case else words}\n")
        utt2spk.append(f"{u.utt_id} {u.speaker}\n")
    (out / "wav.scp").write_text("".join(wav))
    (out / "text").write_text("".join(text))
    (out / "utt2spk").write_text("".join(utt2spk))
    if segments:
        (out / "segments").write_text("".join(seg))
    return out


def write_lhotse_manifests(tree: Path, subset: str, out: Path, *, form: str = "cuts",
                           fbank_of=None, writer=None) -> Path:
    """lhotse manifests of `subset` in `out`: `form="cuts"` (a CutSet) or `"recordings"`
    (recordings + supervisions). `fbank_of(utt) -> (T, 80) array` stores precomputed features,
    with `writer` (a lhotse features writer class; numpy files by default)."""
    from lhotse import (CutSet, Features, MonoCut, NumpyFilesWriter, Recording, RecordingSet,
                        SupervisionSegment, SupervisionSet)

    utts = scan_subsets(tree, [subset])
    texts = raw_transcripts(utts)
    out.mkdir(parents=True, exist_ok=True)
    recs, sups = [], []
    for u in utts:
        rec = Recording.from_file(u.audio, recording_id=u.utt_id)
        recs.append(rec)
        sups.append(SupervisionSegment(id=u.utt_id, recording_id=rec.id, start=0.0, duration=rec.duration,
                                       text=texts[u.utt_id].lower(), speaker=u.speaker))
    if form == "recordings":
        RecordingSet.from_recordings(recs).to_file(out / f"corpus_recordings_{subset}.jsonl.gz")
        SupervisionSet.from_segments(sups).to_file(out / f"corpus_supervisions_{subset}.jsonl.gz")
        return out
    cuts = []
    writer = (writer or NumpyFilesWriter)(out / f"feats_{subset}") if fbank_of else None
    for u, rec, sup in zip(utts, recs, sups):
        features = None
        if fbank_of:
            arr = np.asarray(fbank_of(u), dtype=np.float32)
            features = Features(type="kaldi-fbank", num_frames=arr.shape[0], num_features=arr.shape[1],
                                frame_shift=0.01, sampling_rate=16000, start=0.0, duration=rec.duration,
                                storage_type=writer.name, storage_path=str(writer.storage_path),
                                storage_key=writer.write(u.utt_id, arr))
        cuts.append(MonoCut(id=f"cut-{u.utt_id}", start=0.0, duration=rec.duration, channel=0,
                            supervisions=[sup], recording=rec, features=features))
    CutSet.from_cuts(cuts).to_file(out / f"corpus_cuts_{subset}.jsonl.gz")
    return out


def rewrite_jsonl_gz(path: Path, edit) -> None:
    """Apply `edit(list_of_dicts) -> list_of_dicts` to a .jsonl.gz manifest."""
    import gzip

    with gzip.open(path, "rt") as f:
        items = [json.loads(line) for line in f if line.strip()]
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(item) + "\n" for item in edit(items))
