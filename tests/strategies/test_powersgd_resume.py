"""PowerSGD's memory in checkpoints: two gloo processes train with torch's hook under Lightning, one
run uninterrupted, one resumed from the checkpoint of its first epoch end; each rank's error memory,
Q memory, counter and random draws come back, and the resumed run ends on the uninterrupted run's
parameters (before, a resume restarted the warm-up and the memory: 0.143 apart)."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asrbench.strategies.powersgd import CHECKPOINT_KEY, PowerSGDStrategy, powersgd_state_dict

STRATEGY_TIMEOUT_S = 30


class TinyLSTM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm = nn.LSTM(8, 48, batch_first=True)
        self.head = nn.Linear(48, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out, _ = self.lstm(x)
        return nn.functional.cross_entropy(self.head(out[:, -1]), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(128, 5, 8, generator=gen)
        y = x[:, :, :4].sum(1).argmax(1)
        return DataLoader(TensorDataset(x, y), batch_size=16)


class Probe(pl.Callback):
    """Writes each rank's PowerSGD memory (at the start, at the saved epoch end) and final parameters."""

    def __init__(self, out_dir: Path, tag: str, save_at_epoch: int | None = None) -> None:
        self.out_dir, self.tag, self.save_at_epoch = out_dir, tag, save_at_epoch

    def _dump(self, trainer, name, obj):
        torch.save(obj, self.out_dir / f"{self.tag}_{name}_rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer, pl_module):
        self._dump(trainer, "start", powersgd_state_dict(trainer.strategy.hook_state.powersgd))

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.save_at_epoch:
            trainer.save_checkpoint(self.out_dir / "mid.ckpt")
            self._dump(trainer, "saved", powersgd_state_dict(trainer.strategy.hook_state.powersgd))

    def on_train_end(self, trainer, pl_module):
        self._dump(trainer, "end", [p.detach().clone() for p in pl_module.parameters()])


def _fit(tmp_path: Path, tag: str, *, ckpt: Path | None = None, save_at_epoch: int | None = None) -> None:
    strategy = PowerSGDStrategy(rank=2, warmup_steps=2, start_method="forkserver", timeout=STRATEGY_TIMEOUT_S)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Probe(tmp_path, tag, save_at_epoch)], default_root_dir=tmp_path)
    trainer.fit(TinyLSTM(), ckpt_path=ckpt)


def _load(tmp_path: Path, tag: str, name: str, rank: int):
    return torch.load(tmp_path / f"{tag}_{name}_rank{rank}.pt", weights_only=True)


@pytest.mark.slow
def test_powersgd_resume_restores_each_ranks_memory_and_equals_the_uninterrupted_run(tmp_path: Path):
    _fit(tmp_path, "full", save_at_epoch=0)  # 4 steps an epoch: 2 dense, then 2 compressed before the save
    saved = [_load(tmp_path, "full", "saved", r) for r in range(2)]
    assert saved[0]["iter"] == 4 and "error.0" in saved[0] and "q.0" in saved[0]
    assert not torch.equal(saved[0]["error.0"], saved[1]["error.0"])  # rank-local: the ranks saw different data
    entry = torch.load(tmp_path / "mid.ckpt", weights_only=True)[CHECKPOINT_KEY]
    assert entry["world_size"] == 2
    for r in range(2):
        assert torch.equal(entry["ranks"][r]["error.0"], saved[r]["error.0"])
        assert torch.equal(entry["ranks"][r]["layout.0"], entry["ranks"][0]["layout.0"])

    _fit(tmp_path, "resumed", ckpt=tmp_path / "mid.ckpt")
    for r in range(2):
        start = _load(tmp_path, "resumed", "start", r)
        assert start["iter"] == 4 and torch.equal(start["rng_keys"], saved[r]["rng_keys"])
        for key in ("error.0", "q.0"):  # in the order of the bucket when saved; the hook reorders them if needed
            assert torch.equal(start[key], saved[r][key]), key
        resumed, full = _load(tmp_path, "resumed", "end", r), _load(tmp_path, "full", "end", r)
        worst = max(float((a - b).abs().max()) for a, b in zip(resumed, full))
        assert worst <= 1e-6, worst
