"""The simulated cluster against real gloo processes, for any registered strategy.

A case is a strategy config (conf/strategy keys) plus optimizer keys added to OPTIM. `real_runs`
trains every case through the full Lightning path of `asrbench train` (SpeechDataModule, the
registered strategy, gradient clipping, the lr schedulers) on NODES gloo ranks and records each
rank's parameters after every step; `simulated` trains the same case on the simulated cluster;
`check_equal` holds them to the strategy's ``equivalence_tolerance`` (relative error per step and
per rank; 1e-5 unless the strategy's spec says otherwise), with rank 0's byte accounting equal. Used by tests/cluster/test_simulated.py and each strategy's own tests.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch

from asrbench.cluster.simulated import LoopConfig, SimulatedCluster, fit
from asrbench.data.dataset import SpeechDataset
from asrbench.data.features import SplitFeatures
from asrbench.model.module import AcousticModule
from asrbench.strategies import build_strategy

DIM = 8  # feature width of the synthetic corpus
MODEL = {"hidden_size": 16, "num_layers": 1}  # 2157 parameters
OPTIM = {"name": "adam", "lr": 0.01, "warmup_steps": 4, "lr_scaling": "sqrt", "lr_decay_per_epoch": 0.8}
NODES, BATCH, STEPS, SEED = 4, 2, 26, 3  # 48 utterances: 6 steps per epoch, so 26 steps cross 4 epochs
CLIP = 5.0  # clips some steps' gradients (norms seen: 0.5-26), not others
COMM_KEYS = ("bytes_sent_per_worker_per_step", "bytes_received_per_worker_per_step", "dense_bytes_per_worker_per_step",
             "compression_ratio", "density", "all_gather_bytes_sent_per_worker_per_step",
             "all_reduce_bytes_sent_per_worker_per_step", "broadcast_bytes_sent_per_worker_per_step")


def case(strategy: Mapping[str, Any], **optim: Any) -> dict[str, Any]:
    return {"strategy": dict(strategy), "optim": dict(optim)}


def synthetic_split(utterances: int, seed: int) -> SplitFeatures:
    """Random features with short transcripts (CTC-feasible), held in memory like a loaded cache."""
    gen = torch.Generator().manual_seed(seed)
    words = ("THE", "CAT", "SAT", "ON", "A", "MAT", "DOG")
    lengths = torch.randint(20, 40, (utterances,), generator=gen)
    counts = torch.randint(1, 4, (utterances,), generator=gen).tolist()
    texts = [" ".join(words[i] for i in torch.randint(0, len(words), (k,), generator=gen).tolist()) for k in counts]
    feats = torch.randn(int(lengths.sum()), DIM, generator=gen)
    return SplitFeatures([], [f"utt{i:03d}" for i in range(utterances)], texts, lengths,
                         torch.zeros(utterances, dtype=torch.long), torch.cumsum(lengths, 0) - lengths,
                         {"mean": torch.zeros(DIM), "std": torch.ones(DIM)}, shards=[feats])


def module(optim: Mapping[str, Any] | None = None) -> AcousticModule:
    torch.manual_seed(SEED)
    m = AcousticModule(DIM, MODEL, OPTIM | dict(optim or {}), "ctc", world_size=NODES)
    m.steps_per_epoch = 6  # as asrbench.experiment.train sets it: 6 steps per epoch on this data
    return m


def flat(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in m.parameters()])


def _real(rank: int, world: int, cases: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Every case through Lightning on this rank: its parameters after each step, final, comm summary."""
    import lightning.pytorch as pl

    from asrbench.experiment import SpeechDataModule

    class Record(pl.Callback):
        def __init__(self):
            self.flats = []

        def on_train_batch_end(self, trainer, m, *args):
            self.flats.append(flat(m.model))

    feats = {"train": synthetic_split(NODES * BATCH * 6, 1), "dev": synthetic_split(4, 2)}
    out = {}
    for name, c in cases.items():
        record = Record()
        strategy = build_strategy(c["strategy"], nodes=world, timeout_s=30)
        trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=STEPS, logger=False,
                             callbacks=[record], gradient_clip_val=CLIP, limit_val_batches=0, num_sanity_val_steps=0,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             use_distributed_sampler=False)
        m = module(c["optim"])
        trainer.fit(m, datamodule=SpeechDataModule(feats, None, BATCH, 4, SEED))
        out[name] = {"per_step": torch.stack(record.flats), "final": flat(m.model), "summary": strategy.comm_summary()}
    return out


def real_runs(cases: Mapping[str, Mapping[str, Any]], timeout: float = 240) -> list[dict[str, Any]]:
    """Every rank's record of every case (one set of NODES gloo processes for all of them)."""
    from dist_utils import run_workers

    return run_workers(_real, NODES, dict(cases), timeout=timeout, collective_timeout_s=60)


def simulated(c: Mapping[str, Any]) -> dict[str, Any]:
    """The case on the simulated cluster, with one torch thread as each gloo worker runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = module(c["optim"])
        cluster = SimulatedCluster(m, build_strategy(c["strategy"], nodes=NODES, timeout_s=30), NODES,
                                   gradient_clip_val=CLIP)
        per_step = []
        fit(cluster, SpeechDataset(synthetic_split(NODES * BATCH * 6, 1)), batch_size=BATCH, seed=SEED,
            loop=LoopConfig(max_steps=STEPS, enable_progress_bar=False),
            on_step=lambda cl, losses, step, epoch: per_step.append(cl.P.clone()))
        cluster.finalize()
    finally:
        torch.set_num_threads(threads)
    return {"per_step": torch.stack(per_step), "final": flat(m.model), "summary": cluster.comm_summary(),
            "cluster": cluster}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def check_equal(sim: Mapping[str, Any], real: list[Mapping[str, Any]], name: str,
                tolerance: float | None = None) -> None:
    """Every rank's parameters after every step and at the end within `tolerance` (relative; the
    strategy's ``equivalence_tolerance`` unless given), the model trained, and rank 0's accounting
    equal to worker 0's."""
    if tolerance is None:
        tolerance = sim["cluster"].spec.equivalence_tolerance
    assert sim["per_step"].shape[0] == STEPS
    worst = max(rel(sim["per_step"][s, rank], real[rank]["per_step"][s]) for s in range(STEPS) for rank in range(NODES))
    assert worst <= tolerance, f"{name}: parameters differ from the real workers' by {worst:.2e} (relative)"
    for rank in range(NODES):
        assert rel(sim["final"], real[rank]["final"]) <= tolerance
    assert rel(sim["final"], sim["per_step"][0, 0]) > 1e-2  # the model trained: equality is not of two idle models
    s, r = sim["summary"], real[0]["summary"]
    assert s["steps"] == r["steps"] == STEPS
    for key in COMM_KEYS:  # worker 0's accounting is the real rank 0's (this model fits one DDP bucket)
        assert s[key] == pytest.approx(r[key], rel=1e-12), key
