"""Batched sync on the simulated cluster: one forward and backward over every worker's batch, on the
mean of each worker's own loss, trains as the per-worker path does up to float summation order.

Tolerance (TOL): parameters and losses within 1e-5 of the per-worker path's, relative to the
largest |parameter| (the equivalence tolerance the cluster keeps against real gloo processes,
tests/strategies/equivalence.py). Measured here: 1.5e-8 (absolute) after 1 step, 2.5e-6 after 8.
Within the batched mode itself a resumed run continues bit for bit.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch

from asrbench.bench_inputs import strategy_config
from asrbench.cluster.simulated import (Diverged, LoopConfig, SimulatedCluster, _concatenated, fit,
                                        load_resume_state, resume_state)
from asrbench.data.dataset import IGNORE_INDEX, SpeechDataset, collate
from asrbench.errors import ConfigError
from asrbench.model.module import AcousticModule
from asrbench.strategies import build_strategy, names

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "strategies"))  # equivalence
from equivalence import BATCH, CLIP, DIM, MODEL, NODES, OPTIM, SEED, synthetic_split  # noqa: E402

TOL = 1e-5  # relative to the largest |parameter|
STEPS = 8
PHONES = 5


def _labels(split, unlabelled: int = 3) -> dict[str, torch.Tensor]:
    """Frame labels of every utterance but every `unlabelled`-th (those are all IGNORE_INDEX)."""
    gen = torch.Generator().manual_seed(5)
    return {u: torch.randint(0, PHONES, (int(n),), generator=gen)
            for i, (u, n) in enumerate(zip(split.utt_ids, split.lengths)) if i % unlabelled}


CASES = {  # name: (criterion, num_phones, frame labels, optimizer keys)
    "ctc_adam": ("ctc", 0, False, {}),
    "ctc_sgd": ("ctc", 0, False, {"name": "sgd", "momentum": 0.9, "weight_decay": 0.01}),
    "ctc_probe": ("ctc", PHONES, True, {}),
    "ce": ("ce", 0, True, {}),
}


def _module(criterion: str = "ctc", num_phones: int = 0, optim: dict | None = None, **model) -> AcousticModule:
    torch.manual_seed(SEED)
    m = AcousticModule(DIM, MODEL | model, OPTIM | (optim or {}), criterion, world_size=NODES, num_phones=num_phones)
    m.steps_per_epoch = 6
    return m


def _data(labelled: bool) -> SpeechDataset:
    split = synthetic_split(NODES * BATCH * 6, 1)
    return SpeechDataset(split, _labels(split) if labelled else None)


def _cluster(name: str, batched: bool, **kw) -> SimulatedCluster:
    criterion, phones, _, optim = CASES[name]
    return SimulatedCluster(_module(criterion, phones, optim), build_strategy({"name": "sync"}, nodes=NODES,
                                                                             timeout_s=30),
                            NODES, gradient_clip_val=CLIP, batched_sync=batched, **kw)


def _loop(steps: int = STEPS) -> LoopConfig:
    return LoopConfig(max_steps=steps, enable_progress_bar=False)


def test_worker_losses_and_their_gradient_equal_each_workers_alone():
    """Each worker's loss reduced as alone (CTC over target lengths and the worker's batch, the probe's
    and CE's frames over the worker's labelled frames, 0 for a worker with none), and the gradient of
    their mean equal to the mean of the workers' gradients."""
    split = synthetic_split(6, 1)
    labels = _labels(split, unlabelled=2)  # items 0, 2, 4 unlabelled: worker 0 (items 0, 1) half, worker 2 none
    labels.pop(split.utt_ids[5])
    data = SpeechDataset(split, labels)
    workers = [collate([data[2 * w], data[2 * w + 1]]) for w in range(3)]
    assert bool((workers[2]["frame_labels"] == IGNORE_INDEX).all())
    joined = _concatenated(workers, torch.device("cpu"))
    for criterion, phones in (("ctc", 0), ("ctc", PHONES), ("ce", 0)):
        module = _module(criterion, phones)
        alone, grads = [], []
        for b in workers:
            module.zero_grad()
            loss = module.loss(module(b["feats"], b["feat_lens"]), b)
            loss.backward()
            alone.append(loss.detach())
            grads.append(torch.cat([p.grad.reshape(-1) for p in module.parameters()]))
        module.zero_grad()
        losses = module.worker_losses(module(joined["feats"], joined["feat_lens"]), joined, [2, 2, 2])
        losses.mean().backward()
        mean_grad = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
        alone, losses = torch.stack(alone), losses.detach()
        if criterion == "ce":  # worker 2 has no labelled frame: NaN alone and batched, as torch's mean gives
            assert torch.isnan(alone[2]) and torch.isnan(losses[2])
            assert torch.allclose(losses[:2], alone[:2], rtol=1e-6, atol=0)
            continue
        assert torch.allclose(losses, alone, rtol=1e-6, atol=0)
        assert torch.allclose(mean_grad, torch.stack(grads).mean(0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_batched_sync_trains_as_the_per_worker_path_within_tolerance(name):
    data = _data(CASES[name][2])
    if name == "ce":  # frame CE of a worker without labelled frames is NaN: one utterance unlabelled here
        split = synthetic_split(NODES * BATCH * 6, 1)
        data = SpeechDataset(split, _labels(split, unlabelled=10 ** 6))
    per_worker, batched = _cluster(name, False), _cluster(name, True)
    a = fit(per_worker, data, batch_size=BATCH, seed=SEED, loop=_loop())
    b = fit(batched, data, batch_size=BATCH, seed=SEED, loop=_loop())
    scale = per_worker.P.abs().max()
    assert (per_worker.P - batched.P).abs().max() <= TOL * scale
    assert not torch.equal(per_worker.P, batched.P)  # the batched path did run
    assert torch.allclose(torch.tensor(b.losses), torch.tensor(a.losses), rtol=TOL, atol=0)
    assert torch.equal(batched.P, batched.P[:1].expand_as(batched.P))  # every worker holds one model
    assert batched.comm_summary() == per_worker.comm_summary()
    ta, tb = per_worker.timings, batched.timings
    assert (tb.worker_frames, tb.frames, tb.worker_steps) == (ta.worker_frames, ta.frames, ta.worker_steps)
    assert batched.straggler_factor() == per_worker.straggler_factor()


def test_the_cost_models_compute_comes_from_sampled_unbatched_steps():
    cluster = _cluster("ctc_adam", True, timing_sample_every=3)
    fit(cluster, _data(False), batch_size=BATCH, seed=SEED, loop=_loop())
    t = cluster.timings
    assert t.sampled_steps == 3  # steps 1, 4, 7 of 8
    assert cluster.compute_s_per_worker_step() == pytest.approx(
        t.sampled_compute_s / t.sampled_steps + t.optimizer_s / t.worker_steps)


def test_a_resumed_batched_run_continues_bit_for_bit():
    ref = _cluster("ctc_probe", True, timing_sample_every=4)
    ref_out = fit(ref, _data(True), batch_size=BATCH, seed=SEED, loop=_loop(16))
    first = _cluster("ctc_probe", True, timing_sample_every=4)
    out = fit(first, _data(True), batch_size=BATCH, seed=SEED, loop=_loop(9))
    buffer = io.BytesIO()
    torch.save(resume_state(first, out), buffer)
    buffer.seek(0)
    torch.manual_seed(12345)  # another process
    resumed = _cluster("ctc_probe", True, timing_sample_every=4)
    start = load_resume_state(resumed, torch.load(buffer, weights_only=True))
    end = fit(resumed, _data(True), batch_size=BATCH, seed=SEED, loop=_loop(16), start=start)
    assert torch.equal(resumed.P, ref.P)
    assert end.losses == ref_out.losses and end.steps == 16
    assert resumed.comm_summary() == ref.comm_summary()
    assert resumed.timings.sampled_steps == ref.timings.sampled_steps == 4


@pytest.mark.parametrize("name", [n for n in names() if n not in ("sync", "single")])
def test_batched_sync_is_refused_for_every_other_strategy(name):
    strategy = build_strategy(strategy_config(name, BATCH), nodes=NODES, timeout_s=30)  # its conf/strategy/ defaults
    with pytest.raises(ConfigError, match="only for strategy=sync") as err:
        SimulatedCluster(_module(), strategy, NODES, batched_sync=True)
    assert "\n" not in str(err.value) and "batched_sync" in str(err.value)


def test_batched_sync_is_refused_with_dropout():
    module = _module(num_layers=2, dropout=0.2)
    with pytest.raises(ConfigError, match="dropout"):
        SimulatedCluster(module, build_strategy({"name": "sync"}, nodes=NODES, timeout_s=30), NODES,
                         batched_sync=True)


def test_a_huge_learning_rate_stops_with_diverged_naming_the_step():
    module = _module(optim={"lr": 1e6, "warmup_steps": 0})
    cluster = SimulatedCluster(module, build_strategy({"name": "sync"}, nodes=NODES, timeout_s=30), NODES,
                               batched_sync=True)
    with pytest.raises(Diverged) as err:
        fit(cluster, _data(False), batch_size=BATCH, seed=SEED, loop=_loop(60))
    assert err.value.step >= 1 and str(err.value).startswith(f"step {err.value.step}: ")
    assert "\n" not in str(err.value)
