"""The eSpeak NG corpus: layout, transcripts, audio, speaker and sentence splits, timings,
reproducibility, idempotence and resumption, on corpora of the synth_tiny size."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from asrbench.data import synth
from asrbench.data.text import normalize
from asrbench.errors import ConfigError, CorpusError

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"
TOP_KEYS = {"name", "kind", "root", "cache_dir", "train_subsets", "dev_subsets", "test_subsets", "synth"}


def tiny_cfg() -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / "synth_tiny.yaml").synth)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "tiny"
    manifest = synth.generate_corpus(root, OmegaConf.load(CONF / "synth_tiny.yaml").synth, progress=False)
    return root, manifest


def chapters(root: Path):
    for split in synth.SPLITS:
        for spk in sorted((root / split).iterdir()):
            for ch in sorted(spk.iterdir()):
                yield split, spk.name, ch


def transcripts(root: Path) -> dict[str, tuple[str, str]]:
    out = {}
    for split, _, ch in chapters(root):
        for line in next(ch.glob("*.trans.txt")).read_text().splitlines():
            utt, text = line.split(" ", 1)
            out[utt] = (split, text)
    return out


def test_config_files_have_the_project_keys() -> None:
    for name in ("synth", "synth_3h", "synth_tiny", "synth_short", "synth_requests", "synth_requests_shared"):
        cfg = OmegaConf.load(CONF / f"{name}.yaml")
        assert TOP_KEYS <= set(cfg) and cfg.name == name and cfg.kind == "synth"
        assert list(cfg.test_subsets) == ["test", "test_seen"]


@pytest.mark.parametrize("name,count", [("synth", (9600, 150, 300, 300)), ("synth_3h", (3000, 150, 300, 300)),
                                        ("synth_short", (4800, 200, 240, 240)),
                                        ("synth_requests", (3180, 150, 810, 816)),
                                        ("synth_requests_shared", (19080, 150, 810, 816))])
def test_full_presets_plan_disjoint_speakers(name: str, count: tuple[int, ...]) -> None:
    cfg = synth._check_config(OmegaConf.load(CONF / f"{name}.yaml").synth)
    espeak = synth.ESpeak()
    assert all(espeak.has_voice(s["voice"]) for s in cfg["speakers"])
    plan = synth.plan_corpus(cfg, synth.read_sentences(synth._sentences_path(cfg["sentences"]), cfg["max_words"],
                                                       cfg["vocabulary"]))
    counted = {split: sum(len(c.utterances) for c in plan if c.split == split) for split in synth.SPLITS}
    assert counted == dict(zip(("train", "dev", "test", "test_seen"), count))
    if cfg["max_words"]:
        assert max(len(u.text.split()) for c in plan for u in c.utterances) <= cfg["max_words"]
    who = {split: {c.speaker.id for c in plan if c.split == split} for split in synth.SPLITS}
    assert len(who["train"]) >= 6 and who["test_seen"] == who["train"]
    assert not who["train"] & who["dev"] and not who["train"] & who["test"] and not who["dev"] & who["test"]
    voices = {split: {c.speaker.voice for c in plan if c.split == split} for split in synth.SPLITS}
    assert not voices["train"] & voices["test"]  # test is always unseen voices
    if name.startswith("synth_requests"):  # its dev set is in-domain: the training voices under new speaker ids
        assert voices["dev"] == voices["train"]
    else:
        assert not voices["train"] & voices["dev"]
    held = [u.text for c in plan if c.split != "train" for u in c.utterances]
    trained = [u.text for c in plan if c.split == "train" for u in c.utterances]
    assert len(set(held)) == len(held) and not set(held) & set(trained)
    assert len(trained) == len(set(trained)) * cfg["train_readers"]


def test_train_readers_share_each_training_sentence_among_that_many_speakers() -> None:
    cfg = tiny_cfg() | {"vocabulary": None, "max_words": None}
    sentences = [f"sentence number {i}" for i in range(200)]
    speakers = [s for s in cfg["speakers"] if s["role"] == "train"]
    for readers in range(1, len(speakers) + 1):
        counts = dict(cfg["utterances"], train=6 * readers)
        plan = synth.plan_corpus(synth._check_config(cfg | {"utterances": counts, "train_readers": readers}),
                                 sentences)
        read_by: dict[str, list[int]] = {}
        for c in (c for c in plan if c.split == "train"):
            for u in c.utterances:
                read_by.setdefault(u.text, []).append(c.speaker.id)
        assert len(read_by) == 6 * len(speakers)  # D = S x train / R distinct training sentences
        assert all(len(ids) == len(set(ids)) == readers for ids in read_by.values())
        held = [u.text for c in plan if c.split != "train" for u in c.utterances]
        assert len(held) == len(set(held)) and not set(held) & set(read_by)
    with pytest.raises(ConfigError, match="multiple of data.synth.train_readers"):
        synth._check_config(cfg | {"train_readers": 2, "utterances": dict(cfg["utterances"], train=5)})
    with pytest.raises(ConfigError, match=r"train_readers=9 must be an integer in \[1, "):
        synth._check_config(cfg | {"train_readers": 9})
    with pytest.raises(ConfigError, match="raise data.synth.train_readers"):
        synth.plan_corpus(synth._check_config(cfg), sentences[:10])


def test_layout_and_transcripts_follow_librispeech(corpus) -> None:
    root, manifest = corpus
    assert sorted(p.name for p in root.iterdir()) == sorted([*synth.SPLITS, "SPEAKERS.TXT", "manifest.json", ".done",
                                                             ".lock"])
    n = 0
    for split, spk, ch in chapters(root):
        prefix = f"{spk}-{ch.name}"
        assert spk.isdigit() and ch.name.isdigit()
        lines = (ch / f"{prefix}.trans.txt").read_text().splitlines()
        ids = [line.split(" ", 1)[0] for line in lines]
        assert all(re.fullmatch(rf"{prefix}-\d{{4}}", u) for u in ids) and ids == sorted(ids)
        assert sorted(p.name for p in ch.iterdir()) == sorted([f"{prefix}.trans.txt", f"{prefix}.align.json",
                                                               *(f"{u}.flac" for u in ids)])
        for line in lines:
            text = line.split(" ", 1)[1]
            assert text and normalize(text) == text
        n += len(lines)
    assert n == sum(s["utterances"] for s in manifest["splits"].values()) == 45
    speakers_txt = (root / "SPEAKERS.TXT").read_text()
    for s in manifest["speakers"]:
        assert re.search(rf"^{s['id']}\s*\|.*\|\s*{re.escape(s['voice'])}\s*\|", speakers_txt, re.M)


def test_speakers_and_sentences_are_disjoint(corpus) -> None:
    root, _ = corpus
    who = {split: {spk for s, spk, _ in chapters(root) if s == split} for split in synth.SPLITS}
    assert who["train"] and who["dev"] and who["test"]
    assert not who["train"] & who["dev"] and not who["train"] & who["test"] and not who["dev"] & who["test"]
    assert who["test_seen"] == who["train"]
    texts = [text for _, text in transcripts(root).values()]
    assert len(set(texts)) == len(texts)


def test_audio_is_16k_mono_flac_never_digital_silence(corpus) -> None:
    root, manifest = corpus
    total = {split: 0.0 for split in synth.SPLITS}
    for split, _, ch in chapters(root):
        for path in ch.glob("*.flac"):
            info = sf.info(path)
            assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
            x, _ = sf.read(path, dtype="int16")
            frames = x[: len(x) // 400 * 400].reshape(-1, 400).astype(np.float64)  # 25 ms
            assert np.sqrt((frames**2).mean(axis=1)).min() > 3  # LSB: a noise floor everywhere
            assert np.abs(x).max() < 32767
            total[split] += len(x) / 16000
    for split, s in manifest["splits"].items():
        assert s["seconds"] == pytest.approx(total[split], abs=0.01)


def test_timings_match_transcripts_and_audio(corpus) -> None:
    root, _ = corpus
    texts = transcripts(root)
    checked = 0
    for _, _, ch in chapters(root):
        align = json.loads(next(ch.glob("*.align.json")).read_text())
        assert set(align) == {p.stem for p in ch.glob("*.flac")}
        for utt, entry in align.items():
            x, sr = sf.read(ch / f"{utt}.flac")
            assert entry["duration"] == pytest.approx(len(x) / sr, abs=1e-4)
            words = entry["words"]
            assert [w for w, _, _ in words] == texts[utt][1].split()
            bounds = [t for _, a, b in words for t in (a, b)]
            assert 0 < bounds[0] and bounds[-1] <= entry["duration"] and bounds == sorted(bounds)
            assert all(a < b for _, a, b in words)
            phones = [t for _, a, b in entry["phonemes"] for t in (a, b)]
            assert phones == sorted(phones) and phones[0] == bounds[0] and phones[-1] == bounds[-1]
            assert all(p and not p.startswith("_") and p[0] not in "',"for p, _, _ in entry["phonemes"])
            # Exact timings: the padding before the first word and after the last holds noise only.
            lead, tail = x[: int(bounds[0] * sr)], x[int(bounds[-1] * sr) + 80:]
            speech = np.concatenate([x[int(a * sr):int(b * sr)] for _, a, b in words])
            for silence in (lead, tail):
                if len(silence) > 400:
                    assert np.mean(speech**2) > 8 * np.mean(silence**2)
            checked += 1
    assert checked == 45


def test_two_generations_are_byte_identical(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    threads = torch.get_num_threads()
    synth.generate_corpus(tmp_path / "again", tiny_cfg(), progress=False)
    assert torch.get_num_threads() == threads  # set to 1 while resampling, then restored
    first, second = files(root), files(tmp_path / "again")
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []


def test_rerun_is_a_no_op(corpus, tmp_path: Path) -> None:
    root, manifest = corpus
    copy_ = tmp_path / "copy"
    shutil.copytree(root, copy_)  # copy2 keeps mtimes
    before = {p: p.stat().st_mtime_ns for p in copy_.rglob("*")}
    assert synth.generate_corpus(copy_, tiny_cfg(), progress=False) == manifest
    assert {p: p.stat().st_mtime_ns for p in copy_.rglob("*")} == before


def test_interrupted_generation_resumes_to_the_same_corpus(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    copy_ = tmp_path / "copy"
    shutil.copytree(root, copy_)
    chapter = copy_ / "test" / "300" / "30000"
    (copy_ / ".done").unlink()
    shutil.rmtree(chapter)
    (chapter.parent / ".30000.partial").mkdir()  # a chapter cut short
    (chapter.parent / ".30000.partial" / "300-30000-0000.flac").write_bytes(b"half")
    synth.generate_corpus(copy_, tiny_cfg(), progress=False)
    assert files(copy_) == files(root)


def test_changed_config_regenerates(corpus, tmp_path: Path) -> None:
    root, manifest = corpus
    copy_ = tmp_path / "copy"
    shutil.copytree(root, copy_)
    (copy_ / "features").mkdir()  # not the synthesiser's: must survive
    cfg = tiny_cfg()
    cfg["utterances"]["test"] = 2
    cfg["snr_db"] = [20, 20]
    new = synth.generate_corpus(copy_, cfg, progress=False)
    assert new["config_sha256"] != manifest["config_sha256"] and new["splits"]["test"]["utterances"] == 4
    assert sorted(p.name for p in (copy_ / "test" / "300" / "30000").glob("*.flac")) == [
        "300-30000-0000.flac", "300-30000-0001.flac"]
    assert (copy_ / "features").is_dir() and (copy_ / ".done").read_text().strip() == new["config_sha256"]
    changed = files(copy_)
    assert changed["train/100/10000/100-10000-0000.flac"] != files(root)["train/100/10000/100-10000-0000.flac"]
    cfg["workers"] = 1  # how many processes write it is not part of the corpus
    assert synth.generate_corpus(copy_, cfg, progress=False) == new


BAD_CONFIGS = {
    "unknown-variant": (lambda c: c["speakers"][0].update(voice="en-us+nosuchvariant"), "not an eSpeak NG voice"),
    "unknown-language": (lambda c: c["speakers"][0].update(voice="xx-nowhere"), "not an eSpeak NG voice"),
    "duplicate-id": (lambda c: c["speakers"][1].update(id=100), "used twice"),
    "rate-out-of-range": (lambda c: c["speakers"][0].update(rate=445), "leaves eSpeak's range"),
    "missing-key": (lambda c: c.pop("snr_db"), "missing keys \\['snr_db'\\]"),
    "unknown-key": (lambda c: c.update(snr=[1, 2]), "unknown keys \\['snr'\\]"),
    "reversed-range": (lambda c: c.update(peak_dbfs=[-3, -12]), "peak_dbfs"),
    "too-few-sentences": (lambda c: c.update(chapter_size=5000) or c["utterances"].update(train=13000),
                          "distinct sentences"),
    "no-dev-speaker": (lambda c: c.update(speakers=[s for s in c["speakers"] if s["role"] != "dev"]), "role 'dev'"),
}


def test_max_words_keeps_short_sentences_and_left_out_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.txt"
    path.write_text("one two three\nOne two three\na b\nfour five six seven\n")
    assert synth.read_sentences(path) == ["ONE TWO THREE", "A B", "FOUR FIVE SIX SEVEN"]
    assert synth.read_sentences(path, 3) == ["ONE TWO THREE", "A B"]
    # a closed vocabulary of the 5 most frequent words (ties by first occurrence): ONE TWO THREE A B
    assert synth.read_sentences(path, vocabulary=5) == ["ONE TWO THREE", "A B"]
    left_out, null = tiny_cfg(), tiny_cfg() | {"max_words": None}
    assert synth._check_config(left_out) == synth._check_config(null)
    with pytest.raises(ConfigError, match="max_words"):
        synth._check_config(tiny_cfg() | {"max_words": 0})


@pytest.mark.parametrize("change, message", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_is_a_clear_value_error(tmp_path: Path, change, message) -> None:
    cfg = tiny_cfg()
    change(cfg)
    with pytest.raises(ValueError, match=message) as err:
        synth.generate_corpus(tmp_path / "c", cfg, progress=False)
    assert isinstance(err.value, ConfigError) and "\n" not in str(err.value)
    assert not (tmp_path / "c").exists()


def test_refuses_split_directories_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(CorpusError, match="not written by"):
        synth.generate_corpus(tmp_path, tiny_cfg(), progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "train"]


def test_voices_are_reproducible_in_fresh_processes() -> None:
    assert synth.check_voices(["en-gb-x-rp+f3", "en-us+klatt"]) == {"en-gb-x-rp+f3": True, "en-us+klatt": True}


def test_align_events_rules() -> None:
    """Rules 1-4 of the module docstring on hand-made events for "OF THE CRY"."""
    w, p = synth.EVENT_WORD, synth.EVENT_PHONEME
    events = [(w, 1, 2, 0, ""), (p, 1, 0, 0, "V"), (p, 1, 0, 100, "v"),
              (p, 1, 0, 200, "D"), (p, 1, 0, 300, "@"),  # "the" inside the "of the" dictionary entry
              (w, 8, 3, 450, ""),  # inside the interval of "@": the closure of "k"
              (p, 8, 0, 500, "k"), (p, 8, 0, 600, "r"), (p, 8, 0, 700, "'aI"),
              (p, 8, 0, 800, "l"), (p, 11, 0, 800, "_:")]  # zero-length "l", then a pause
    words, phonemes = synth.align_events(["OF", "THE", "CRY"], events, 900)
    assert words == [("OF", 0, 200), ("THE", 200, 450), ("CRY", 450, 800)]
    assert phonemes == [("V", 0, 100), ("v", 100, 200), ("D", 200, 300), ("@", 300, 450), ("k", 450, 600),
                        ("r", 600, 700), ("aI", 700, 750), ("l", 750, 800)]
    with pytest.raises(ValueError, match="2 word"):
        synth.align_events(["A", "B"], [(w, 1, 1, 0, ""), (p, 1, 0, 0, "@")], 100)

