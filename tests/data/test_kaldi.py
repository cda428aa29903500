from __future__ import annotations

import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from asrbench.data.corpus import scan_splits
from asrbench.data.features import FeatureConfig, cache_key, prepare_features
from asrbench.data.kaldi import scan_kaldi
from asrbench.data.librispeech import scan_subsets
from asrbench.errors import ConfigError, CorpusError
from tests.data.corpus_forms import write_kaldi_dir
from tests.data.test_librispeech import one_line_naming

EXACT = FeatureConfig(cache_dtype="float32", num_workers=1)
SUBSETS = {"train": "train-clean-100", "dev": "dev-clean", "test-clean": "test-clean"}


@pytest.fixture
def kaldi_root(librispeech_tree, tmp_path):
    root = tmp_path / "data"
    for subset in SUBSETS.values():
        write_kaldi_dir(librispeech_tree, subset, root / subset)
    return root


def assert_same_features(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].utt_ids == b[name].utt_ids
        assert a[name].texts == b[name].texts
        assert torch.equal(a[name].lengths, b[name].lengths)
        for i in range(len(a[name])):
            assert torch.equal(a[name].feats(i), b[name].feats(i)), (name, a[name].utt_ids[i])


def librispeech_features(tree, tmp_path):
    splits = {name: scan_subsets(tree, [s]) for name, s in SUBSETS.items()}
    return prepare_features(splits, EXACT, tmp_path / "cache-ls", progress=False)


@pytest.mark.parametrize("segments", [False, True], ids=["one-recording-per-utterance", "segments"])
def test_same_features_and_transcripts_as_the_librispeech_reader(librispeech_tree, tmp_path, segments):
    root = tmp_path / "data"
    for subset in SUBSETS.values():
        write_kaldi_dir(librispeech_tree, subset, root / subset, segments=segments)
    kaldi = scan_splits({"kind": "kaldi"}, root, {name: [s] for name, s in SUBSETS.items()})
    ls = {name: scan_subsets(librispeech_tree, [s]) for name, s in SUBSETS.items()}
    assert {n: [(u.utt_id, u.text, u.speaker) for u in us] for n, us in kaldi.items()} == \
           {n: [(u.utt_id, u.text, u.speaker) for u in us] for n, us in ls.items()}
    feats = prepare_features(kaldi, EXACT, tmp_path / "cache-kaldi", progress=False)
    assert_same_features(feats, librispeech_features(librispeech_tree, tmp_path))
    same_key = cache_key(kaldi["train"], EXACT) == cache_key(ls["train"], EXACT)
    assert same_key is not segments  # whole files share the LibriSpeech reader's cache entries


def test_several_directories_make_one_split_and_speakers_come_from_utt2spk(kaldi_root):
    (kaldi_root / "dev-clean" / "utt2spk").write_text(
        "".join(f"{line.split()[0]} spk-a\n" for line in (kaldi_root / "dev-clean" / "text").read_text().splitlines()))
    utts = scan_kaldi(kaldi_root, ["train-clean-100", "dev-clean"])
    assert len(utts) == 16 and [u.utt_id for u in utts] == sorted(u.utt_id for u in utts)
    assert {u.speaker for u in utts if u.transcript_file.parent.name == "dev-clean"} == {"spk-a"}
    # an utterance without a speaker line is refused in one line naming utt2spk, as validate_data_dir.sh does
    lines = (kaldi_root / "dev-clean" / "utt2spk").read_text().splitlines()
    (kaldi_root / "dev-clean" / "utt2spk").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(CorpusError, match=rf"dev-clean/utt2spk: no line for utterance {lines[0].split()[0]} of "):
        scan_kaldi(kaldi_root, ["dev-clean"])
    (kaldi_root / "dev-clean" / "utt2spk").unlink()  # optional: then each utterance is its own speaker
    assert all(u.speaker == u.utt_id for u in scan_kaldi(kaldi_root, ["dev-clean"]))


def test_resumes_from_the_cache(kaldi_root, tmp_path, monkeypatch):
    utts = {"train": scan_kaldi(kaldi_root, ["train-clean-100"])}
    cfg = FeatureConfig(cache_dtype="float32", num_workers=1, shard_utterances=5)
    first = prepare_features(utts, cfg, tmp_path / "c", progress=False)
    shards = sorted((tmp_path / "c").glob("train-*/shard-*.pt"))
    assert len(shards) == 3
    shards[1].unlink()
    calls = []
    import asrbench.data.features as features

    real = features.compute_fbank
    monkeypatch.setattr(features, "compute_fbank", lambda *a: calls.append(1) or real(*a))
    again = prepare_features(utts, cfg, tmp_path / "c", progress=False)
    assert len(calls) == 5  # just the missing shard
    assert_same_features(first, again)


# ---------------------------------------------------------------- bad cases
def scan_error(root, subset="train-clean-100", exc=CorpusError, **kw):
    with pytest.raises(exc) as info:
        scan_kaldi(root, [subset], **kw)
    return info


def test_missing_data_directory(kaldi_root):
    one_line_naming(scan_error(kaldi_root, "train-other-500"), kaldi_root / "train-other-500", "dev-clean",
                    "data.root")


def test_missing_text_file(kaldi_root):
    (kaldi_root / "train-clean-100" / "text").unlink()
    one_line_naming(scan_error(kaldi_root), kaldi_root / "train-clean-100" / "text", "missing")


def test_missing_audio_file(kaldi_root, librispeech_tree):
    first = sorted((librispeech_tree / "LibriSpeech" / "train-clean-100").rglob("*.flac"))[0]
    first.unlink()
    one_line_naming(scan_error(kaldi_root), kaldi_root / "train-clean-100" / "wav.scp", first, "does not exist")


def test_text_line_of_an_unknown_utterance(kaldi_root):
    text = kaldi_root / "train-clean-100" / "text"
    text.write_text(text.read_text() + "9999-1-0001 STRAY LINE\n")
    msg = one_line_naming(scan_error(kaldi_root), f"{text}:13", "9999-1-0001", "wav.scp")
    assert "delete the line" in msg


def test_utterance_without_transcript(kaldi_root):
    text = kaldi_root / "train-clean-100" / "text"
    lines = text.read_text().splitlines(keepends=True)
    text.write_text("".join(lines[1:]))
    one_line_naming(scan_error(kaldi_root), lines[0].split()[0], text, "no transcript line")


def test_segment_of_an_unknown_recording(librispeech_tree, tmp_path):
    ddir = write_kaldi_dir(librispeech_tree, "train-clean-100", tmp_path / "d" / "train", segments=True)
    seg = ddir / "segments"
    seg.write_text(seg.read_text().replace(" 101-1001 ", " 101-9999 ", 1))
    one_line_naming(scan_error(tmp_path / "d", "train"), f"{seg}:1", "101-9999", "wav.scp")


def test_malformed_segment_times(librispeech_tree, tmp_path):
    ddir = write_kaldi_dir(librispeech_tree, "train-clean-100", tmp_path / "d" / "train", segments=True)
    seg = ddir / "segments"
    lines = seg.read_text().splitlines()
    utt, rec, *_ = lines[0].split()
    seg.write_text("\n".join([f"{utt} {rec} 1.5 0.5", *lines[1:]]) + "\n")
    one_line_naming(scan_error(tmp_path / "d", "train"), f"{seg}:1", "1.5 0.5", "start < end")


@pytest.mark.parametrize("which", ["wav.scp", "text", "segments", "utt2spk"])
def test_duplicate_ids(librispeech_tree, tmp_path, which):
    ddir = write_kaldi_dir(librispeech_tree, "train-clean-100", tmp_path / "d" / "train", segments=True)
    path = ddir / which
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines + lines[:1]))
    one_line_naming(scan_error(tmp_path / "d", "train"), f"{path}:{len(lines) + 1}", lines[0].split()[0],
                    "appears twice")


def test_same_directory_twice_is_a_duplicate(kaldi_root):
    with pytest.raises(CorpusError) as info:
        scan_kaldi(kaldi_root, ["dev-clean", "dev-clean"])
    one_line_naming(info, kaldi_root / "dev-clean", "keep ids unique")


def test_pipe_is_refused_with_how_to_convert(kaldi_root):
    wav = kaldi_root / "train-clean-100" / "wav.scp"
    lines = wav.read_text().splitlines()
    rec, path = lines[0].split(maxsplit=1)
    wav.write_text("\n".join([f"{rec} sph2pipe -f wav {rec}.sph |", *lines[1:]]) + "\n")
    msg = one_line_naming(scan_error(kaldi_root), f"{wav}:1", rec, "data.allow_pipes=true")
    assert "write each recording to a file" in msg


def test_a_pipe_that_only_decodes_a_readable_file_names_the_file(kaldi_root):
    """lhotse's export_to_kaldi writes every FLAC as an ffmpeg command: say which file to list instead."""
    wav = kaldi_root / "train-clean-100" / "wav.scp"
    lines = wav.read_text().splitlines()
    rec, path = lines[0].split(maxsplit=1)
    command = f"ffmpeg -threads 1 -i {path} -ar 16000 -map_channel 0.0.0 -f wav -acodec pcm_s16le - |"
    wav.write_text("\n".join([f"{rec} {command}", *lines[1:]]) + "\n")
    msg = one_line_naming(scan_error(kaldi_root), f"{wav}:1", f"decodes {path}", f"`{rec} {path}`",
                          "data.allow_pipes=true")
    assert "sph2pipe" not in msg


@pytest.mark.skipif(sys.platform != "linux", reason="uses cat")
def test_pipe_runs_when_allowed_and_gives_the_same_features(kaldi_root, tmp_path, librispeech_tree):
    wav = kaldi_root / "dev-clean" / "wav.scp"
    as_wav = []
    for line in wav.read_text().splitlines():
        rec, path = line.split(maxsplit=1)
        target = tmp_path / f"{rec}.wav"
        data, sr = sf.read(path, dtype="int16")
        sf.write(target, data, sr, subtype="PCM_16")
        as_wav.append(f"{rec} cat {target} |\n")
    wav.write_text("".join(as_wav))
    splits = {"train": scan_kaldi(kaldi_root, ["train-clean-100"]),
              "dev": scan_kaldi(kaldi_root, ["dev-clean"], allow_pipes=True)}
    piped = prepare_features(splits, EXACT, tmp_path / "c1", progress=False)
    reference = prepare_features({"train": splits["train"], "dev": scan_subsets(librispeech_tree, ["dev-clean"])},
                                 EXACT, tmp_path / "c2", progress=False)
    assert_same_features(piped, reference)


def test_failing_pipe_is_unreadable_audio(kaldi_root, tmp_path):
    wav = kaldi_root / "dev-clean" / "wav.scp"
    lines = wav.read_text().splitlines()
    rec = lines[0].split()[0]
    wav.write_text("\n".join([f"{rec} cat /nonexistent.wav |", *lines[1:]]) + "\n")
    splits = {"train": scan_kaldi(kaldi_root, ["train-clean-100"]),
              "dev": scan_kaldi(kaldi_root, ["dev-clean"], allow_pipes=True)}
    with pytest.raises(CorpusError) as info:
        prepare_features(splits, EXACT, tmp_path / "c", progress=False, on_bad_utterance="error")
    one_line_naming(info, wav, "unreadable audio", "cat /nonexistent.wav", "exited 1", rec)


def bad_segment_dir(librispeech_tree, tmp_path, end_past_s):
    ddir = write_kaldi_dir(librispeech_tree, "dev-clean", tmp_path / "d" / "dev", segments=True)
    seg = ddir / "segments"
    lines = seg.read_text().splitlines()
    last = lines[-1].split()
    last[3] = repr(float(last[3]) + end_past_s)
    seg.write_text("\n".join([*lines[:-1], " ".join(last)]) + "\n")
    return ddir, last[0]


def test_segment_beyond_recording_end(librispeech_tree, tmp_path, kaldi_root, caplog):
    ddir, utt = bad_segment_dir(librispeech_tree, tmp_path, 2.0)
    splits = {"train": scan_kaldi(kaldi_root, ["train-clean-100"]), "dev": scan_kaldi(tmp_path / "d", ["dev"])}
    with pytest.raises(CorpusError) as info:
        prepare_features(splits, EXACT, tmp_path / "c", progress=False, on_bad_utterance="error")
    one_line_naming(info, "segment beyond recording end", ddir / "segments", utt, "data.on_bad_utterance=skip")
    feats = prepare_features(splits, EXACT, tmp_path / "c", progress=False, on_bad_utterance="skip")
    assert utt not in feats["dev"].utt_ids and len(feats["dev"]) == 3
    assert "segment beyond recording end" in caplog.text


def test_segment_a_little_past_the_end_is_cut_as_kaldi_does(librispeech_tree, tmp_path, kaldi_root):
    bad_segment_dir(librispeech_tree, tmp_path, 0.3)
    write_kaldi_dir(librispeech_tree, "dev-clean", tmp_path / "e" / "dev", segments=True)
    train = scan_kaldi(kaldi_root, ["train-clean-100"])
    past = prepare_features({"train": train, "dev": scan_kaldi(tmp_path / "d", ["dev"])}, EXACT, tmp_path / "c1",
                            progress=False, on_bad_utterance="error")
    exact = prepare_features({"train": train, "dev": scan_kaldi(tmp_path / "e", ["dev"])}, EXACT, tmp_path / "c2",
                             progress=False, on_bad_utterance="error")
    assert_same_features(past, exact)


def test_empty_transcript_skipped_or_error(kaldi_root, tmp_path):
    text = kaldi_root / "dev-clean" / "text"
    lines = text.read_text().splitlines()
    utt = lines[0].split()[0]
    text.write_text("\n".join([utt, *lines[1:]]) + "\n")
    splits = {"train": scan_kaldi(kaldi_root, ["train-clean-100"]), "dev": scan_kaldi(kaldi_root, ["dev-clean"])}
    with pytest.raises(CorpusError) as info:
        prepare_features(splits, EXACT, tmp_path / "c", progress=False, on_bad_utterance="error")
    one_line_naming(info, "empty transcript", text, utt, "data.on_bad_utterance=skip")
    feats = prepare_features(splits, EXACT, tmp_path / "c", progress=False)
    assert utt not in feats["dev"].utt_ids and len(feats["dev"]) == 3


def test_wrong_sample_rate(kaldi_root, tmp_path):
    odd = tmp_path / "odd.flac"
    sf.write(odd, np.zeros(8000, dtype=np.float32), 8000)
    wav = kaldi_root / "dev-clean" / "wav.scp"
    lines = wav.read_text().splitlines()
    wav.write_text("\n".join([f"{lines[0].split()[0]} {odd}", *lines[1:]]) + "\n")
    splits = {"train": scan_kaldi(kaldi_root, ["train-clean-100"]), "dev": scan_kaldi(kaldi_root, ["dev-clean"])}
    with pytest.raises(CorpusError) as info:
        prepare_features(splits, EXACT, tmp_path / "c", progress=False)  # even with skip
    one_line_naming(info, odd, "sample rate 8000 Hz", "features.sample_rate=8000")


def test_unreadable_audio(kaldi_root, tmp_path):
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"not audio at all")
    wav = kaldi_root / "dev-clean" / "wav.scp"
    lines = wav.read_text().splitlines()
    wav.write_text("\n".join([f"{lines[0].split()[0]} {broken}", *lines[1:]]) + "\n")
    splits = {"train": scan_kaldi(kaldi_root, ["train-clean-100"]), "dev": scan_kaldi(kaldi_root, ["dev-clean"])}
    with pytest.raises(CorpusError) as info:
        prepare_features(splits, EXACT, tmp_path / "c", progress=False, on_bad_utterance="error")
    one_line_naming(info, broken, "unreadable audio", "data.on_bad_utterance=skip")


def test_unknown_kind_names_the_choices():
    with pytest.raises(ConfigError) as info:
        scan_splits({"kind": "espnet"}, ".", {"train": ["x"]})
    one_line_naming(info, "data.kind", "kaldi", "lhotse")
