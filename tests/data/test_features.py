from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.compliance.kaldi as kaldi
from omegaconf import OmegaConf

from asrbench.data import features
from asrbench.data.features import FeatureConfig, prepare_features, stack_frames, stacked_frame_times
from asrbench.data.librispeech import scan_subsets
from asrbench.errors import ConfigError, CorpusError

CONF = Path(__file__).resolve().parents[2] / "conf" / "features" / "default.yaml"
EXACT = FeatureConfig(cache_dtype="float32", num_workers=1)
IDENTITY = {"mean": torch.zeros(EXACT.dim), "std": torch.ones(EXACT.dim)}


@pytest.fixture
def splits(librispeech_tree):
    return {"train": scan_subsets(librispeech_tree, ["train-clean-100"]),
            "dev": scan_subsets(librispeech_tree, ["dev-clean"])}


@pytest.fixture
def count_fbank(monkeypatch):
    """Counts calls of the per-utterance filterbank; `calls.fail_after = n` makes call n+1 fail."""
    calls = type("Calls", (), {"n": 0, "fail_after": None})()
    real = features.compute_fbank

    def counted(samples, cfg):
        if calls.fail_after is not None and calls.n >= calls.fail_after:
            raise KeyboardInterrupt
        calls.n += 1
        return real(samples, cfg)

    monkeypatch.setattr(features, "compute_fbank", counted)
    return calls


def reference_stacked(path: Path) -> torch.Tensor:
    """Independent path: int16 samples straight into kaldi.fbank, frames stacked by hand."""
    pcm, sr = sf.read(path, dtype="int16")
    fbank = kaldi.fbank(torch.tensor(pcm, dtype=torch.float32)[None], num_mel_bins=80, frame_length=25.0,
                        frame_shift=10.0, dither=0.0, sample_frequency=sr)
    rows = [torch.cat([fbank[3 * t], fbank[3 * t + 1], fbank[3 * t + 2]]) for t in range(len(fbank) // 3)]
    return torch.stack(rows)


def all_frames(split) -> torch.Tensor:
    return torch.cat([split.feats(i) for i in range(len(split))])


def same_features(a, b) -> bool:
    return a.utt_ids == b.utt_ids and all(torch.equal(a.feats(i), b.feats(i)) for i in range(len(a)))


def test_default_yaml_lists_every_knob_with_the_code_defaults():
    assert OmegaConf.to_container(OmegaConf.load(CONF)) == dataclasses.asdict(FeatureConfig())
    assert FeatureConfig().dim == 240


def test_values_equal_kaldi_fbank_on_a_file(splits, tmp_path):
    out = prepare_features({"dev": splits["dev"]}, EXACT, tmp_path, progress=False, cmvn=IDENTITY)["dev"]
    for i, utt in enumerate(splits["dev"]):
        assert out.utt_ids[i] == utt.utt_id
        ref = reference_stacked(utt.audio)
        assert out.feats(i).shape == ref.shape and int(out.lengths[i]) == len(ref)
        torch.testing.assert_close(out.feats(i), ref, rtol=0, atol=1e-4)


def test_float16_cache_is_within_half_precision(splits, tmp_path):
    cfg = dataclasses.replace(EXACT, cache_dtype="float16")
    out = prepare_features({"dev": splits["dev"]}, cfg, tmp_path, progress=False, cmvn=IDENTITY)["dev"]
    ref = reference_stacked(splits["dev"][0].audio)
    torch.testing.assert_close(out.feats(0), ref, rtol=2**-10, atol=1e-3)


def test_stacking_and_skipping_hand_case():
    x = torch.arange(14.0).reshape(7, 2)  # frame k = [2k, 2k+1]
    assert stack_frames(x, 3, 3).tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    assert stack_frames(x, 3, 2).tolist() == [[0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 8, 9], [8, 9, 10, 11, 12, 13]]
    assert stack_frames(x, 1, 1).tolist() == x.tolist()
    assert stack_frames(x[:2], 3, 3).shape == (0, 6)
    assert stacked_frame_times(FeatureConfig()) == pytest.approx(0.03)
    assert stacked_frame_times(FeatureConfig(skip=2, frame_shift_ms=20.0)) == pytest.approx(0.04)


def test_cmvn_uses_train_statistics_only(splits, tmp_path):
    out = prepare_features(splits, EXACT, tmp_path, progress=False)
    train_raw = torch.cat([reference_stacked(u.audio) for u in splits["train"]]).double()
    torch.testing.assert_close(out["train"].mean.double(), train_raw.mean(0), rtol=0, atol=1e-4)
    torch.testing.assert_close(out["train"].std.double(), train_raw.std(0, unbiased=False), rtol=1e-4, atol=1e-4)
    assert out["dev"].mean is out["train"].mean or torch.equal(out["dev"].mean, out["train"].mean)
    train, dev = all_frames(out["train"]), all_frames(out["dev"])
    torch.testing.assert_close(train.mean(0), torch.zeros(240), rtol=0, atol=1e-3)
    torch.testing.assert_close(train.std(0, unbiased=False), torch.ones(240), rtol=0, atol=1e-3)
    dev_raw = torch.cat([reference_stacked(u.audio) for u in splits["dev"]]).double()
    expected = (dev_raw.mean(0) - train_raw.mean(0)) / train_raw.std(0, unbiased=False)
    torch.testing.assert_close(dev.double().mean(0), expected, rtol=0, atol=1e-3)
    assert dev.mean(0).abs().max() > 0.05  # dev is not normalised with its own statistics
    # the cached statistics, which later runs load instead of recomputing: those of the reference frames
    saved = torch.load(next(tmp_path.glob("train-*")) / "cmvn.pt", weights_only=True)
    assert int(saved["frames"]) == len(train_raw)
    torch.testing.assert_close(saved["mean"].double(), train_raw.mean(0), rtol=0, atol=1e-4)
    torch.testing.assert_close(saved["std"].double(), train_raw.std(0, unbiased=False), rtol=1e-4, atol=1e-4)


def test_second_run_reuses_the_cache(splits, tmp_path, count_fbank):
    first = prepare_features(splits, EXACT, tmp_path, progress=False)
    assert count_fbank.n == 16
    count_fbank.fail_after = 16  # any filterbank work now fails the test
    second = prepare_features(splits, EXACT, tmp_path, progress=False)
    assert all(same_features(first[k], second[k]) for k in splits)
    # num_workers changes speed, never values: still a cache hit
    prepare_features(splits, dataclasses.replace(EXACT, num_workers=2), tmp_path, progress=False)


@pytest.mark.parametrize("knob", [dict(num_mel_bins=40), dict(frame_shift_ms=12.5), dict(stack=2),
                                  dict(skip=2), dict(min_frames=2), dict(preemphasis_coefficient=0.9),
                                  dict(cache_dtype="float16"), dict(shard_utterances=3)])
def test_a_changed_knob_recomputes(splits, tmp_path, count_fbank, knob):
    prepare_features({"train": splits["train"]}, EXACT, tmp_path, progress=False)
    count_fbank.n = 0
    cfg = dataclasses.replace(EXACT, **knob)
    out = prepare_features({"train": splits["train"]}, cfg, tmp_path, progress=False)
    assert count_fbank.n == 12
    assert out["train"].dim == cfg.dim


def test_a_changed_audio_file_recomputes(splits, tmp_path, count_fbank):
    before = prepare_features(splits, EXACT, tmp_path, progress=False)
    victim = splits["train"][3]
    sf.write(victim.audio, np.random.default_rng(1).uniform(-0.3, 0.3, 16000).astype(np.float32), 16000)
    os.utime(victim.audio, ns=(victim.audio.stat().st_atime_ns, victim.audio.stat().st_mtime_ns + 10**9))
    count_fbank.n = 0
    after = prepare_features(splits, EXACT, tmp_path, progress=False)
    assert count_fbank.n == 12  # the train split only; dev is untouched
    assert same_features(before["dev"], after["dev"]) is False  # new train statistics normalise dev
    fbank_frames = 1 + (16000 - 400) // 160
    assert int(after["train"].lengths[3]) == (fbank_frames - 3) // 3 + 1 == len(reference_stacked(victim.audio))


def test_an_added_utterance_recomputes(splits, tmp_path, count_fbank):
    prepare_features({"train": splits["train"][:-1]}, EXACT, tmp_path, progress=False)
    count_fbank.n = 0
    prepare_features({"train": splits["train"]}, EXACT, tmp_path, progress=False)
    assert count_fbank.n == 12


def test_an_interrupted_build_resumes_with_the_missing_shards(splits, tmp_path, count_fbank, caplog):
    cfg = dataclasses.replace(EXACT, shard_utterances=4)  # 12 train utterances: 3 shards
    count_fbank.fail_after = 6
    with pytest.raises(KeyboardInterrupt):
        prepare_features(splits, cfg, tmp_path, progress=False)
    (split_dir,) = tmp_path.glob("train-*")
    assert sorted(p.name for p in split_dir.iterdir()) == ["shard-00000.pt"]
    # a temporary file of a killed writer and a damaged shard are both redone
    (split_dir / ".shard-00001.pt.999.tmp").write_bytes(b"partial")
    (split_dir / "shard-00002.pt").write_bytes(b"damaged")
    count_fbank.fail_after, count_fbank.n = None, 0
    with caplog.at_level(logging.WARNING):
        resumed = prepare_features(splits, cfg, tmp_path, progress=False)
    assert count_fbank.n == 8 + 4  # train shards 1 and 2, then the dev split
    assert "shard-00002.pt unreadable" in caplog.text
    assert not list(split_dir.glob(".*.tmp"))
    fresh = prepare_features(splits, cfg, tmp_path / "fresh", progress=False)
    assert all(same_features(resumed[k], fresh[k]) for k in splits)


def test_two_threads_give_the_same_features(splits, tmp_path):
    one = prepare_features(splits, EXACT, tmp_path / "one", progress=False)
    two = prepare_features(splits, dataclasses.replace(EXACT, num_workers=2, shard_utterances=5),
                           tmp_path / "two", progress=False)
    assert all(same_features(one[k], two[k]) for k in splits)


def test_dither_is_reproducible(splits, tmp_path):
    cfg = dataclasses.replace(EXACT, dither=1.0, num_workers=2)
    a = prepare_features({"train": splits["train"]}, cfg, tmp_path / "a", progress=False)["train"]
    b = prepare_features({"train": splits["train"]}, cfg, tmp_path / "b", progress=False)["train"]
    plain = prepare_features({"train": splits["train"]}, EXACT, tmp_path / "c", progress=False)["train"]
    assert same_features(a, b) and not same_features(a, plain)


def make_bad_utterances(splits):
    """Train gets an empty transcript, an unreadable file and a 15 ms (too short) file."""
    utts = splits["train"]
    empty, unreadable, short = utts[1], utts[4], utts[7]
    trans = empty.transcript_file
    trans.write_text("".join(f"{line.split()[0]}\n" if line.startswith(empty.utt_id) else line
                             for line in trans.read_text().splitlines(keepends=True)))
    unreadable.audio.write_bytes(b"\x00" * 100)
    sf.write(short.audio, np.zeros(240, np.float32), 16000, subtype="PCM_16")
    return empty, unreadable, short


def test_bad_utterances_are_skipped_counted_and_listed(splits, tmp_path, librispeech_tree, caplog):
    empty, unreadable, short = make_bad_utterances(splits)
    train = scan_subsets(librispeech_tree, ["train-clean-100"])
    with caplog.at_level(logging.WARNING):
        out = prepare_features({"train": train}, EXACT, tmp_path, progress=False, on_bad_utterance="skip")
    assert len(out["train"]) == 9
    assert not {empty.utt_id, unreadable.utt_id, short.utt_id} & set(out["train"].utt_ids)
    (listing,) = tmp_path.glob("train-*/skipped.txt")
    rows = dict(line.split("\t") for line in listing.read_text().splitlines())
    assert rows.keys() == {empty.utt_id, unreadable.utt_id, short.utt_id}
    assert rows[empty.utt_id].startswith("empty transcript") and str(empty.transcript_file) in rows[empty.utt_id]
    assert rows[unreadable.utt_id].startswith("unreadable audio")
    assert rows[short.utt_id].startswith("too short (0 stacked frames")
    assert "skipped 3 of 12" in caplog.text and str(listing) in caplog.text
    assert int(out["train"].lengths.min()) >= 1
    # the same bad utterances, cached, still stop a run that asks for errors
    with pytest.raises(CorpusError):
        prepare_features({"train": train}, dataclasses.replace(EXACT, min_frames=1), tmp_path, progress=False,
                         on_bad_utterance="error")


@pytest.mark.parametrize("which", [0, 1, 2])
def test_bad_utterances_stop_the_run_when_asked(splits, tmp_path, librispeech_tree, which):
    bad = make_bad_utterances(splits)[which]
    keep = {bad.utt_id} | {u.utt_id for u in splits["train"][8:]}
    train = [u for u in scan_subsets(librispeech_tree, ["train-clean-100"]) if u.utt_id in keep]
    with pytest.raises(CorpusError) as exc:
        prepare_features({"train": train}, EXACT, tmp_path, progress=False, on_bad_utterance="error")
    message = str(exc.value)
    assert "\n" not in message and str(bad.audio) in message and "on_bad_utterance=skip" in message


def test_min_frames_counts_stacked_frames(splits, tmp_path):
    shortest = int(prepare_features({"train": splits["train"]}, EXACT, tmp_path, progress=False)["train"]
                   .lengths.min())
    cfg = dataclasses.replace(EXACT, min_frames=shortest + 1)
    out = prepare_features({"train": splits["train"]}, cfg, tmp_path, progress=False)["train"]
    assert 0 < len(out) < 12 and int(out.lengths.min()) > shortest


def test_wrong_sample_rate_stops_even_when_skipping(splits, tmp_path):
    victim = splits["train"][2]
    sf.write(victim.audio, np.zeros(8000, np.float32), 8000, subtype="PCM_16")
    with pytest.raises(CorpusError) as exc:
        prepare_features({"train": splits["train"]}, EXACT, tmp_path, progress=False, on_bad_utterance="skip")
    assert str(victim.audio) in str(exc.value) and "8000 Hz" in str(exc.value)


def test_every_utterance_skipped_is_an_error(splits, tmp_path):
    with pytest.raises(CorpusError, match="every utterance"):
        prepare_features({"train": splits["dev"]}, dataclasses.replace(EXACT, min_frames=10**6), tmp_path,
                         progress=False)


def test_arguments_are_checked(splits, tmp_path):
    with pytest.raises(ValueError, match="train"):
        prepare_features({"dev": splits["dev"]}, EXACT, tmp_path)
    with pytest.raises(ConfigError, match="on_bad_utterance"):
        prepare_features(splits, EXACT, tmp_path, on_bad_utterance="ignore")
    for bad in (dict(stack=0), dict(num_mel_bins=2.5), dict(cache_dtype="bfloat16"), dict(window_type="hann"),
                dict(dither=-1.0)):
        with pytest.raises(ConfigError, match=f"features.{next(iter(bad))}"):
            FeatureConfig(**bad)


def test_split_features_pickle_and_reload(splits, tmp_path):
    out = prepare_features(splits, EXACT, tmp_path, progress=False)["dev"]
    clone = pickle.loads(pickle.dumps(out))
    assert clone._shards is None and same_features(out, clone)
    assert out.texts == [u.text for u in splits["dev"]] and out.num_frames == int(out.lengths.sum())
