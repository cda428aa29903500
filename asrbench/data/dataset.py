"""Utterances as training items, padded batches, and per-rank loaders.

Each rank of a job reads exactly the indices `torch.utils.data.DistributedSampler` gives it
for `(num_replicas=world_size, rank, shuffle, seed, drop_last)` and the epoch, so a simulated
cluster reproduces every worker's data without running it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from asrbench.data import text as textlib
from asrbench.data.features import SplitFeatures
from asrbench.errors import ConfigError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # frame label of padding and of unaligned utterances (torch cross_entropy's default)


class SpeechDataset(Dataset):
    """Item i: `feats` (T, D) float32, `targets` (L,) character ids, `utt_id`, and, when frame
    labels are given, `frame_labels` (T,) — all IGNORE_INDEX for an utterance without labels."""

    def __init__(self, split: SplitFeatures, frame_labels: Mapping[str, torch.Tensor] | None = None) -> None:
        self.split = split
        self.lengths = split.lengths
        self.targets = [torch.tensor(textlib.encode(t), dtype=torch.long) for t in split.texts]
        self.frame_labels: list[torch.Tensor | None] | None = None
        if frame_labels is not None:
            self.frame_labels = [frame_labels.get(u) for u in split.utt_ids]
            for utt, labels, length in zip(split.utt_ids, self.frame_labels, split.lengths.tolist()):
                if labels is not None and len(labels) != length:
                    raise ValueError(f"frame labels of {utt} have {len(labels)} frames but its features have "
                                     f"{length}; align again with the current feature configuration")
            missing = sum(labels is None for labels in self.frame_labels)
            if missing:
                log.warning("%d of %d utterances have no frame labels; their frames are ignored",
                            missing, len(split))

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict:
        feats = self.split.feats(i)
        item = {"feats": feats, "targets": self.targets[i], "utt_id": self.split.utt_ids[i]}
        if self.frame_labels is not None:
            labels = self.frame_labels[i]
            item["frame_labels"] = (labels.long() if labels is not None
                                    else torch.full((feats.shape[0],), IGNORE_INDEX, dtype=torch.long))
        return item


def collate(batch: Sequence[dict]) -> dict:
    """Pad a list of items: feats with 0, targets with 0 (the blank), frame labels with IGNORE_INDEX."""
    out = {
        "feats": pad_sequence([b["feats"] for b in batch], batch_first=True),
        "feat_lens": torch.tensor([b["feats"].shape[0] for b in batch], dtype=torch.long),
        "targets": pad_sequence([b["targets"] for b in batch], batch_first=True, padding_value=0),
        "target_lens": torch.tensor([b["targets"].shape[0] for b in batch], dtype=torch.long),
        "utt_ids": [b["utt_id"] for b in batch],
    }
    with_labels = ["frame_labels" in b for b in batch]
    assert all(with_labels) or not any(with_labels), "frame labels on some items only"
    if with_labels[0]:
        out["frame_labels"] = pad_sequence([b["frame_labels"] for b in batch], batch_first=True,
                                           padding_value=IGNORE_INDEX)
    return out


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Batches of similar length over exactly the indices of a DistributedSampler.

    Each epoch the rank's indices (DistributedSampler order) are cut into chunks of
    `batch_size * bucket_batches`, each chunk is sorted by length and cut into batches, and,
    when shuffling, the batch order is permuted with a generator seeded by (seed, epoch).
    Less padding, same data per rank, same number of batches on every rank.
    """

    def __init__(self, sampler: DistributedSampler, lengths: torch.Tensor, batch_size: int, drop_last: bool,
                 bucket_batches: int = 50) -> None:
        self.sampler, self.lengths = sampler, lengths
        self.batch_size, self.drop_last, self.bucket_batches = batch_size, drop_last, bucket_batches

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        indices = torch.tensor(list(self.sampler), dtype=torch.long)
        if self.drop_last:  # drop the same tail as DataLoader(drop_last=True) would
            indices = indices[: len(indices) // self.batch_size * self.batch_size]
        chunk = self.batch_size * self.bucket_batches
        batches: list[list[int]] = []
        for start in range(0, len(indices), chunk):
            part = indices[start:start + chunk]
            part = part[torch.argsort(self.lengths[part], descending=True, stable=True)]
            batches += [b.tolist() for b in part.split(self.batch_size)]
        if self.sampler.shuffle:
            g = torch.Generator().manual_seed(self.sampler.seed + self.sampler.epoch)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return iter(batches)


class ResumableBatchSampler(Sampler[list[int]]):
    """A batch sampler that can start its next epoch part-way: after `resume_at(epoch, n)`, the
    iteration of that epoch skips its first n batches (indices only: no data is loaded for them).

    `set_epoch` reaches the DistributedSampler underneath (through a BatchSampler or a
    LengthBucketBatchSampler), as Lightning's ``_set_sampler_epoch`` expects.
    """

    def __init__(self, batches: BatchSampler | LengthBucketBatchSampler) -> None:
        self.batches = batches
        self._resume: tuple[int, int] | None = None

    @property
    def sampler(self) -> DistributedSampler:
        """The DistributedSampler underneath: Lightning's ``_set_sampler_epoch`` sets its epoch."""
        return self.batches.sampler

    @property
    def epoch(self) -> int:
        return int(self.sampler.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        self._resume = (int(epoch), int(batches_done))

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the body runs at the first batch, after Lightning has set the epoch.
        skip = 0
        if self._resume is not None:
            epoch, done = self._resume
            self._resume = None
            if epoch == self.epoch:
                skip = done
        for i, batch in enumerate(self.batches):
            if i >= skip:
                yield batch


class ResumableDataLoader(DataLoader):
    """A training DataLoader Lightning checkpoints mid-epoch (it implements ``state_dict`` /
    ``load_state_dict``, Lightning's stateful-loader interface).

    The state is (epoch, batches the trainer finished this epoch); `progress` gives the second
    (the trainer's count: Lightning fetches one batch ahead, so the loader's own count is one too
    many). Resuming from a checkpoint taken after batch n of epoch e then trains on batch n + 1 of
    the same order, so an interrupted run continues exactly where it stopped.
    """

    def __init__(self, *args: Any, progress: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        sampler: ResumableBatchSampler = self.batch_sampler  # type: ignore[assignment]
        return {"epoch": sampler.epoch, "batches_done": int(self.progress()) if self.progress else 0}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.batch_sampler.resume_at(state["epoch"], state["batches_done"])  # type: ignore[union-attr]


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, rank: int = 0,
                world_size: int = 1, epoch: int = 0, num_workers: int = 0, drop_last: bool = False,
                sort_by_length: bool = False, progress: Callable[[], int] | None = None) -> ResumableDataLoader:
    """The loader of rank `rank` of `world_size` for `epoch`.

    Indices come from `DistributedSampler(dataset, world_size, rank, shuffle, seed, drop_last)`
    with `set_epoch(epoch)` (call `loader.batch_sampler.set_epoch` for later epochs, as
    Lightning does, or build a new loader). `drop_last` drops both the tail that does not
    divide among the ranks (otherwise DistributedSampler repeats indices to even them out) and
    the last incomplete batch. `sort_by_length` groups similar lengths (LengthBucketBatchSampler)
    over the same per-rank indices. The loader resumes mid-epoch from Lightning checkpoints
    (:class:`ResumableDataLoader`; `progress` returns the batches the trainer finished this epoch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    sampler.set_epoch(epoch)
    if sort_by_length:
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            raise ValueError("sort_by_length needs a dataset with a `lengths` tensor (SpeechDataset has one)")
        batches: BatchSampler | LengthBucketBatchSampler = LengthBucketBatchSampler(
            sampler, torch.as_tensor(lengths), batch_size, drop_last)
    else:
        batches = BatchSampler(sampler, batch_size, drop_last)
    resumable = ResumableBatchSampler(batches)
    resumable.set_epoch(epoch)
    return ResumableDataLoader(dataset, batch_sampler=resumable, collate_fn=collate, num_workers=num_workers,
                               progress=progress)


def train_batches_per_epoch(utterances: int, *, batch_size: int, world_size: int) -> int:
    """Optimizer steps per epoch of a training loader (``make_loader(drop_last=True)``): each rank's
    shard of ``utterances // world_size`` cut into full batches, the same count on every rank.

    A run in which that is zero would train nothing: a one-line ConfigError says why and what to change.
    """
    shard = utterances // world_size
    batches = shard // batch_size
    if batches == 0:
        change = [f"batch_size<={shard}"] if shard else []
        if world_size > 1 and utterances // batch_size >= 2:
            change.append(f"nodes<={utterances // batch_size}")
        fix = f"set {' or '.join(change)} or add training utterances" if change else "add training utterances"
        raise ConfigError(f"each worker's shard of the {utterances} training utterances (nodes={world_size}) holds "
                          f"{shard}, fewer than batch_size={batch_size}: the run would train 0 steps (a worker "
                          f"steps on full batches only); {fix}")
    return batches
