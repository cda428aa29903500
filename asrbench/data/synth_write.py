"""Writing the synthetic corpus: each utterance rendered (resampling, level, padding, noise) and
each chapter written into place; the per-split summary and SPEAKERS.TXT."""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from asrbench.data.synth_espeak import ESPEAK_RATE, _run_worker
from asrbench.data.synth_plan import ChapterPlan, Speaker, UtterancePlan
from asrbench.data.synth_timing import align_events


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
