"""Unidirectional multi-layer LSTM acoustic model over low-frame-rate stacked features.

The model of the paper's experiments is a plain stack of unidirectional LSTM layers
(optionally with a recurrent projection, LSTMP, Sak et al. 2014) and a linear output layer
over the output units (characters + blank for CTC; the same units for frame CE).
"""
from __future__ import annotations

import torch
from torch import nn


class LSTMAcousticModel(nn.Module):
    """LSTM(P) stack + linear output; returns per-frame logits (B, T, num_classes)."""

    def __init__(self, input_dim: int, num_classes: int, hidden_size: int = 320,
                 num_layers: int = 3, proj_size: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden_size < 1 or num_layers < 1:
            raise ValueError("Args `hidden_size` and `num_layers` must be positive values")
        if proj_size >= hidden_size:
            raise ValueError("Arg `proj_size` must be smaller than `hidden_size` (0 disables LSTMP)")
        self.lstm = nn.LSTM(input_dim, hidden_size, num_layers=num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0, proj_size=proj_size)
        self.output = nn.Linear(proj_size or hidden_size, num_classes)

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor | None = None) -> torch.Tensor:
        # Padding sits at the end of each sequence and the LSTM is unidirectional, so valid
        # frames never see padded ones: no packing needed (and cuDNN keeps its fast path).
        hidden, _ = self.lstm(feats)
        return self.output(hidden)
