"""Unidirectional multi-layer LSTM acoustic model over low-frame-rate stacked features.

The model of the paper's experiments is a plain stack of unidirectional LSTM layers
(optionally with a recurrent projection, LSTMP, Sak et al. 2014) and a linear output layer
over the output units (characters + blank for CTC; the same units for frame CE).

With ``num_phones`` > 0 it also has a phone probe: a linear classifier of phone labels on the top
layer's output, trained on a stopped gradient, so it learns to read the acoustic model without
changing it (asrbench.data.phones; the frame error rate of ``data.phone_labels``).
"""
from __future__ import annotations

import torch
from torch import nn


class LSTMAcousticModel(nn.Module):
    """LSTM(P) stack + linear output; returns per-frame logits (B, T, num_classes)."""

    def __init__(self, input_dim: int, num_classes: int, hidden_size: int = 320,
                 num_layers: int = 3, proj_size: int = 0, dropout: float = 0.0, num_phones: int = 0) -> None:
        super().__init__()
        if hidden_size < 1 or num_layers < 1:
            raise ValueError("Args `hidden_size` and `num_layers` must be positive values")
        if proj_size >= hidden_size:
            raise ValueError("Arg `proj_size` must be smaller than `hidden_size` (0 disables LSTMP)")
        self.lstm = nn.LSTM(input_dim, hidden_size, num_layers=num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0, proj_size=proj_size)
        self.output = nn.Linear(proj_size or hidden_size, num_classes)
        self.phone_probe = nn.Linear(proj_size or hidden_size, num_phones) if num_phones > 0 else None
        self.last_hidden: torch.Tensor | None = None  # the top layer of the last forward (probe only)

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor | None = None) -> torch.Tensor:
        # Padding sits at the end of each sequence and the LSTM is unidirectional, so valid
        # frames never see padded ones: no packing needed (and cuDNN keeps its fast path).
        hidden, _ = self.lstm(feats)
        if self.phone_probe is not None:
            self.last_hidden = hidden
        return self.output(hidden)

    def frame_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What frame labels are compared with: the probe's phone logits when the model has one, else
        the output units' `logits` (of the last forward)."""
        return self.phone_logits() if self.phone_probe is not None else logits

    def phone_logits(self) -> torch.Tensor:
        """The probe's phone logits (B, T, num_phones) for the last forward, on a stopped gradient."""
        if self.phone_probe is None or self.last_hidden is None:
            raise RuntimeError("phone_logits() needs a model with num_phones > 0, after a forward")
        return self.phone_probe(self.last_hidden.detach())
