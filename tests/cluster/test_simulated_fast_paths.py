"""The simulated cluster's fast paths leave training bit for bit as it was: each worker row's
parameter views cut once (not per step), the clipping norms of every row taken at once, and
(sync, gtc: rows of a group equal after the exchange) the optimizer stepping each group's first
row and the others copying it. Each run is compared with the same run on the per-step paths."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from asrbench.cluster import simulated
from asrbench.cluster.simulated import LoopConfig, RowBinding, SimulatedCluster, clip_rows, fit
from asrbench.data.dataset import SpeechDataset
from asrbench.strategies import build_strategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "strategies"))  # equivalence
from equivalence import BATCH, NODES, SEED, case, module, synthetic_split  # noqa: E402

CLIP = 1.0  # clips most steps (norms seen: 0.5-26)
STEPS = 8
CASES = {
    "sync": case({"name": "sync"}),
    "sync_sgd": case({"name": "sync"}, name="sgd", momentum=0.9, weight_decay=0.01),
    "gtc": case({"name": "gtc", "tau": 0.05, "max_density": None}),
    "bmuf": case({"name": "bmuf", "block_size": 3}),
    "gtc_bmuf": case({"name": "gtc_bmuf", "group_size": 2, "block_size": 3, "tau": 0.05, "max_density": None}),
}


def _clip_rows_per_worker(grads, binding, max_norm, group_size=1, algorithm="norm", split=None) -> None:
    """The clipping before the fast path: torch.nn.utils.get_total_norm of each group's first row."""
    assert algorithm == "norm"
    offsets = [0]
    for size in binding.sizes:
        offsets.append(offsets[-1] + size)
    parts = [(0, len(binding.sizes))] if split is None else [(0, split), (split, len(binding.sizes))]
    for a, b in parts:
        lo, hi = offsets[a], offsets[b]
        if hi == lo:
            continue
        block = grads[:, lo:hi]
        norms = torch.stack([torch.nn.utils.get_total_norm(
            [v.view(sh) for v, sh in zip(block[i].split(binding.sizes[a:b]), binding.shapes[a:b])])
            for i in range(0, grads.shape[0], group_size)])
        coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
        block.view(-1, group_size, hi - lo).mul_(coef.view(-1, 1, 1))


class _CutPerStep:
    """Worker i's views cut from the row at every access, as the binding did before the cache."""

    def __init__(self, binding: RowBinding, stacked: torch.Tensor) -> None:
        self.binding, self.stacked = binding, stacked

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return self.binding.views(self.stacked[i])


def _run(c: dict, fast: bool) -> SimulatedCluster:
    strategy = build_strategy(c["strategy"], nodes=NODES, timeout_s=30)
    cluster = SimulatedCluster(module(c["optim"]), strategy, NODES, gradient_clip_val=CLIP)
    if not fast:
        cluster.step_representatives = False
        cluster._P_views = _CutPerStep(cluster.binding, cluster.P)
        cluster._G_views = _CutPerStep(cluster.binding, cluster.G)
    fit(cluster, SpeechDataset(synthetic_split(NODES * BATCH * 6, 1)), batch_size=BATCH, seed=SEED,
        loop=LoopConfig(max_steps=STEPS, enable_progress_bar=False))
    return cluster


@pytest.mark.parametrize("name", list(CASES))
def test_fast_paths_train_bit_for_bit_as_the_per_step_paths(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = _run(CASES[name], fast=True)
    with monkeypatch.context() as m:
        m.setattr(simulated, "clip_rows", _clip_rows_per_worker)
        slow = _run(CASES[name], fast=False)
    assert fast.step_representatives == (name in ("sync", "sync_sgd", "gtc"))
    assert torch.equal(fast.P, slow.P)
    fast_state, slow_state = fast.optimizer.state_dict()["state"], slow.optimizer.state_dict()["state"]
    assert sorted(fast_state) == sorted(slow_state) == list(range(NODES))
    for i in range(NODES):
        for key, value in slow_state[i].items():
            assert torch.equal(torch.as_tensor(fast_state[i][key]), torch.as_tensor(value)), (i, key)


@pytest.mark.parametrize("group_size,split", [(1, None), (2, None), (4, 3), (1, 0)])
def test_clip_rows_equals_get_total_norm_per_worker(group_size: int, split: int | None) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LSTM(5, 7, num_layers=2), torch.nn.Linear(7, 3))
    binding = RowBinding(model)
    grads = (torch.randn(4, binding.numel) * torch.rand(4, 1) * 4)
    grads = grads.view(-1, 1, binding.numel)[::group_size].expand(-1, group_size, -1).reshape(4, -1).clone()
    expected = grads.clone()
    _clip_rows_per_worker(expected, binding, 1.0, group_size, split=split)
    clip_rows(grads, binding, 1.0, group_size, split=split)
    assert torch.equal(grads, expected)
