"""PowerSGD's memory in checkpoints: two gloo processes train with torch's hook under Lightning, one
run uninterrupted, one resumed from the checkpoint of its first epoch end; each rank's error memory,
Q memory, counter and random draws come back, and the resumed run ends on the uninterrupted run's
parameters (before, a resume restarted the warm-up and the memory: 0.143 apart)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning_harness import RankProbe, TinyLSTM, fit_two_ranks, load_rank

from asrbench.strategies.powersgd import CHECKPOINT_KEY, PowerSGDStrategy, powersgd_state_dict

STRATEGY_TIMEOUT_S = 30


class Probe(RankProbe):
    """Writes each rank's PowerSGD memory (at the start, at the saved epoch end) and final parameters."""

    def memory(self, trainer):
        return powersgd_state_dict(trainer.strategy.hook_state.powersgd)


def _fit(tmp_path: Path, tag: str, *, ckpt: Path | None = None, save_at_epoch: int | None = None) -> None:
    strategy = PowerSGDStrategy(rank=2, warmup_steps=2, start_method="forkserver", timeout=STRATEGY_TIMEOUT_S)
    fit_two_ranks(tmp_path, strategy, Probe(tmp_path, tag, save_at_epoch), TinyLSTM(log_comm=False), epochs=3,
                  ckpt=ckpt)


_load = load_rank


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
