"""Frame phone labels from the synthesiser's timings (asrbench/data/phones.py) and the phone probe that
is scored against them (asrbench/model/lstm.py): by hand, and the probe leaves the acoustic model alone."""
from __future__ import annotations

import json
import random

import pytest
import torch

from asrbench.data import phones
from asrbench.errors import CorpusError
from asrbench.model.module import AcousticModule, probe_loss

MODEL = {"name": "t", "hidden_size": 16, "num_layers": 2}
OPTIM = {"name": "adam", "lr": 1e-3}


def test_frame_centres_follow_the_stacking():
    # 10 ms shift, 25 ms window, 3 stacked and every 3rd kept: frame t spans [30t, 30t + 45) ms
    c = phones.frame_centres(3, 10.0, 25.0, 3, 3)
    assert c.tolist() == pytest.approx([0.0225, 0.0525, 0.0825])
    assert phones.frame_centres(2, 10.0, 25.0, 1, 1).tolist() == pytest.approx([0.0125, 0.0225])


def test_labels_by_hand():
    classes = phones.inventory([{"u1": [["b", 0.05, 0.08], ["a", 0.08, 0.2]]}, {"u2": [["k", 0.0, 0.1]]}])
    assert classes == ["sil", "a", "b", "k"]
    ids = {p: i for i, p in enumerate(classes)}
    centres = phones.frame_centres(8, 10.0, 25.0, 3, 3)  # 0.0225, 0.0525, ..., 0.2325
    labels = phones.frame_labels([["b", 0.05, 0.08], ["a", 0.08, 0.2], ["zz", 0.2, 0.22]], centres, ids)
    # 0.0225 silence | 0.0525 b | 0.0825 .. 0.1725 a (4 frames) | 0.2025 zz, unknown: ignored | 0.2325 silence
    assert labels.tolist() == [0, 2, 1, 1, 1, 1, phones.IGNORE_INDEX, 0]


def test_labels_from_a_corpus_tree(tmp_path):
    for subset, utt, seq in (("train", "1-2-0000", [["a", 0.0, 0.1]]), ("dev", "3-4-0000", [["b", 0.0, 0.1]])):
        d = tmp_path / subset / utt.split("-")[0] / "2"
        d.mkdir(parents=True)
        (d / "x.align.json").write_text(json.dumps({utt: {"duration": 0.2, "words": [], "phonemes": seq}}))
    phones._parse_timings.cache_clear()
    timings = phones.read_timings(tmp_path, ["train", "dev"])
    assert phones.read_timings(tmp_path, ["train"])["train"] is timings["train"]  # one train parses them once
    assert phones._parse_timings.cache_info().misses == 2
    classes = phones.inventory([timings["train"]])  # the training subsets define the classes
    labels = phones.phone_frame_labels(timings, {"1-2-0000": 5, "3-4-0000": 5}, classes, frame_shift_ms=10.0,
                                       frame_length_ms=25.0, stack=3, skip=3)
    assert labels["1-2-0000"].tolist() == [1, 1, 1, 0, 0]
    assert labels["3-4-0000"].tolist() == [-100, -100, -100, 0, 0]  # /b/ never occurs in training
    assert phones.check_labels(labels, len(classes)) == pytest.approx(4 / 7)
    with pytest.raises(CorpusError, match="no \\*.align.json phoneme timings"):
        phones.read_timings(tmp_path, ["test"])
    (tmp_path / "train" / "1" / "2" / "x.align.json").write_text("{not json")
    with pytest.raises(CorpusError, match="damaged phoneme timings"):
        phones.read_timings(tmp_path, ["train"])


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 12, 6, generator=g)
    return {"feats": feats, "feat_lens": torch.tensor([12, 9]), "targets": torch.tensor([[3, 4, 5], [6, 7, 0]]),
            "target_lens": torch.tensor([3, 2]), "frame_labels": torch.randint(0, 5, (2, 12), generator=g)}


def test_the_probe_does_not_change_the_acoustic_model():
    torch.manual_seed(0)
    plain = AcousticModule(6, MODEL, OPTIM, "ctc")
    torch.manual_seed(0)
    probed = AcousticModule(6, MODEL, OPTIM, "ctc", num_phones=5)
    batch = _batch()
    for m in (plain, probed):
        m.loss(m(batch["feats"], batch["feat_lens"]), batch).backward()
    grads = dict(plain.named_parameters())
    for name, p in probed.named_parameters():
        if name.startswith("model.phone_probe"):
            assert p.grad is not None and p.grad.abs().sum() > 0  # the probe learns
        else:  # same initial weights (the probe is built last), same gradients: the CTC model is unchanged
            assert torch.equal(p.detach(), grads[name].detach()) and torch.equal(p.grad, grads[name].grad), name
    logits = probed(batch["feats"], batch["feat_lens"])
    assert probed.model.frame_logits(logits).shape == (2, 12, 5) and plain.model.frame_logits(logits) is logits


def test_probe_loss_with_no_labelled_frame_is_zero_not_nan():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    loss = probe_loss(logits, torch.full((2, 3), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_a_probe_needs_ctc():
    with pytest.raises(ValueError, match="use criterion=ctc"):
        AcousticModule(6, MODEL, OPTIM, "ce", num_phones=5)


@pytest.mark.parametrize("data, criterion, words", [
    ({"name": "librispeech", "kind": "librispeech"}, "ctc", "data=librispeech has none: set data.phone_labels=false"),
    ({"name": "synth", "kind": "synth", "alignments": "ali"}, "ctc", "two sources of frame labels"),
    ({"name": "synth", "kind": "synth"}, "ce", "criterion=ce trains on frame labels itself"),
])
def test_phone_labels_refusals_are_one_line(data, criterion, words):
    from omegaconf import OmegaConf

    from asrbench.errors import ConfigError
    from asrbench.experiment import phone_set

    cfg = OmegaConf.create({"data": {"phone_labels": True, "alignments": None, **data}, "criterion": criterion})
    with pytest.raises(ConfigError, match="data.phone_labels=true") as err:
        phone_set(cfg)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert phone_set(OmegaConf.create({"data": {**data, "phone_labels": False}, "criterion": criterion})) is None


def test_checkpoints_record_the_probe_and_refuse_a_run_without_it(tmp_path):
    from omegaconf import OmegaConf

    from asrbench import checkpoint

    cfg = OmegaConf.create({"model": {"name": "t", "hidden_size": 16}, "strategy": {"name": "single"}, "nodes": 1,
                            "criterion": "ctc"})
    plain, probed = checkpoint.identity(cfg, 6), checkpoint.identity(cfg, 6, 58)
    assert "phone_probe" not in plain and probed["phone_probe"] == 58  # older checkpoints still match plain runs
    diffs = checkpoint.identity_differences(tmp_path, {checkpoint.KEY: probed}, plain, checkpoint.WEIGHT_KEYS, "")
    assert diffs == ["phone_probe=58 (this run: None)"]
    assert checkpoint.identity_differences(tmp_path, {checkpoint.KEY: plain}, plain, checkpoint.MUST_MATCH, "") == []


def test_frame_labels_equal_the_mask_definition_on_random_utterances():
    """The binary-search slices label exactly the frames whose centre lies in [start, end): starts on a
    centre, empty and overlapping phonemes, phonemes out of order, a phoneme outside the set."""
    rng = random.Random(0)
    ids = {c: i for i, c in enumerate("abcdefgh")}
    centres = phones.frame_centres(400, 10.0, 25.0, 3, 3)
    for _ in range(300):
        cc = centres[:rng.randint(0, 400)]
        seq, t0 = [], rng.uniform(0, 0.2)
        for _ in range(rng.randint(0, 40)):
            start = float(cc[rng.randrange(len(cc))]) if len(cc) and rng.random() < 0.3 else t0
            end = start + rng.choice([0.0, rng.uniform(0, 0.2)])
            seq.append([rng.choice("abcdefghz"), start, end])
            t0 = end
        if rng.random() < 0.2:
            rng.shuffle(seq)
        expected = torch.zeros(len(cc), dtype=torch.long)
        for name, start, end in seq:
            expected[(cc >= start) & (cc < end)] = ids.get(name, phones.IGNORE_INDEX)
        assert torch.equal(phones.frame_labels(seq, cc, ids), expected)
