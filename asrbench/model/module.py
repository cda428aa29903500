"""LightningModule for the acoustic model: CTC or frame cross-entropy, greedy decoding, WER/CER/FER.

Training loss is per frame for CE and per utterance (summed over frames, averaged over the
batch) for CTC. :meth:`AcousticModule.worker_losses` gives that loss for each of several workers'
batches concatenated into one (the simulated cluster's batched sync), each reduced as alone.
Validation metrics use torchmetrics so they are exact across DDP ranks.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.text import CharErrorRate, WordErrorRate

from asrbench.data import text
from asrbench.model.decode import greedy_decode
from asrbench.model.lstm import LSTMAcousticModel
from asrbench.model.optim import FrozenVarianceAdam, fused_option

CRITERIA = ("ctc", "ce")


def criterion_loss(logits: torch.Tensor, batch: dict, criterion: str) -> torch.Tensor:
    """The training loss of a batch: CTC per utterance (normalised by its target length, averaged
    over the batch) or frame cross-entropy averaged over labelled frames."""
    if criterion == "ctc":
        log_probs = logits.log_softmax(-1).transpose(0, 1)  # (T, B, C)
        return F.ctc_loss(log_probs, batch["targets"], batch["feat_lens"], batch["target_lens"],
                          blank=0, reduction="mean", zero_infinity=True)
    if "frame_labels" not in batch:
        raise ValueError("criterion=ce needs frame labels: run `asrbench align` and set data.alignments=DIR")
    return F.cross_entropy(logits.flatten(0, 1), batch["frame_labels"].flatten(), ignore_index=-100)


def probe_loss(phone_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Frame cross-entropy of the phone probe over labelled frames; 0 (in the graph) when none is labelled."""
    if not bool((labels != -100).any()):
        return phone_logits.sum() * 0.0
    return F.cross_entropy(phone_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def _owners(sizes: Sequence[int], device: torch.device) -> torch.Tensor:
    """Each utterance's worker, for workers of sizes[i] utterances each, in worker order."""
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.as_tensor(sizes, device=device))


def _worker_means(values: torch.Tensor, counts: torch.Tensor, owner: torch.Tensor, workers: int) -> torch.Tensor:
    """Per worker: the sum of `values` whose `owner` is that worker, over that worker's `counts`."""
    sums = values.new_zeros(workers).index_add(0, owner, values)
    return sums / counts.to(values.dtype)


def _frame_losses(logits: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor, workers: int, *,
                  empty_is_zero: bool) -> torch.Tensor:
    """Frame cross-entropy averaged over each worker's labelled frames: NaN (as torch's mean gives) or,
    with `empty_is_zero`, 0 in the graph for a worker without any."""
    per_frame = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    frame_owner = owner.repeat_interleave(labels.shape[1])
    counts = torch.zeros(workers, dtype=torch.long, device=labels.device).index_add(
        0, frame_owner, (labels.flatten() != -100).long())
    return _worker_means(per_frame, counts.clamp(min=1) if empty_is_zero else counts, frame_owner, workers)


def criterion_losses(logits: torch.Tensor, batch: dict, criterion: str, sizes: Sequence[int]) -> torch.Tensor:
    """:func:`criterion_loss` of each worker whose batch of sizes[i] utterances lies, in worker order,
    in `batch`: (len(sizes),), each reduced over its own worker's utterances (CTC: per utterance over
    its target length, averaged over the worker's batch) or labelled frames (CE), as alone."""
    workers = len(sizes)
    owner = _owners(sizes, logits.device)
    if criterion == "ctc":
        log_probs = logits.log_softmax(-1).transpose(0, 1)  # (T, B, C)
        per_utt = F.ctc_loss(log_probs, batch["targets"], batch["feat_lens"], batch["target_lens"],
                             blank=0, reduction="none", zero_infinity=True)
        per_utt = per_utt / batch["target_lens"].to(per_utt.device).clamp(min=1).to(per_utt.dtype)
        return _worker_means(per_utt, torch.as_tensor(sizes, device=logits.device), owner, workers)
    if "frame_labels" not in batch:
        raise ValueError("criterion=ce needs frame labels: run `asrbench align` and set data.alignments=DIR")
    return _frame_losses(logits, batch["frame_labels"], owner, workers, empty_is_zero=False)


def targets_to_text(targets: torch.Tensor, target_lens: torch.Tensor) -> list[str]:
    return [text.decode(row[:n].tolist()) for row, n in zip(targets.cpu(), target_lens.cpu())]


class AcousticModule(L.LightningModule):
    def __init__(self, input_dim: int, model: dict, optim: dict, criterion: str = "ctc",
                 world_size: int = 1, num_phones: int = 0) -> None:
        super().__init__()
        if criterion not in CRITERIA:
            raise ValueError(f"criterion={criterion!r} is unknown; use one of {CRITERIA}")
        if num_phones and criterion != "ctc":
            raise ValueError("a phone probe (num_phones > 0) reads frame labels as phones; criterion=ce reads them "
                             "as the output units: use criterion=ctc")
        self.save_hyperparameters()
        model_kw = {k: v for k, v in model.items() if k != "name"}
        self.model = LSTMAcousticModel(input_dim, text.vocab_size(), num_phones=num_phones, **model_kw)
        self.criterion = criterion
        self.optim_cfg = dict(optim)
        self.world_size = world_size
        self.val_wer, self.val_cer = WordErrorRate(), CharErrorRate()
        self.val_loss = MeanMetric()
        self.val_frames_wrong, self.val_frames = SumMetric(), SumMetric()
        self._t_last: float | None = None
        self.steps_per_epoch = 0  # optimizer steps per epoch per worker, set once the data is read (experiment.train)
        self.frames_seen = 0  # stacked frames this worker trained on (checkpoint.RunCounts carries it over a resume)
        self.train_time_s = 0.0  # wall time inside training batches (forward, backward, communication)
        self._t_batch = 0.0

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(feats, feat_lens)

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """The training loss: the criterion, plus the phone probe's frame cross-entropy when the model
        has one (its gradient stops at the probe, so the acoustic model trains on the criterion alone)."""
        loss = criterion_loss(logits, batch, self.criterion)
        if self.model.phone_probe is not None and "frame_labels" in batch:
            loss = loss + probe_loss(self.model.phone_logits(), batch["frame_labels"])
        return loss

    def worker_losses(self, logits: torch.Tensor, batch: dict, sizes: Sequence[int]) -> torch.Tensor:
        """:meth:`loss` of each of len(sizes) workers whose batches (sizes[i] utterances each, in worker
        order) were concatenated into `batch`: each reduced over its own utterances and frames as
        :meth:`loss` reduces that worker's batch alone, so the gradient of their mean is the mean of the
        workers' gradients (sync's all-reduce), up to float summation order."""
        losses = criterion_losses(logits, batch, self.criterion, sizes)
        if self.model.phone_probe is not None and "frame_labels" in batch:
            losses = losses + _frame_losses(self.model.phone_logits(), batch["frame_labels"],
                                            _owners(sizes, logits.device), len(sizes), empty_is_zero=True)
        return losses

    def probe_parameters(self) -> list[torch.nn.Parameter]:
        """The phone probe's parameters (none without one); they come last in the model's parameters."""
        return list(self.model.phone_probe.parameters()) if self.model.phone_probe is not None else []

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, except that the phone probe is clipped by its own norm: the acoustic
        model's gradient is then clipped exactly as in a model without a probe."""
        probe = self.probe_parameters()
        if not probe or not gradient_clip_val or gradient_clip_algorithm == "value":
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        ids = {id(p) for p in probe}
        for group in ([p for p in self.parameters() if id(p) not in ids], probe):
            torch.nn.utils.clip_grad_norm_(group, float(gradient_clip_val))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["feats"], batch["feat_lens"])
        loss = self.loss(logits, batch)
        frames = float(batch["feat_lens"].sum())
        self.frames_seen += int(frames)
        now = time.perf_counter()
        metrics = {"train/loss": loss.detach()}
        if self._t_last is not None:
            metrics["train/frames_per_s"] = frames * self.world_size / max(now - self._t_last, 1e-9)
        self._t_last = now
        self.log_dict(metrics, prog_bar=False, on_step=True, on_epoch=False, batch_size=len(batch["feat_lens"]))
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._t_batch = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.train_time_s += time.perf_counter() - self._t_batch
        comm = getattr(self.trainer.strategy, "comm_metrics", None)
        # log_dict costs ~1 ms a metric: only on the steps the logger writes
        if comm is not None and self.trainer.global_step % max(self.trainer.log_every_n_steps, 1) == 0:
            self.log_dict({f"comm/{k}": float(v) for k, v in comm().items()}, on_step=True, on_epoch=False)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["feats"], batch["feat_lens"])
        if self.criterion == "ctc" or "frame_labels" in batch:  # the criterion alone: comparable with or without a probe
            self.val_loss.update(criterion_loss(logits, batch, self.criterion).detach())
        hyps = greedy_decode(logits, batch["feat_lens"])
        refs = targets_to_text(batch["targets"], batch["target_lens"])
        self.val_wer.update(hyps, refs)
        self.val_cer.update(hyps, refs)
        if "frame_labels" in batch:
            labels = batch["frame_labels"]
            mask = labels != -100
            self.val_frames_wrong.update(((self.model.frame_logits(logits).argmax(-1) != labels) & mask).sum().float())
            self.val_frames.update(mask.sum().float())

    def on_validation_epoch_end(self) -> None:
        metrics = {"val/wer": self.val_wer.compute(), "val/cer": self.val_cer.compute()}
        if self.val_loss.update_called:
            metrics["val/loss"] = self.val_loss.compute()
        if self.val_frames.update_called:
            metrics["val/fer"] = self.val_frames_wrong.compute() / self.val_frames.compute().clamp(min=1)
        self.log_dict(metrics, prog_bar=True)
        for m in (self.val_wer, self.val_cer, self.val_loss, self.val_frames_wrong, self.val_frames):
            m.reset()

    def configure_optimizers(self) -> Any:
        cfg = self.optim_cfg
        lr = scaled_lr(cfg["lr"], cfg.get("lr_scaling", "none"), self.world_size)
        name = cfg.get("name", "adam")
        fused = fused_option(cfg)  # True or None (torch's default, as before optim.fused existed)
        if name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=lr, momentum=cfg.get("momentum", 0.0),
                                  weight_decay=cfg.get("weight_decay", 0.0), fused=fused)
        elif name in ("adam", "adamw") and cfg.get("freeze_variance_after"):
            opt = FrozenVarianceAdam(self.parameters(), lr=lr, weight_decay=cfg.get("weight_decay", 0.0),
                                     freeze_after=int(cfg["freeze_variance_after"]),
                                     decoupled_weight_decay=name == "adamw")
        elif name in ("adam", "adamw"):
            cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
            opt = cls(self.parameters(), lr=lr, weight_decay=cfg.get("weight_decay", 0.0), fused=fused)
        else:
            raise ValueError(f"optim.name={name!r} is unknown; use sgd, adam or adamw")
        warmup = int(cfg.get("warmup_steps", 0))
        decay = float(cfg.get("lr_decay_per_epoch", 1.0))
        schedulers = []
        if warmup > 0:
            ramp = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
            schedulers.append({"scheduler": ramp, "interval": "step"})
        if decay != 1.0 and cfg.get("lr_decay_interval", "epoch") == "step":
            # the same decay per epoch, spread evenly over its steps: x decay^(1 / steps per epoch) after each
            # step. steps_per_epoch is read at each step: it is set once the data is read, before the first.
            def smooth(step: int) -> float:
                if step and not self.steps_per_epoch:
                    raise RuntimeError("optim.lr_decay_interval=step needs the module's steps_per_epoch, set once "
                                       "the training data is read (asrbench.experiment.train does)")
                return decay ** (step / self.steps_per_epoch) if step else 1.0
            schedulers.append({"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, smooth), "interval": "step"})
        elif decay != 1.0:
            schedulers.append({"scheduler": torch.optim.lr_scheduler.ExponentialLR(opt, decay), "interval": "epoch"})
        return ([opt], schedulers) if schedulers else opt


def scaled_lr(lr: float, rule: str, world_size: int) -> float:
    """Learning rate for N workers: `none` keeps it, `linear` multiplies by N, `sqrt` by sqrt(N)."""
    if rule == "none":
        return lr
    if rule == "linear":
        return lr * world_size
    if rule == "sqrt":
        return lr * math.sqrt(world_size)
    raise ValueError(f"optim.lr_scaling={rule!r} is unknown; use none, linear or sqrt")
