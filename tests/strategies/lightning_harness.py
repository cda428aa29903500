"""Two gloo processes training a tiny LSTM under Lightning, for the resume tests of the hook
strategies: the module, a probe that writes each rank's view under a directory, one fit and the
load of what the probe wrote."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyLSTM(pl.LightningModule):
    """An LSTM and a linear head on 128 fixed random sequences (4 steps of 16 per rank and epoch).

    ``fail_rank`` raises on that rank at step 2; ``log_comm`` logs the loss and the strategy's
    ``comm_metrics()`` every step."""

    def __init__(self, fail_rank: int | None = None, log_comm: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm = nn.LSTM(8, 48, batch_first=True)
        self.head = nn.Linear(48, 4)
        self.fail_rank, self.log_comm = fail_rank, log_comm

    def training_step(self, batch, batch_idx):
        if self.global_rank == self.fail_rank and self.global_step == 2:
            raise ValueError(f"injected failure on rank {self.global_rank}")
        x, y = batch
        out, _ = self.lstm(x)
        loss = nn.functional.cross_entropy(self.head(out[:, -1]), y)
        if self.log_comm:
            self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.log_comm:
            self.log_dict({f"comm/{k}": v for k, v in self.trainer.strategy.comm_metrics().items()}, on_step=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(128, 5, 8, generator=gen)
        y = x[:, :, :4].sum(1).argmax(1)
        return DataLoader(TensorDataset(x, y), batch_size=16)


class RankProbe(pl.Callback):
    """Writes each rank's view under `out_dir` as ``<tag>_<name>_rank<r>.pt``: ``start`` (at the
    start of training), ``saved`` (its rank-local memory when the checkpoint ``mid.ckpt`` is written
    at the end of epoch `save_at_epoch`) and ``end``. A subclass says what each holds."""

    def __init__(self, out_dir: Path, tag: str, save_at_epoch: int | None = None) -> None:
        self.out_dir, self.tag, self.save_at_epoch = out_dir, tag, save_at_epoch

    def memory(self, trainer: pl.Trainer) -> Any:
        """This rank's rank-local memory (what ``saved`` holds)."""
        raise NotImplementedError

    def start(self, trainer: pl.Trainer) -> Any:
        return self.memory(trainer)

    def end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        return [p.detach().clone() for p in pl_module.parameters()]

    def _dump(self, trainer, name, obj):
        torch.save(obj, self.out_dir / f"{self.tag}_{name}_rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer, pl_module):
        self._dump(trainer, "start", self.start(trainer))

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.save_at_epoch:
            trainer.save_checkpoint(self.out_dir / "mid.ckpt")
            self._dump(trainer, "saved", self.memory(trainer))

    def on_train_end(self, trainer, pl_module):
        self._dump(trainer, "end", self.end(trainer, pl_module))


def fit_two_ranks(tmp_path: Path, strategy: Any, probe: pl.Callback, module: pl.LightningModule, *, epochs: int,
                  ckpt: Path | None = None) -> pl.Trainer:
    """`module` fitted by 2 CPU processes of `strategy` for `epochs` (from `ckpt` if given), `probe` watching."""
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[probe], default_root_dir=tmp_path)
    trainer.fit(module, ckpt_path=ckpt)
    return trainer


def load_rank(tmp_path: Path, tag: str, name: str, rank: int, weights_only: bool = True) -> Any:
    """What a :class:`RankProbe` wrote as `name` for `rank` in the run `tag`."""
    return torch.load(tmp_path / f"{tag}_{name}_rank{rank}.pt", weights_only=weights_only)
