"""Decode a split with a trained model in one process: WER, CER and, with frame labels, FER."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from asrbench import metrics
from asrbench.data.dataset import SpeechDataset, make_loader
from asrbench.model.decode import greedy_decode
from asrbench.model.module import criterion_loss, targets_to_text


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, split, frame_labels: Mapping[str, torch.Tensor] | None = None,
                   batch_size: int = 32, device: str | torch.device = "cpu", criterion: str = "ctc") -> dict:
    """Greedy-decode every utterance of `split`; returns metrics, the hypotheses by utterance and
    `scores`, the per-utterance error counts (asrbench.stats.Scores) behind WER (and its substitutions,
    deletions and insertions), SER, CER and FER.

    `loss` is the training criterion on the split (the mean over batches, weighted by their
    utterances); None for criterion=ce without frame labels."""
    model.eval()
    labels = {u: frame_labels[u] for u in split.utt_ids if frame_labels and u in frame_labels} or None
    loader = make_loader(SpeechDataset(split, labels), batch_size=batch_size, shuffle=False, seed=0)
    refs: list[str] = []
    hyps: list[str] = []
    ids: list[str] = []
    wrong = counted = 0
    frame_wrong: list[int] = []
    frame_counted: list[int] = []
    loss_sum, loss_utts = 0.0, 0
    for batch in loader:
        logits = model(batch["feats"].to(device), batch["feat_lens"].to(device))
        if criterion == "ctc" or "frame_labels" in batch:
            on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss_sum += float(criterion_loss(logits, on_device, criterion)) * len(batch["feat_lens"])
            loss_utts += len(batch["feat_lens"])
        hyps += greedy_decode(logits, batch["feat_lens"])
        refs += targets_to_text(batch["targets"], batch["target_lens"])
        ids += list(batch["utt_ids"])
        if "frame_labels" in batch:  # against the phone probe when the model has one (asrbench.data.phones)
            w, c = metrics.frame_errors_per_row(model.frame_logits(logits).cpu(), batch["frame_labels"])
            wrong, counted = wrong + sum(w), counted + sum(c)
            frame_wrong += w
            frame_counted += c
    return {
        "wer": metrics.wer(refs, hyps),
        "cer": metrics.cer(refs, hyps),
        "fer": wrong / counted if counted else None,
        "loss": loss_sum / loss_utts if loss_utts else None,
        "utterances": len(refs),
        "speakers": by_speaker(ids, refs, hyps),
        "hyps": dict(zip(ids, hyps)),
        "scores": {"ids": ids, **metrics.utterance_errors(refs, hyps),
                   **({"fer_errors": frame_wrong, "fer_counts": frame_counted} if frame_counted else {})},
    }


def by_speaker(ids: list[str], refs: list[str], hyps: list[str]) -> dict[str, dict]:
    """WER, CER and utterance count per speaker; the speaker is the utterance id's first field
    (LibriSpeech's `<speaker>-<chapter>-<n>`). One hard voice can dominate a split's WER."""
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for utt, ref, hyp in zip(ids, refs, hyps):
        speaker = utt.split("-", 1)[0]
        groups.setdefault(speaker, ([], []))
        groups[speaker][0].append(ref)
        groups[speaker][1].append(hyp)
    return {spk: {"wer": metrics.wer(r, h), "cer": metrics.cer(r, h), "utterances": len(r)}
            for spk, (r, h) in sorted(groups.items())}
