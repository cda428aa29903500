"""The inputs of one run: config -> corpus (synthesised when it is the embedded default), features,
frame labels (the synthesiser's phone timings or a forced alignment) and the Lightning data module that
shards them over ranks. Hydra's config is read here; the readers themselves live in asrbench.data."""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
import torch
from torch import Tensor

from asrbench.data import phones
from asrbench.data.corpus import scan_splits
from asrbench.data.dataset import SpeechDataset, make_loader
from asrbench.data.features import FeatureConfig, SplitFeatures, prepare_features
from asrbench.data.synth import generate_corpus
from asrbench.errors import ConfigError
from asrbench.model.align import read_alignments

log = logging.getLogger("asrbench.experiment")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
_ENSURED: set[tuple[str, str]] = set()  # synthetic corpora this process has checked or generated


def data_root(data_cfg: Mapping) -> Path:
    if not data_cfg.get("root"):
        raise ConfigError(f"data={data_cfg.get('name')} needs data.root=DIR (the corpus directory)")
    return Path(to_absolute_path(str(data_cfg["root"])))


def ensure_corpus(data_cfg: Mapping, progress: bool = True) -> Path:
    """The corpus root; for `kind: synth` generate it first if needed (idempotent, and checked once
    per process: one `train` asks for the phone classes and then for the features)."""
    root = data_root(data_cfg)
    if data_cfg.get("kind") == "synth":
        cfg = OmegaConf.to_container(data_cfg["synth"], resolve=True) if isinstance(
            data_cfg["synth"], DictConfig) else dict(data_cfg["synth"])
        sentences = Path(str(cfg["sentences"]))
        if not sentences.is_absolute():  # relative to the cwd, else to the asrbench checkout
            cwd_path = Path(to_absolute_path(str(sentences)))
            sentences = cwd_path if cwd_path.exists() else PROJECT_ROOT / sentences
        cfg["sentences"] = str(sentences)
        key = (str(root), json.dumps(cfg, sort_keys=True, default=str))
        if key not in _ENSURED or not (root / ".done").is_file():
            generate_corpus(root, cfg, progress=progress)
            _ENSURED.add(key)
    return root


def split_names(data_cfg: Mapping) -> dict[str, list[str]]:
    """Feature-split name -> corpus subsets: `train`, `dev`, and each test subset by its own name."""
    names = {"train": list(data_cfg["train_subsets"]), "dev": list(data_cfg["dev_subsets"])}
    for subset in data_cfg.get("test_subsets") or []:
        names[subset] = [subset]
    return names


def load_features(cfg: DictConfig, progress: bool = True) -> dict[str, SplitFeatures]:
    root = ensure_corpus(cfg.data, progress)
    utts = scan_splits(cfg.data, root, split_names(cfg.data))
    cache = Path(to_absolute_path(cfg.data.cache_dir)) if cfg.data.get("cache_dir") else root / "features"
    fcfg = FeatureConfig(**OmegaConf.to_container(cfg.features, resolve=True))
    return prepare_features(utts, fcfg, cache, progress=progress,
                            on_bad_utterance=cfg.data.get("on_bad_utterance", "skip"))


def _check_phone_labels(cfg: DictConfig) -> None:
    """The settings ``data.phone_labels=true`` cannot go with, each refused in one line."""
    if cfg.data.get("alignments"):
        raise ConfigError("data.phone_labels=true and data.alignments are two sources of frame labels; set one "
                          "(data.alignments=null for the synthesiser's phone timings)")
    if cfg.criterion != "ctc":
        raise ConfigError(f"data.phone_labels=true scores a phone probe beside a CTC model; criterion={cfg.criterion} "
                          f"trains on frame labels itself: use criterion=ctc, or data.alignments with criterion=ce")
    if cfg.data.get("kind") != "synth":
        raise ConfigError(f"data.phone_labels=true needs the synthesiser's phoneme timings; data={cfg.data.get('name')} "
                          f"has none: set data.phone_labels=false (or data.alignments=DIR from `asrbench align`)")


def phone_set(cfg: DictConfig, progress: bool = True) -> list[str] | None:
    """With ``data.phone_labels``, the phone labels' classes (silence first) from the training subsets'
    timings, generating a synthetic corpus first if needed; None without it."""
    if not cfg.data.get("phone_labels"):
        return None
    _check_phone_labels(cfg)

    root = ensure_corpus(cfg.data, progress)
    return phones.inventory(phones.read_timings(root, split_names(cfg.data)["train"]).values())


def load_frame_labels(cfg: DictConfig, feats: Mapping[str, SplitFeatures] | None = None
                      ) -> dict[str, torch.Tensor] | None:
    """Frame labels of every split: forced-alignment labels (``data.alignments``) or phone labels from the
    synthesiser's timings (``data.phone_labels``, which needs `feats` for the frame counts); None without."""
    if cfg.data.get("phone_labels"):
        _check_phone_labels(cfg)
        if feats is None:  # also generates the corpus if needed
            feats = load_features(cfg, progress=False)
        lengths = {u: int(n) for split in feats.values() for u, n in zip(split.utt_ids, split.lengths.tolist())}
        names = split_names(cfg.data)
        timings = phones.read_timings(data_root(cfg.data), [s for group in names.values() for s in group])
        classes = phones.inventory(timings[s] for s in names["train"])  # as phone_set gives the module
        f = cfg.features
        labels = phones.phone_frame_labels(timings, lengths, classes,
                                           frame_shift_ms=float(f.frame_shift_ms),
                                           frame_length_ms=float(f.frame_length_ms), stack=int(f.stack),
                                           skip=int(f.skip))
        silence = phones.check_labels(labels, len(classes))
        log.debug("phone labels: %d utterances, %d classes, %.0f%% of frames silence", len(labels), len(classes),
                  silence * 100)
        return labels
    ali = cfg.data.get("alignments")
    if not ali:
        return None
    subsets = [s for group in split_names(cfg.data).values() for s in group]
    return read_alignments(Path(to_absolute_path(ali)), subsets)


class SpeechDataModule(L.LightningDataModule):
    """Train/dev loaders; each rank reads exactly the shard DistributedSampler gives it."""

    def __init__(self, feats: Mapping[str, SplitFeatures], frame_labels, batch_size: int,
                 eval_batch_size: int, seed: int, num_workers: int = 0, bucket_by_length: bool = False) -> None:
        super().__init__()
        self.feats, self.frame_labels = feats, frame_labels
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.num_workers, self.bucket_by_length = seed, num_workers, bucket_by_length

    def _loader(self, split: str, batch_size: int, shuffle: bool):
        return make_loader(SpeechDataset(self.feats[split], self.frame_labels), batch_size=batch_size,
                           shuffle=shuffle, seed=self.seed, rank=self.trainer.global_rank,
                           world_size=self.trainer.world_size, num_workers=self.num_workers,
                           drop_last=shuffle, sort_by_length=self.bucket_by_length and shuffle,
                           progress=self._batches_done if shuffle else None)

    def _batches_done(self) -> int:
        """Training batches the trainer finished in this epoch (what a checkpoint resumes after)."""
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def train_dataloader(self):
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self):
        return self._loader("dev", self.eval_batch_size, shuffle=False)


@dataclass
class RunData:
    """The features of every split, and frame labels when the run has alignments."""

    feats: dict[str, SplitFeatures]
    frame_labels: dict[str, Tensor] | None


def feature_dim(cfg: DictConfig) -> int:
    return FeatureConfig(**OmegaConf.to_container(cfg.features, resolve=True)).dim


def load_run_data(cfg: DictConfig, progress: bool = True) -> RunData:
    """The run's features and frame labels; criterion=ce needs the latter."""
    feats = load_features(cfg, progress=progress)
    frame_labels = load_frame_labels(cfg, feats)
    if cfg.criterion == "ce" and frame_labels is None:
        raise ConfigError("criterion=ce trains on frame labels: run `asrbench align run=DIR` and pass "
                          "data.alignments=<its output dir>")
    return RunData(feats, frame_labels)

