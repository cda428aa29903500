"""Greedy decoding: argmax per frame, collapse repeats, drop blanks (CTC and frame-CE alike)."""
from __future__ import annotations

import torch

from asrbench.data import text


def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor, blank: int = 0) -> list[str]:
    """Best path per utterance: (B, T, C) logits and (B,) valid lengths -> transcripts."""
    best = logits.argmax(-1).cpu()
    keep = torch.ones_like(best, dtype=torch.bool)
    keep[:, 1:] = best[:, 1:] != best[:, :-1]
    keep &= best != blank
    keep &= torch.arange(best.shape[1])[None, :] < lengths.cpu()[:, None]
    out = []
    for row, k in zip(best, keep):
        out.append(" ".join(text.decode(row[k].tolist()).split()))
    return out
