from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from asrbench.data.librispeech import load_word_timings, scan_subsets
from asrbench.data.utterance import read_audio
from asrbench.errors import AsrbenchError, CorpusError


def one_line_naming(exc: pytest.ExceptionInfo, *names: object) -> str:
    message = str(exc.value)
    assert isinstance(exc.value, AsrbenchError)
    assert "\n" not in message
    for name in names:
        assert str(name) in message, (name, message)
    return message


def first_chapter(root, subset="train-clean-100"):
    return sorted((root / "LibriSpeech" / subset).glob("*/*"))[0]


def test_scan_nested_and_flat_layouts_agree(tmp_path, make_librispeech_tree):
    subsets = {"train-clean-100": (2, 2, 3), "dev-clean": (1, 1, 2)}
    nested = make_librispeech_tree(tmp_path / "a", subsets, nested=True)
    flat = make_librispeech_tree(tmp_path / "b", subsets, nested=False)
    a = scan_subsets(nested, ["train-clean-100"])
    b = scan_subsets(flat, ["train-clean-100"])
    assert len(a) == 12
    assert [u.utt_id for u in a] == sorted(u.utt_id for u in a) == [u.utt_id for u in b]
    assert [u.text for u in a] == [u.text for u in b]
    assert all(u.audio.is_file() and u.utt_id.startswith(f"{u.speaker}-{u.chapter}-") for u in a)
    assert a[0].audio.parent.parent.parent.name == "train-clean-100"
    both = scan_subsets(nested, ["dev-clean", "train-clean-100"])
    assert len(both) == 14 and [u.utt_id for u in both] == sorted(u.utt_id for u in both)


def test_transcripts_are_normalised_and_empty_lines_kept(tmp_path, make_librispeech_tree):
    root = make_librispeech_tree(tmp_path, {"train-clean-100": (1, 1, 3)})
    trans = next(first_chapter(root).glob("*.trans.txt"))
    ids = [line.split()[0] for line in trans.read_text().splitlines()]
    trans.write_text(f"{ids[0]} Hello, world -- it's  me!\n\n{ids[1]}\n{ids[2]} OK\n")
    utts = {u.utt_id: u.text for u in scan_subsets(root, ["train-clean-100"])}
    assert utts == {ids[0]: "HELLO WORLD IT'S ME", ids[1]: "", ids[2]: "OK"}


def test_missing_root(tmp_path):
    with pytest.raises(CorpusError) as exc:
        scan_subsets(tmp_path / "nowhere", ["train-clean-100"])
    one_line_naming(exc, tmp_path / "nowhere", "data.root")


def test_missing_subset_lists_what_exists(librispeech_tree):
    with pytest.raises(CorpusError) as exc:
        scan_subsets(librispeech_tree, ["train-other-500"])
    one_line_naming(exc, "train-other-500", librispeech_tree, "dev-clean", "test-clean", "train-clean-100")


def test_subset_without_utterances(tmp_path):
    (tmp_path / "train-clean-100" / "19" / "198").mkdir(parents=True)
    with pytest.raises(CorpusError) as exc:
        scan_subsets(tmp_path, ["train-clean-100"])
    one_line_naming(exc, tmp_path / "train-clean-100", "no utterances")


def test_audio_without_transcript_line(librispeech_tree):
    chapter = first_chapter(librispeech_tree)
    trans = next(chapter.glob("*.trans.txt"))
    lines = trans.read_text().splitlines(keepends=True)
    trans.write_text("".join(lines[1:]))
    orphan = chapter / f"{lines[0].split()[0]}.flac"
    with pytest.raises(CorpusError) as exc:
        scan_subsets(librispeech_tree, ["train-clean-100"])
    one_line_naming(exc, orphan, trans)


def test_transcript_line_without_audio(librispeech_tree):
    chapter = first_chapter(librispeech_tree)
    victim = sorted(chapter.glob("*.flac"))[1]
    victim.unlink()
    with pytest.raises(CorpusError) as exc:
        scan_subsets(librispeech_tree, ["train-clean-100"])
    one_line_naming(exc, next(chapter.glob("*.trans.txt")), victim.stem)


def test_missing_transcript_file(librispeech_tree):
    chapter = first_chapter(librispeech_tree)
    next(chapter.glob("*.trans.txt")).unlink()
    with pytest.raises(CorpusError) as exc:
        scan_subsets(librispeech_tree, ["train-clean-100"])
    one_line_naming(exc, chapter, ".trans.txt")


def test_duplicate_transcript_line(librispeech_tree):
    trans = next(first_chapter(librispeech_tree).glob("*.trans.txt"))
    lines = trans.read_text().splitlines(keepends=True)
    trans.write_text("".join(lines + lines[:1]))
    with pytest.raises(CorpusError) as exc:
        scan_subsets(librispeech_tree, ["train-clean-100"])
    one_line_naming(exc, trans, lines[0].split()[0], "twice")


def test_same_subset_twice_is_a_duplicate(librispeech_tree):
    with pytest.raises(CorpusError) as exc:
        scan_subsets(librispeech_tree, ["dev-clean", "dev-clean"])
    one_line_naming(exc, "dev-clean")


def test_read_audio_matches_soundfile_and_downmixes(tmp_path):
    rng = np.random.default_rng(0)
    mono = (0.1 * rng.standard_normal(1600)).astype(np.float32)
    sf.write(tmp_path / "m.flac", mono, 16000, subtype="PCM_16")
    x = read_audio(tmp_path / "m.flac", 16000)
    ref, _ = sf.read(tmp_path / "m.flac", dtype="float32")
    assert x.dtype == torch.float32 and x.shape == (1600,)
    assert torch.equal(x, torch.from_numpy(ref))
    stereo = np.stack([mono, -0.5 * mono], axis=1)
    sf.write(tmp_path / "s.wav", stereo, 16000, subtype="FLOAT")
    assert torch.allclose(read_audio(tmp_path / "s.wav", 16000), torch.from_numpy(0.25 * mono), atol=1e-7)


def test_corrupt_and_truncated_audio(tmp_path, librispeech_tree):
    good = first_chapter(librispeech_tree) / sorted(p.name for p in first_chapter(librispeech_tree).glob("*.flac"))[0]
    garbage = tmp_path / "garbage.flac"
    garbage.write_bytes(b"not audio at all" * 10)
    truncated = tmp_path / "truncated.flac"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (garbage, truncated):
        with pytest.raises(CorpusError) as exc:
            read_audio(path, 16000)
        one_line_naming(exc, path, "re-download")


def test_wrong_sample_rate(tmp_path):
    path = tmp_path / "narrowband.flac"
    sf.write(path, np.zeros(800, np.float32), 8000, subtype="PCM_16")
    with pytest.raises(CorpusError) as exc:
        read_audio(path, 16000)
    one_line_naming(exc, path, "8000", "16000", "resample", "features.sample_rate")


def test_word_timings_from_align_json(tmp_path, make_librispeech_tree):
    root = make_librispeech_tree(tmp_path / "synth", {"train": (1, 2, 2)}, nested=False, align=True)
    utts = scan_subsets(root, ["train"])
    timings = load_word_timings(utts)
    assert set(timings) == {u.utt_id for u in utts}
    for utt in utts:
        words = timings[utt.utt_id]
        assert " ".join(w for w, _, _ in words) == utt.text
        assert all(0 <= s < e for _, s, e in words)
    assert load_word_timings(utts[:1]).keys() == {utts[0].utt_id}
    plain = make_librispeech_tree(tmp_path / "ls", {"dev-clean": (1, 1, 2)})
    assert load_word_timings(scan_subsets(plain, ["dev-clean"])) == {}


def test_malformed_align_json(tmp_path, make_librispeech_tree):
    root = make_librispeech_tree(tmp_path, {"train": (1, 1, 2)}, nested=False, align=True)
    utts = scan_subsets(root, ["train"])
    bad = next(utts[0].audio.parent.glob("*.align.json"))
    bad.write_text(json.dumps({utts[0].utt_id: {"phonemes": []}}))
    with pytest.raises(CorpusError) as exc:
        load_word_timings(utts)
    one_line_naming(exc, bad)
    bad.write_text("{not json")
    with pytest.raises(CorpusError) as exc:
        load_word_timings(utts)
    one_line_naming(exc, bad)


def test_chapter_directory_without_files_is_ignored(librispeech_tree):
    before = scan_subsets(librispeech_tree, ["dev-clean"])
    empty = librispeech_tree / "LibriSpeech" / "dev-clean" / "999" / "9999"
    empty.mkdir(parents=True)
    assert scan_subsets(librispeech_tree, ["dev-clean"]) == before
    shutil.rmtree(empty.parent)
