from __future__ import annotations

import sys

import numpy as np
import pytest

from asrbench.data.corpus import scan_splits
from asrbench.data.features import FeatureConfig, compute_fbank, prepare_features
from asrbench.data.librispeech import scan_subsets
from asrbench.data.utterance import read_audio
from asrbench.errors import ConfigError, CorpusError
from tests.data.corpus_forms import rewrite_jsonl_gz, write_lhotse_manifests
from tests.data.test_kaldi import EXACT, SUBSETS, assert_same_features, librispeech_features
from tests.data.test_librispeech import one_line_naming

pytest.importorskip("lhotse")


def lhotse_splits(root, **cfg):
    return scan_splits({"kind": "lhotse", **cfg}, root, {name: [s] for name, s in SUBSETS.items()})


@pytest.fixture
def manifests(librispeech_tree, tmp_path):
    root = tmp_path / "manifests"
    for subset in SUBSETS.values():
        write_lhotse_manifests(librispeech_tree, subset, root)
    return root


@pytest.mark.parametrize("form", ["cuts", "recordings"])
def test_same_features_and_transcripts_as_the_librispeech_reader(librispeech_tree, tmp_path, form):
    root = tmp_path / "manifests"
    for subset in SUBSETS.values():
        write_lhotse_manifests(librispeech_tree, subset, root, form=form)
    splits = lhotse_splits(root)
    ls = {name: scan_subsets(librispeech_tree, [s]) for name, s in SUBSETS.items()}
    assert {n: [(u.utt_id, u.text, u.speaker) for u in us] for n, us in splits.items()} == \
           {n: [(u.utt_id, u.text, u.speaker) for u in us] for n, us in ls.items()}
    feats = prepare_features(splits, EXACT, tmp_path / "cache-lhotse", progress=False)
    assert_same_features(feats, librispeech_features(librispeech_tree, tmp_path))


def test_precomputed_features_are_used_instead_of_the_audio(librispeech_tree, tmp_path, monkeypatch):
    root = tmp_path / "manifests"
    for subset in SUBSETS.values():  # the features asrbench would compute, stored in the cuts
        write_lhotse_manifests(librispeech_tree, subset, root,
                               fbank_of=lambda u: compute_fbank(read_audio(u.audio, 16000), EXACT).numpy())
    splits = lhotse_splits(root, precomputed_features=True)
    import asrbench.data.features as features

    monkeypatch.setattr(features, "compute_fbank", lambda *a: pytest.fail("computed from audio"))
    feats = prepare_features(splits, EXACT, tmp_path / "cache-lhotse", progress=False)
    monkeypatch.undo()
    assert_same_features(feats, librispeech_features(librispeech_tree, tmp_path))
    assert list((tmp_path / "cache-lhotse").glob("train-*")) != [] and not set(
        p.name for p in (tmp_path / "cache-lhotse").glob("train-*")) & set(
        p.name for p in (tmp_path / "cache-ls").glob("train-*"))  # a key of its own


def test_precomputed_features_of_another_kind_are_refused(librispeech_tree, tmp_path):
    root = tmp_path / "manifests"
    for subset in SUBSETS.values():
        write_lhotse_manifests(librispeech_tree, subset, root, fbank_of=lambda u: [[0.0] * 40] * 50)
    with pytest.raises(ConfigError) as info:
        prepare_features(lhotse_splits(root, precomputed_features=True), EXACT, tmp_path / "c", progress=False)
    one_line_naming(info, "40 bins", "80 bins", "data.precomputed_features=false")


def test_cuts_without_features_are_refused_when_precomputed_is_asked(manifests):
    with pytest.raises(CorpusError) as info:
        lhotse_splits(manifests, precomputed_features=True)
    one_line_naming(info, "carries no features", "data.precomputed_features=false")


def test_lhotse_absent_gives_a_clear_message(manifests, monkeypatch):
    monkeypatch.setitem(sys.modules, "lhotse", None)  # `import lhotse` raises ImportError
    with pytest.raises(ConfigError) as info:
        lhotse_splits(manifests)
    one_line_naming(info, "data=lhotse", "pip install 'asrbench[lhotse]'")


# ---------------------------------------------------------------- bad cases
def scan_error(root, exc=CorpusError, **cfg):
    with pytest.raises(exc) as info:
        lhotse_splits(root, **cfg)
    return info


def test_missing_manifest_lists_what_exists(manifests):
    (manifests / "corpus_cuts_dev-clean.jsonl.gz").unlink()
    one_line_naming(scan_error(manifests), manifests, "dev-clean", "corpus_cuts_train-clean-100.jsonl.gz",
                    "data.root")


def test_recordings_without_supervisions(librispeech_tree, tmp_path):
    root = tmp_path / "m"
    for subset in SUBSETS.values():
        write_lhotse_manifests(librispeech_tree, subset, root, form="recordings")
    (root / "corpus_supervisions_dev-clean.jsonl.gz").unlink()
    one_line_naming(scan_error(root), root / "corpus_recordings_dev-clean.jsonl.gz", "without supervisions")


def test_damaged_manifest(manifests):
    path = manifests / "corpus_cuts_dev-clean.jsonl.gz"
    path.write_bytes(b"garbage")
    one_line_naming(scan_error(manifests), path, "not a readable lhotse manifest")


def test_missing_audio_file(manifests, librispeech_tree):
    first = sorted((librispeech_tree / "LibriSpeech" / "dev-clean").rglob("*.flac"))[0]
    first.unlink()
    one_line_naming(scan_error(manifests), manifests / "corpus_cuts_dev-clean.jsonl.gz", first, "does not exist")


def test_supervision_of_an_unknown_recording(librispeech_tree, tmp_path):
    root = tmp_path / "m"
    for subset in SUBSETS.values():
        write_lhotse_manifests(librispeech_tree, subset, root, form="recordings")
    sups = root / "corpus_supervisions_dev-clean.jsonl.gz"
    rewrite_jsonl_gz(sups, lambda items: [{**items[0], "recording_id": "nowhere"}, *items[1:]])
    one_line_naming(scan_error(root), sups, "refers to recording nowhere", "delete the supervision")


@pytest.mark.parametrize("form", ["cuts", "recordings"])
def test_duplicate_ids(librispeech_tree, tmp_path, form):
    root = tmp_path / "m"
    for subset in SUBSETS.values():
        write_lhotse_manifests(librispeech_tree, subset, root, form=form)
    path = root / f"corpus_{'cuts' if form == 'cuts' else 'supervisions'}_dev-clean.jsonl.gz"
    rewrite_jsonl_gz(path, lambda items: items + items[:1])
    one_line_naming(scan_error(root), path, "appears twice", "unique")


def test_empty_transcript_skipped_or_error(manifests, tmp_path):
    path = manifests / "corpus_cuts_dev-clean.jsonl.gz"
    first = {}

    def blank(items):
        first["id"] = items[0]["supervisions"][0]["id"]
        items[0]["supervisions"][0]["text"] = ""
        return items

    rewrite_jsonl_gz(path, blank)
    splits = lhotse_splits(manifests)
    with pytest.raises(CorpusError) as info:
        prepare_features(splits, EXACT, tmp_path / "c", progress=False, on_bad_utterance="error")
    one_line_naming(info, "empty transcript", path, first["id"], "data.on_bad_utterance=skip")
    feats = prepare_features(splits, EXACT, tmp_path / "c", progress=False)
    assert first["id"] not in feats["dev"].utt_ids and len(feats["dev"]) == 3


def test_supervision_beyond_recording_end(manifests, tmp_path):
    path = manifests / "corpus_cuts_dev-clean.jsonl.gz"
    first = {}

    def stretch(items):
        first["id"] = items[0]["supervisions"][0]["id"]
        items[0]["duration"] += 2.0
        items[0]["supervisions"][0]["duration"] += 2.0
        return items

    rewrite_jsonl_gz(path, stretch)
    splits = lhotse_splits(manifests)
    with pytest.raises(CorpusError) as info:
        prepare_features(splits, EXACT, tmp_path / "c", progress=False, on_bad_utterance="error")
    one_line_naming(info, "segment beyond recording end", path, first["id"], "data.on_bad_utterance=skip")
    feats = prepare_features(splits, EXACT, tmp_path / "c", progress=False)
    assert first["id"] not in feats["dev"].utt_ids and len(feats["dev"]) == 3


def test_wrong_sample_rate(manifests, tmp_path):
    with pytest.raises(CorpusError) as info:
        prepare_features(lhotse_splits(manifests), FeatureConfig(sample_rate=8000, num_workers=1), tmp_path / "c",
                         progress=False)
    one_line_naming(info, ".flac", "sample rate 16000 Hz, expected 8000 Hz", "features.sample_rate=16000")


def test_unreadable_audio(manifests, librispeech_tree, tmp_path):
    victim = sorted((librispeech_tree / "LibriSpeech" / "dev-clean").rglob("*.flac"))[0]
    victim.write_bytes(b"not audio at all")
    splits = lhotse_splits(manifests)
    with pytest.raises(CorpusError) as info:
        prepare_features(splits, EXACT, tmp_path / "c", progress=False, on_bad_utterance="error")
    one_line_naming(info, victim, "unreadable audio", "data.on_bad_utterance=skip")


def test_missing_audio_is_blamed_on_the_recordings_manifest_that_holds_its_path(librispeech_tree, tmp_path):
    root = tmp_path / "m"
    for subset in SUBSETS.values():
        write_lhotse_manifests(librispeech_tree, subset, root, form="recordings")
    first = sorted((librispeech_tree / "LibriSpeech" / "dev-clean").rglob("*.flac"))[0]
    first.unlink()
    err = scan_error(root)
    one_line_naming(err, root / "corpus_recordings_dev-clean.jsonl.gz", first, "does not exist")
    assert "supervisions" not in str(err.value)


def test_precomputed_features_in_lhotses_framing_are_refused(librispeech_tree, tmp_path):
    """lhotse's own Fbank frames with snip_edges=false: 2 frames more than Kaldi's framing."""
    root = tmp_path / "manifests"
    for subset in SUBSETS.values():
        write_lhotse_manifests(librispeech_tree, subset, root, fbank_of=lambda u: np.concatenate(
            [compute_fbank(read_audio(u.audio, 16000), EXACT).numpy(), np.zeros((2, 80), np.float32)]))
    with pytest.raises(ConfigError) as info:
        prepare_features(lhotse_splits(root, precomputed_features=True), EXACT, tmp_path / "c", progress=False)
    one_line_naming(info, "frames for", "snip_edges=true", "data.precomputed_features=false")


def test_features_in_lilcom_storage_without_lilcom_say_what_to_install(librispeech_tree, tmp_path, monkeypatch):
    from lhotse import LilcomChunkyWriter

    root = tmp_path / "manifests"
    for subset in SUBSETS.values():
        write_lhotse_manifests(librispeech_tree, subset, root, writer=LilcomChunkyWriter,
                               fbank_of=lambda u: compute_fbank(read_audio(u.audio, 16000), EXACT).numpy())
    monkeypatch.setitem(sys.modules, "lilcom", None)  # as on a machine without the package
    with pytest.raises(ConfigError) as info:
        prepare_features(lhotse_splits(root, precomputed_features=True), EXACT, tmp_path / "c", progress=False)
    one_line_naming(info, "pip install lilcom", "data.precomputed_features=false")
    assert len(str(info.value).split(": ", 1)[1]) < 250  # lhotse's own message ran to 1,319 characters
