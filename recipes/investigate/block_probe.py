"""`asrbench train ...` with a probe on every BMUF block end of the simulated cluster (docs/results.md,
"Why GTC-BMUF trails at 16 workers"): for each block t it appends to $BLOCK_PROBE (jsonl)

    step      optimizer step of the block end
    local     mean_i ||W_i(t) - S(t-1)||, the size of one BMUF worker's (group's) block displacement
    mean      ||W̄(t) - S(t-1)||, the block gradient G(t) the filter gets
    coherence ||G(t)||^2 / mean_i ||W_i - S||^2: 1/N for independent displacements, 1 for identical ones
    delta     ||Δ(t)||, the filtered update, and jump ||S(t) - S(t-1)||, the move of the block start
    residual  mean_i ||r_i|| of the GTC residuals at the block end (GTC-BMUF; absent without GTC)

With BLOCK_PROBE_RESET_RESIDUALS=1 every GTC residual is zeroed at each block end (the unsent
gradient of the block is dropped instead of carried into the next one).

    PYTHONPATH=. BLOCK_PROBE=out.jsonl python recipes/investigate/block_probe.py train <overrides>
"""
from __future__ import annotations

import json
import os
import sys

import torch

from asrbench import cli
from asrbench.strategies import bmuf, bmuf_averager, gtc

_pending: dict[str, float] = {}
_mean_over_workers = bmuf.SimulatedBMUFAverager._mean_over_workers
_update = bmuf_averager.BlockMomentumFilter.update
_exchange = gtc.GroupGTC.exchange
_exchanges: list[gtc.GroupGTC] = []


def _probed_exchange(self: gtc.GroupGTC, grads: torch.Tensor, step: int) -> None:
    if not _exchanges:
        _exchanges.append(self)
    _exchange(self, grads, step)


def _probed_mean(self: bmuf.SimulatedBMUFAverager, flat: torch.Tensor) -> torch.Tensor:
    if flat.numel() == self.stacked.shape[1]:
        shifts = self.stacked[::self.group_size] - self.filter.start
        local = shifts.norm(dim=1)
        mean = shifts.mean(0).norm()
        _pending.update(step=self.step, local=float(local.mean()), mean=float(mean),
                        coherence=float(mean ** 2 / (local ** 2).mean()))
        if _exchanges and _exchanges[0].residual is not None:
            residual = _exchanges[0].residual
            _pending["residual"] = float(residual.norm(dim=1).mean())
            if os.environ.get("BLOCK_PROBE_RESET_RESIDUALS") == "1":
                residual.zero_()
    return _mean_over_workers(self, flat)


def _probed_update(self: bmuf_averager.BlockMomentumFilter, mean: torch.Tensor) -> torch.Tensor:
    before = self.start.clone()
    out = _update(self, mean)
    _pending.update(delta=float(self.delta.norm()), jump=float((out - before).norm()))
    with open(os.environ["BLOCK_PROBE"], "a", encoding="utf-8") as f:
        f.write(json.dumps(_pending) + "\n")
    _pending.clear()
    return out


if __name__ == "__main__":
    bmuf.SimulatedBMUFAverager._mean_over_workers = _probed_mean
    bmuf_averager.BlockMomentumFilter.update = _probed_update
    gtc.GroupGTC.exchange = _probed_exchange
    cli.main([sys.argv[0], *sys.argv[1:]])
