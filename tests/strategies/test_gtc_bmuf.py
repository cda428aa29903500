"""GTC-BMUF: config errors, the limits g = N (GTC) and g = 1 (BMUF), groups in 4 gloo processes, resume."""
from __future__ import annotations

import pytest
import torch

from asrbench.errors import ConfigError
from asrbench.strategies.accounting import CommStats
from asrbench.strategies.gtc_bmuf import GTCBMUFStrategy, merge_comm_stats, number_of_groups
from test_bmuf import _flat, _Regression

TAU = 0.02  # sends part of this model's gradient each step (checked below: density < 1)


def test_group_size_errors():
    assert number_of_groups(8, 2) == 4 and number_of_groups(4, 4) == 1
    with pytest.raises(ConfigError, match=r"nodes=6 is not a multiple of strategy.group_size=4"):
        number_of_groups(6, 4)
    with pytest.raises(ValueError, match=r"Arg `group_size` must be a positive value"):
        GTCBMUFStrategy(group_size=0, block_size=4)
    with pytest.raises(ValueError, match=r"Arg `block_size` must be a positive value"):
        GTCBMUFStrategy(group_size=2, block_size=0)
    with pytest.raises(ValueError, match=r"both set"):
        GTCBMUFStrategy(group_size=2, block_size=4, batch_size=8, block_momentum=0.5,
                        block_momentum_time_constant=100.0)


def test_merged_comm_stats_take_dense_from_bmuf():
    gtc, bmuf = CommStats(2), CommStats(4)
    gtc.record_all_gather(100, 2)
    gtc.record_dense(400, 2)  # over the group: dropped
    gtc.record_elements(25, 100)
    gtc.step()
    bmuf.record_all_reduce(400, 2)
    bmuf.record_dense(400)  # over all 4 workers
    bmuf.step()
    merged = merge_comm_stats(gtc, bmuf).per_step()
    assert merged["bytes_sent_per_worker_per_step"] == 100 + 400
    assert merged["dense_bytes_per_worker_per_step"] == 2 * 3 / 4 * 400
    assert merged["density"] == 0.25 and merged["steps"] == 1


def _fit(world, strategy, root, epochs=2, ckpt_path=None):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    flats = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, module, *args):
            flats.append(_flat(module))

    callbacks = [Record()] + ([ModelCheckpoint(dirpath=root, save_top_k=-1)] if root else [])
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_epochs=epochs, logger=False,
                         callbacks=callbacks, enable_checkpointing=bool(root), enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, default_root_dir=root or None)
    module = _Regression.module()
    trainer.fit(module, ckpt_path=ckpt_path)
    return torch.stack(flats), module


def _limits(rank, world):
    """g = N against GTCStrategy, g = 1 against BMUFStrategy, and g not dividing N."""
    from asrbench.strategies.bmuf import BMUFStrategy
    from asrbench.strategies.gtc import GTCStrategy

    out = {}
    out["gtc"], _ = _fit(world, GTCStrategy(tau=TAU, timeout=30), None, epochs=1)
    out["one_group"], _ = _fit(world, GTCBMUFStrategy(group_size=world, block_size=2, tau=TAU, timeout=30),
                               None, epochs=1)
    out["bmuf"], _ = _fit(world, BMUFStrategy(block_size=2, timeout=30), None, epochs=1)
    out["groups_of_one"], _ = _fit(world, GTCBMUFStrategy(group_size=1, block_size=2, tau=TAU, timeout=30),
                                   None, epochs=1)
    try:
        _fit(world, GTCBMUFStrategy(group_size=3, block_size=2, timeout=30), None, epochs=1)
    except ConfigError as err:
        out["error"] = str(err)
    return out


@pytest.mark.slow
def test_one_group_is_gtc_and_groups_of_one_are_bmuf():
    from dist_utils import run_workers

    for out in run_workers(_limits, 2, timeout=90):
        # η = 1 - 1/G = 0 and ζ = 1 write back S + (W - S): W up to one rounding.
        torch.testing.assert_close(out["one_group"], out["gtc"], rtol=0, atol=1e-6)
        assert torch.equal(out["groups_of_one"], out["bmuf"])
        assert out["error"] == "nodes=2 is not a multiple of strategy.group_size=3; pick a group_size that divides nodes"


def _groups(rank, world, root):
    """4 workers in 2 GTC groups, K = 3, two epochs of 5 steps; again from the epoch-1 checkpoint."""
    strategy = GTCBMUFStrategy(group_size=2, block_size=3, tau=TAU, max_density=None, timeout=30)
    flats, module = _fit(world, strategy, root)
    summary = strategy.comm_summary()
    resumed = GTCBMUFStrategy(group_size=2, block_size=3, tau=TAU, max_density=None, timeout=30)
    _, module_b = _fit(world, resumed, root, ckpt_path=f"{root}/epoch=0-step=5.ckpt")
    return {"flats": flats, "final": _flat(module), "resumed": _flat(module_b), "summary": summary,
            "eta": strategy.averager.block_momentum, "numel": strategy.averager.numel}


@pytest.mark.slow
def test_groups_gtc_inside_bmuf_across_and_exact_resume(tmp_path):
    from dist_utils import run_workers

    outs = run_workers(_groups, 4, str(tmp_path), timeout=120)
    for step in range(10):
        same = [[torch.equal(outs[i]["flats"][step], outs[j]["flats"][step]) for j in range(4)] for i in range(4)]
        assert same[0][1] and same[2][3]  # GTC keeps each group's replicas identical every step
        assert same[0][2] == (step % 3 == 2)  # the groups meet only at the end of a block
    for out in outs:
        assert out["eta"] == 0.5  # 1 - 1/G with G = 2 groups
        assert torch.equal(out["final"], outs[0]["final"])
        assert torch.equal(out["resumed"], out["final"])  # residuals + BMUF state: exact resume mid-block
        s = out["summary"]
        assert s["steps"] == 10 and s["bmuf_blocks"] == 4
        assert 0 < s["density"] < 1  # GTC compressed: fewer elements sent than there are
        b = out["numel"] * 4
        assert s["dense_bytes_per_worker_per_step"] == pytest.approx(2 * 3 / 4 * b)
        assert s["all_reduce_bytes_sent_per_worker_per_step"] == pytest.approx(
            (3 * b if out is outs[0] or out is outs[2] else 0.0) / 10)  # representatives: ring of 2, 3 blocks
        assert s["broadcast_bytes_sent_per_worker_per_step"] == pytest.approx(
            (3 * b if out is outs[0] or out is outs[2] else 0.0) / 10)  # representative to its one member
        assert s["all_gather_bytes_sent_per_worker_per_step"] > 0  # GTC's exchange inside the group
        assert s["bytes_sent_per_worker_per_step"] == pytest.approx(
            sum(s[f"{k}_bytes_sent_per_worker_per_step"] for k in ("all_reduce", "all_gather", "broadcast")))
