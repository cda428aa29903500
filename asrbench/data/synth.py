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

Timings. ``align.json`` holds each utterance's word and phoneme intervals, taken from eSpeak's
WORD and PHONEME events at sample precision by the rules in :mod:`asrbench.data.synth_timing`.

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

Modules: :mod:`~asrbench.data.synth_espeak` (eSpeak NG through ctypes, one fresh process per
chapter), :mod:`~asrbench.data.synth_timing` (word and phoneme timings from its events),
:mod:`~asrbench.data.synth_plan` (config, sentences, who reads what with which parameters),
:mod:`~asrbench.data.synth_write` (rendering: resampling, level, padding, noise; the chapter
files and summaries) and this one (the manifest, idempotence and the lock). Every name they
define that callers use is importable from here.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Re-exported: the names callers and tests have always imported from here.
from asrbench.data.synth_espeak import (EVENT_PHONEME, EVENT_WORD, ESPEAK_RATE, ESpeak, Event,  # noqa: F401
                                        _chapter_worker, _run_worker, check_voices)
from asrbench.data.synth_plan import (MAX_CHAPTERS_PER_SPEAKER, RATE_LIMITS, ROLE_SPLITS, SPLITS,  # noqa: F401
                                      _OPTIONAL_KEYS, ChapterPlan, Speaker, SynthConfigError, UtterancePlan,
                                      _check_config, _sentences_path, _texts, plan_corpus, read_sentences)
from asrbench.data.synth_timing import align_events  # noqa: F401
from asrbench.data.synth_write import (_render, _speakers_txt, _summary, _write_chapter,  # noqa: F401
                                       _write_chapters, _write_json)
from asrbench.errors import CorpusError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the written files change for an unchanged config
_UNHASHED_KEYS = ("sentences", "workers")  # where the file lives and how many processes: same corpus


class CorpusExistsError(CorpusError):
    """data.root holds split directories that no asrbench manifest accounts for."""


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
    module docstring for the layout and what a rerun does, :mod:`asrbench.data.synth_timing` for
    the timing rules.
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
