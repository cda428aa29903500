from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DistributedSampler

from asrbench.data import text
from asrbench.data.dataset import IGNORE_INDEX, SpeechDataset, collate, make_loader
from asrbench.data.features import FeatureConfig, prepare_features
from asrbench.data.librispeech import scan_subsets


class FakeSplit:
    """SplitFeatures' interface over in-memory tensors: utterance i has 3 + (7*i % 11) frames."""

    def __init__(self, n: int, dim: int = 4) -> None:
        self.utt_ids = [f"u{i:03d}" for i in range(n)]
        self.texts = ["AB" * (1 + i % 3) for i in range(n)]
        self.lengths = torch.tensor([3 + (7 * i) % 11 for i in range(n)])
        self._feats = [torch.full((int(t), dim), float(i)) for i, t in enumerate(self.lengths)]

    def __len__(self) -> int:
        return len(self.utt_ids)

    def feats(self, i: int) -> torch.Tensor:
        return self._feats[i]


def rank_ids(loader) -> list[str]:
    return [u for batch in loader for u in batch["utt_ids"]]


def test_items_and_collate_padding():
    split = FakeSplit(3)
    labels = {"u000": torch.arange(3), "u002": torch.arange(int(split.lengths[2])) % 5}
    ds = SpeechDataset(split, labels)
    item = ds[1]
    # by hand: ids index blank, space, apostrophe, A..Z, so A = 3 and B = 4
    assert item["utt_id"] == "u001" and item["targets"].tolist() == [3, 4, 3, 4]
    assert item["frame_labels"].tolist() == [IGNORE_INDEX] * int(split.lengths[1])  # no labels: ignored
    batch = collate([ds[0], ds[1], ds[2]])
    lens = split.lengths.tolist()  # [3, 10, 6]
    assert batch["feats"].shape == (3, max(lens), 4) and batch["feat_lens"].tolist() == lens
    for i, t in enumerate(lens):
        assert torch.equal(batch["feats"][i, :t], split.feats(i)) and not batch["feats"][i, t:].any()
    assert batch["targets"].tolist() == [[3, 4, 0, 0, 0, 0], [3, 4, 3, 4, 0, 0], [3, 4, 3, 4, 3, 4]]
    assert batch["target_lens"].tolist() == [2, 4, 6] and batch["utt_ids"] == ["u000", "u001", "u002"]
    assert batch["frame_labels"][0].tolist() == [0, 1, 2] + [IGNORE_INDEX] * 7
    assert batch["frame_labels"][2].tolist() == [0, 1, 2, 3, 4, 0] + [IGNORE_INDEX] * 4
    assert "frame_labels" not in collate([SpeechDataset(split)[0]])


def test_frame_labels_of_the_wrong_length_are_rejected():
    with pytest.raises(ValueError, match="u001"):
        SpeechDataset(FakeSplit(2), {"u001": torch.zeros(99, dtype=torch.long)})


@pytest.mark.parametrize("world_size,shuffle,drop_last", itertools.product([1, 2, 3, 4], [False, True],
                                                                           [False, True]))
def test_each_rank_reads_what_distributed_sampler_gives_it(world_size, shuffle, drop_last):
    n, seed, epoch = 23, 7, 3
    ds = SpeechDataset(FakeSplit(n))
    per_rank = []
    for rank in range(world_size):
        loader = make_loader(ds, batch_size=3, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                             epoch=epoch, drop_last=drop_last)
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last)
        sampler.set_epoch(epoch)
        expected = [ds.split.utt_ids[i] for i in sampler]
        if drop_last:
            expected = expected[: len(expected) // 3 * 3]
        ids = rank_ids(loader)
        assert ids == expected
        assert rank_ids(loader) == ids  # deterministic for (seed, epoch, rank)
        per_rank.append(ids)
    assert len({len(ids) for ids in per_rank}) == 1  # every rank takes the same number of steps
    everything = [u for ids in per_rank for u in ids]
    if drop_last:
        assert len(set(everything)) == len(everything)  # disjoint
    else:
        assert set(everything) == set(ds.split.utt_ids)  # the union is the dataset
        assert len(everything) - len(set(everything)) == -n % world_size  # only DistributedSampler's padding


def test_epochs_and_seeds_change_the_order():
    ds = SpeechDataset(FakeSplit(40))
    order = {(s, e): rank_ids(make_loader(ds, batch_size=4, shuffle=True, seed=s, epoch=e)) for s in (0, 100)
             for e in (0, 1)}
    assert len({tuple(v) for v in order.values()}) == 4
    # DistributedSampler seeds its permutation with seed + epoch
    assert rank_ids(make_loader(ds, batch_size=4, shuffle=True, seed=1, epoch=0)) == order[0, 1]
    assert rank_ids(make_loader(ds, batch_size=4, shuffle=False, seed=0)) == ds.split.utt_ids


@pytest.mark.parametrize("shuffle", [False, True])
def test_sort_by_length_keeps_each_ranks_utterances(shuffle):
    ds = SpeechDataset(FakeSplit(150))
    counts = set()
    for rank in range(3):
        loader = make_loader(ds, batch_size=4, shuffle=shuffle, seed=5, rank=rank, world_size=3, epoch=2,
                             sort_by_length=True, drop_last=True)
        plain = make_loader(ds, batch_size=4, shuffle=shuffle, seed=5, rank=rank, world_size=3, epoch=2,
                            drop_last=True)
        batches = list(loader)
        assert len(batches) == len(loader) == len(plain)
        assert sorted(rank_ids(loader)) == sorted(rank_ids(plain))  # same 48 of the rank's 50
        assert all(b["feat_lens"].tolist() == sorted(b["feat_lens"].tolist(), reverse=True) for b in batches)
        padded = sum(b["feats"].shape[0] * b["feats"].shape[1] for b in batches)
        padded_plain = sum(b["feats"].shape[0] * b["feats"].shape[1] for b in plain)
        assert padded < padded_plain
        counts.add(len(batches))
    assert len(counts) == 1


def test_loader_over_real_features(librispeech_tree, tmp_path):
    splits = {"train": scan_subsets(librispeech_tree, ["train-clean-100"])}
    feats = prepare_features(splits, FeatureConfig(num_workers=1), tmp_path, progress=False)["train"]
    loader = make_loader(SpeechDataset(feats), batch_size=5, shuffle=True, seed=0, rank=1, world_size=2)
    batches = list(loader)
    assert [b["feats"].shape[0] for b in batches] == [5, 1]
    assert all(b["feats"].shape[2] == 240 and b["feats"].dtype == torch.float32 for b in batches)
    b = batches[0]
    for j, utt in enumerate(b["utt_ids"]):
        i = feats.utt_ids.index(utt)
        assert torch.equal(b["feats"][j, : b["feat_lens"][j]], feats.feats(i))
        assert text.decode(b["targets"][j, : b["target_lens"][j]].tolist()) == feats.texts[i]


@pytest.mark.parametrize("bucket", [False, True])
def test_loader_resumes_mid_epoch_through_lightnings_epoch_setter(bucket):
    from lightning.fabric.utilities.data import _set_sampler_epoch

    ds = SpeechDataset(FakeSplit(40))
    done = {"n": 0}
    loader = make_loader(ds, batch_size=4, shuffle=True, seed=3, rank=1, world_size=2, drop_last=True,
                         sort_by_length=bucket, progress=lambda: done["n"])
    _set_sampler_epoch(loader, 2)  # what Lightning's fit loop calls each epoch
    full = rank_ids(loader)
    assert full != rank_ids(make_loader(ds, batch_size=4, shuffle=True, seed=3, rank=1, world_size=2,
                                        drop_last=True, sort_by_length=bucket))  # epoch 2 differs from 0
    done["n"] = 2  # the trainer finished 2 batches of epoch 2 when the checkpoint was taken
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches_done": 2}

    fresh = make_loader(ds, batch_size=4, shuffle=True, seed=3, rank=1, world_size=2, drop_last=True,
                        sort_by_length=bucket)
    fresh.load_state_dict(state)
    _set_sampler_epoch(fresh, 2)
    assert rank_ids(fresh) == full[8:]  # the rest of epoch 2, nothing loaded twice
    assert rank_ids(fresh) == full  # the skip applies once
    fresh.load_state_dict(state)
    _set_sampler_epoch(fresh, 3)  # the checkpoint's epoch is over: a new epoch starts whole
    assert len(rank_ids(fresh)) == len(full)
