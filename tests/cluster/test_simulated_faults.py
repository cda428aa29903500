"""Faults on the simulated cluster: an interrupted run resumed from its checkpoint reaches the
uninterrupted run's parameters bit for bit (every strategy, mid-epoch and mid-block), checkpoints
at epoch ends and every checkpoint_every_n_steps, a stop signal saves and exits 128 + its number,
and a diverged run stops in one line without results.json."""
from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from asrbench.cluster import simulated
from asrbench.cluster.simulated import (Diverged, FitOutcome, LoopConfig, SimulatedCluster, fit, load_resume_state,
                                        resume_state)
from asrbench.data.dataset import SpeechDataset
from asrbench.strategies import build_strategy, names

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "strategies"))  # equivalence
from equivalence import BATCH, CLIP, NODES, SEED, case, module, synthetic_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STEPS = 16  # 6 steps per epoch: crosses two epoch ends (steps 6 and 12)
CASES = {
    "sync": case({"name": "sync"}),
    "gtc": case({"name": "gtc", "tau": 0.05, "max_density": None}),
    "bmuf": case({"name": "bmuf", "block_size": 4}),
    "gtc_bmuf": case({"name": "gtc_bmuf", "group_size": 2, "block_size": 4, "tau": 0.05, "max_density": None}),
    # DiLoCo's outer Nesterov SGD as a torch optimizer (its momentum buffer is state), AdamW inside
    "diloco": case({"name": "diloco", "registry_name": "asrbench_bmuf", "block_size": 4, "outer_optimizer": "sgd",
                    "outer_optimizer_kwargs": {"lr": 0.7, "momentum": 0.9, "nesterov": True}}, name="adamw"),
    "powersgd": case({"name": "powersgd", "rank": 1, "warmup_steps": 2}),  # error feedback, warm start, its RNG
    "topk": case({"name": "topk", "density": 0.1}),
    "onebit": case({"name": "onebit"}),
}
# every other registered strategy that simulates (e.g. compressor hooks): its conf/strategy defaults
CASES |= {n: case({"name": n}) for n in names() if n not in CASES and n != "single"}
STOP_AT = 9  # epoch 1, batch 3 of 6; BMUF's third block, one step in


def _cluster(c: dict) -> SimulatedCluster:
    strategy = build_strategy(c["strategy"], nodes=NODES, timeout_s=30)
    return SimulatedCluster(module(c["optim"]), strategy, NODES, gradient_clip_val=CLIP)


def _data() -> SpeechDataset:
    return SpeechDataset(synthetic_split(NODES * BATCH * 6, 1))


def _loop(steps: int = STEPS) -> LoopConfig:
    return LoopConfig(max_steps=steps, enable_progress_bar=False, log_every_n_steps=1)


def _through_a_file(entry: dict) -> dict:
    """What a checkpoint file gives back: torch.save, then torch.load with weights_only=True."""
    buffer = io.BytesIO()
    torch.save(entry, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _continue(c: dict, entry: dict) -> tuple[SimulatedCluster, FitOutcome]:
    torch.manual_seed(12345)  # another process: its RNG is not the interrupted one's
    cluster = _cluster(c)
    start = load_resume_state(cluster, _through_a_file(entry))
    return cluster, fit(cluster, _data(), batch_size=BATCH, seed=SEED, loop=_loop(), start=start)


def _assert_same_run(resumed: SimulatedCluster, out: FitOutcome, ref: dict) -> None:
    assert torch.equal(resumed.P, ref["P"])  # bit for bit
    assert out.losses == ref["out"].losses and out.steps == ref["out"].steps == STEPS
    assert out.epochs == ref["out"].epochs
    assert resumed.comm_summary() == ref["comm"]  # worker 0's byte counts continue too
    assert resumed.timings.worker_steps == ref["worker_steps"]
    resumed.finalize()  # BMUF: the partial block closed, W_g
    assert torch.equal(resumed.P, ref["final"])


@pytest.fixture(scope="module")
def references() -> dict:
    """Each case's uninterrupted run: its parameters at the last step and after finalize, its counts."""
    refs = {}
    for name, c in CASES.items():
        cluster = _cluster(c)
        out = fit(cluster, _data(), batch_size=BATCH, seed=SEED, loop=_loop())
        refs[name] = {"P": cluster.P.clone(), "out": out, "comm": cluster.comm_summary(),
                      "worker_steps": cluster.timings.worker_steps}
        cluster.finalize()
        refs[name]["final"] = cluster.P.clone()
    return refs


@pytest.mark.parametrize("name", list(CASES))
def test_interrupted_and_resumed_equals_the_uninterrupted_run(references, name):
    c = CASES[name]
    cluster = _cluster(c)
    out = fit(cluster, _data(), batch_size=BATCH, seed=SEED, loop=_loop(), stop_requested=lambda: cluster.steps >= STOP_AT)
    assert out.stopped_by == "interrupted" and out.steps == STOP_AT and (out.epoch, out.batch_in_epoch) == (1, 3)
    entry = resume_state(cluster, out)
    if name in ("bmuf", "gtc_bmuf", "diloco"):
        assert entry["cluster"]["averager"]["step"] == STOP_AT  # one step into a block of K = 4
    if name in ("gtc", "gtc_bmuf", "topk", "powersgd", "onebit"):  # error memories travel: non-zero ones
        part = entry["cluster"]["exchange"]
        memory = part.get("residual", part.get("error"))
        assert memory.shape == (NODES, cluster.numel) and memory.abs().sum() > 0
    resumed, resumed_out = _continue(c, entry)
    _assert_same_run(resumed, resumed_out, references[name])


@pytest.mark.parametrize("name", ["bmuf", "gtc"])
def test_checkpoints_at_epoch_ends_and_every_n_steps_resume_exactly(references, name):
    c = CASES[name]
    cluster = _cluster(c)
    saved = {}
    fit(cluster, _data(), batch_size=BATCH, seed=SEED, loop=_loop(), every_n_steps=4,
        save=lambda out: saved.__setitem__(out.steps, _through_a_file(resume_state(cluster, out))))
    assert sorted(saved) == [4, 6, 8, 12]  # steps 4 and 8 mid-epoch, 6 and 12 epoch ends; none at the last step
    assert saved[6]["fit"]["epoch"] == 1 and saved[6]["fit"]["batch_in_epoch"] == 0
    for step in (6, 8):
        resumed, out = _continue(c, saved[step])
        _assert_same_run(resumed, out, references[name])


def test_a_stop_on_an_epochs_last_step_resumes_at_the_next_epoch(references):
    c = CASES["bmuf"]
    cluster = _cluster(c)
    out = fit(cluster, _data(), batch_size=BATCH, seed=SEED, loop=_loop(), stop_requested=lambda: cluster.steps >= 6)
    assert (out.epoch, out.batch_in_epoch, out.steps) == (1, 0, 6)  # epoch 0 closed: its lr decay stepped
    resumed, resumed_out = _continue(c, resume_state(cluster, out))
    _assert_same_run(resumed, resumed_out, references["bmuf"])


def test_dropout_streams_of_every_worker_resume_exactly():
    from equivalence import DIM, OPTIM
    from asrbench.model.module import AcousticModule

    def build() -> SimulatedCluster:
        torch.manual_seed(SEED)
        m = AcousticModule(DIM, {"hidden_size": 16, "num_layers": 2, "dropout": 0.3}, OPTIM, "ctc", world_size=NODES)
        m.steps_per_epoch = 6
        return SimulatedCluster(m, build_strategy({"name": "bmuf", "block_size": 4}, nodes=NODES, timeout_s=30), NODES)

    ref = build()
    ref_out = fit(ref, _data(), batch_size=BATCH, seed=SEED, loop=_loop())
    cluster = build()
    out = fit(cluster, _data(), batch_size=BATCH, seed=SEED, loop=_loop(), stop_requested=lambda: cluster.steps >= 5)
    entry = _through_a_file(resume_state(cluster, out))
    torch.manual_seed(999)
    resumed = build()
    resumed_out = fit(resumed, _data(), batch_size=BATCH, seed=SEED, loop=_loop(), start=load_resume_state(resumed, entry))
    assert ref._rng is not None and torch.equal(resumed.P, ref.P) and resumed_out.losses == ref_out.losses


# ---------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------
# Adam at lr 1e6 makes NaNs within 60 steps here; top-k's sparse steps stay finite (a huge but finite model)
@pytest.mark.parametrize("name", ["sync", "gtc", "bmuf", "gtc_bmuf", "diloco", "powersgd", "onebit"])
def test_a_huge_learning_rate_stops_with_diverged(name):
    c = CASES[name]
    strategy = build_strategy(c["strategy"], nodes=NODES, timeout_s=30)
    cluster = SimulatedCluster(module(c["optim"] | {"lr": 1e6, "warmup_steps": 0}), strategy, NODES)
    with pytest.raises(Diverged) as err:
        fit(cluster, _data(), batch_size=BATCH, seed=SEED, loop=_loop(60))
    assert err.value.step >= 1 and str(err.value).startswith(f"step {err.value.step}: ")
    assert "worker" in str(err.value) and "\n" not in str(err.value)
