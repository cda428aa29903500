"""What the bench figures run on: the configs of conf/, synthetic batches and features, and
`asrbench train`'s training module."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from asrbench.data import text
from asrbench.data.features import FeatureConfig, SplitFeatures
from asrbench.errors import ConfigError
from asrbench.model.module import AcousticModule

CONF = Path(__file__).resolve().parents[1] / "conf"
INPUT_DIM = FeatureConfig().dim  # 240: 80 mel bins x 3 stacked frames
GRADIENT_CLIP_VAL = 5.0  # conf/trainer/default.yaml, on both sides of every training figure
OPTIM = {"name": "adam", "lr": 0.0015}  # conf/train.yaml's optimizer


def model_config(name: str) -> dict[str, Any]:
    """conf/model/<name>.yaml as a dict."""
    path = CONF / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"bench model {name!r} is not in conf/model/; use one of "
                          f"{', '.join(sorted(p.stem for p in path.parent.glob('*.yaml')))}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def strategy_config(name: str, batch_size: int) -> dict[str, Any]:
    """conf/strategy/<name>.yaml resolved (its `${batch_size}` is the bench's per-worker batch)."""
    cfg = OmegaConf.create({"batch_size": batch_size, "strategy": OmegaConf.load(CONF / "strategy" / f"{name}.yaml")})
    return OmegaConf.to_container(cfg, resolve=True)["strategy"]


# ---------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------
def synthetic_batch(batch_size: int, frames: int, seed: int, input_dim: int = INPUT_DIM) -> dict[str, Any]:
    """A padded training batch of full-length utterances: `frames` stacked frames, frames // 4 characters."""
    gen = torch.Generator().manual_seed(seed)
    target_len = max(1, frames // 4)
    return {"feats": torch.randn(batch_size, frames, input_dim, generator=gen),
            "feat_lens": torch.full((batch_size,), frames, dtype=torch.long),
            "targets": torch.randint(1, text.vocab_size(), (batch_size, target_len), generator=gen),
            "target_lens": torch.full((batch_size,), target_len, dtype=torch.long)}


def synthetic_features(directory: Path, utterances: int, frames: Sequence[int], seed: int = 0,
                       input_dim: int = INPUT_DIM) -> SplitFeatures:
    """A split of random features in the cache's format: one fp16 shard on disk, read through mmap.

    Lengths are uniform in [frames[0], frames[1]] stacked frames; transcripts are random letters,
    a quarter as many as frames.
    """
    gen = torch.Generator().manual_seed(seed)
    lo, hi = int(frames[0]), int(frames[1])
    if not 4 <= lo <= hi:
        raise ConfigError(f"bench frames must be [min, max] with 4 <= min <= max, got {list(frames)}")
    lengths = torch.randint(lo, hi + 1, (utterances,), generator=gen)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"bench-{utterances}-{lo}-{hi}-{seed}.pt"
    torch.save({"feats": torch.randn(int(lengths.sum()), input_dim, generator=gen).half()}, path)
    letters = text.ALPHABET[3:]
    texts = ["".join(letters[int(i)] for i in torch.randint(0, len(letters), (int(n) // 4,), generator=gen))
             for n in lengths]
    return SplitFeatures([path], [f"bench-{i:06d}" for i in range(utterances)], texts, lengths,
                         torch.zeros(utterances, dtype=torch.long), torch.cumsum(lengths, 0) - lengths,
                         {"mean": torch.zeros(input_dim), "std": torch.ones(input_dim)})


class FixedBatches(torch.utils.data.Dataset):
    """`length` items cycling over a few prebuilt batches (a DataLoader with batch_size=None)."""

    def __init__(self, batches: Sequence[dict[str, Any]], length: int) -> None:
        self.batches, self.length = list(batches), length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.batches[i % len(self.batches)]


def acoustic_module(model: str, world_size: int = 1, seed: int = 0) -> Any:
    """The training module of `asrbench train` (CTC) for conf/model/<model>.yaml, seeded."""

    torch.manual_seed(seed)
    return AcousticModule(INPUT_DIM, model_config(model), dict(OPTIM), "ctc", world_size=world_size)
