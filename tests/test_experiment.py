"""A run that would train nothing stops before training, with one line: no full batch per worker,
no step under the trainer's limits, or fewer steps than one BMUF block; on both clusters."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asrbench.data.dataset import SpeechDataset, make_loader, train_batches_per_epoch
from asrbench.data.features import SplitFeatures
from asrbench.errors import ConfigError
from asrbench.experiment import check_steps, planned_steps
from asrbench.strategies import build_strategy

ROOT = Path(__file__).resolve().parents[1]
# 12 training utterances (2 speakers x 2 chapters x 3), 2 dev, 2 test.
SUBSETS = {"train-clean-100": (2, 2, 3), "dev-clean": (1, 1, 2), "test-clean": (1, 1, 2)}
ZERO_STEPS = ("each worker's shard of the 12 training utterances (nodes=4) holds 3, fewer than batch_size=4: the run "
              "would train 0 steps (a worker steps on full batches only); set batch_size<=3 or nodes<=3 or add "
              "training utterances")
NO_BLOCK = ("strategy=bmuf averages the models once every K = 8 steps (strategy.block_size) but this run trains 3 "
            "steps (3 per epoch, trainer.max_epochs=1): no block would complete; set trainer.max_epochs>=3 or "
            "strategy.block_size<=3")


@pytest.fixture
def corpus(tmp_path, make_librispeech_tree) -> Path:
    return make_librispeech_tree(tmp_path / "corpus", SUBSETS, nested=False)


def overrides(corpus: Path, *more: str) -> list[str]:
    return ["data=librispeech", f"data.root={corpus}", "data.train_subsets=[train-clean-100]",
            "data.dev_subsets=[dev-clean]", "data.test_subsets=[test-clean]", "model=lstm_tiny", "logger=none",
            "trainer.enable_progress_bar=false", *more]


def train(run: Path, args: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    from asrbench import experiment

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", args)
    experiment.train(cfg, run)


@pytest.mark.parametrize("cluster", ["processes", "simulated"])
def test_a_run_without_a_full_batch_per_worker_stops_before_training(corpus, tmp_path, cluster):
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        train(run, overrides(corpus, f"cluster={cluster}", "strategy=sync", "nodes=4", "batch_size=4",
                             "trainer.max_epochs=1"))
    assert str(err.value) == ZERO_STEPS
    assert not (run / "results.json").exists() and not (run / "checkpoints").exists()


@pytest.mark.parametrize("cluster", ["processes", "simulated"])
def test_a_run_shorter_than_one_bmuf_block_stops_before_training(corpus, tmp_path, cluster):
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        train(run, overrides(corpus, f"cluster={cluster}", "strategy=bmuf", "nodes=2", "batch_size=2",
                             "trainer.max_epochs=1"))
    assert str(err.value) == NO_BLOCK
    assert not (run / "results.json").exists()


@pytest.mark.slow
def test_the_zero_step_refusal_is_one_line_on_the_command_line(corpus, tmp_path):
    env = os.environ | {"WANDB_MODE": "offline"}
    env.pop("ASRBENCH_COMMAND", None)
    proc = subprocess.run([sys.executable, "-m", "asrbench.cli", "train", "strategy=sync", "nodes=4", "batch_size=4",
                           "trainer.max_epochs=1", *overrides(corpus), f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"error: {ZERO_STEPS}"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_steps_per_epoch_are_what_the_training_loader_yields():
    # by hand: floor(utterances / N) per rank in full batches; 23 over 4 is 5 each (not 6, padded), one batch of 3
    for utterances, batch_size, world_size, steps in [(24, 2, 4, 3), (25, 3, 4, 2), (7, 2, 3, 1), (16, 16, 1, 1),
                                                      (23, 3, 4, 1)]:
        dataset = SpeechDataset(_split(utterances))
        loader = make_loader(dataset, batch_size=batch_size, shuffle=True, seed=0, rank=world_size - 1,
                             world_size=world_size, drop_last=True)
        assert train_batches_per_epoch(utterances, batch_size=batch_size, world_size=world_size) == steps
        assert len(loader) == len(list(loader)) == steps


def test_planned_steps_follow_lightnings_limits():
    assert planned_steps(3, {"max_epochs": 2, "max_steps": -1}) == (6, "trainer.max_epochs=2")
    assert planned_steps(3, {"max_epochs": 2, "max_steps": 4}) == (4, "trainer.max_steps=4")
    assert planned_steps(3, {"max_epochs": None, "max_steps": 40}) == (40, "trainer.max_steps=40")
    assert planned_steps(3, {"max_epochs": None, "max_steps": -1}) == (3000, "trainer.max_epochs=1000")
    assert planned_steps(3, {"max_epochs": -1, "max_steps": -1}) == (None, "trainer.max_epochs=-1")


def _cfg(**values):
    from omegaconf import OmegaConf

    return OmegaConf.create({"nodes": 4, "batch_size": 2, "strategy": {"name": "gtc_bmuf"},
                             "trainer": {"max_epochs": 10, "max_steps": -1}} | values)


def test_block_checks_count_steps_against_k_for_each_strategy():
    gtc_bmuf = build_strategy({"name": "gtc_bmuf", "group_size": 2, "block_size": 8}, nodes=4, timeout_s=30)
    check_steps(_cfg(trainer={"max_epochs": None, "max_steps": 8}), gtc_bmuf, 80)  # max_steps = K: one block
    with pytest.raises(ConfigError, match=r"^strategy=gtc_bmuf averages the models once every K = 8 steps "
                                          r"\(strategy.block_size\) but this run trains 7 steps \(10 per epoch, "
                                          r"trainer.max_steps=7\): no block would complete; set trainer.max_steps>=8 "
                                          r"or strategy.block_size<=7$"):
        check_steps(_cfg(trainer={"max_epochs": 1, "max_steps": 7}), gtc_bmuf, 80)
    # K from samples: 64 samples over batch_size 2 x N = 2 groups is 16 steps.
    samples = build_strategy({"name": "gtc_bmuf", "group_size": 2, "block_size": None, "block_size_samples": 64,
                              "batch_size": 2}, nodes=4, timeout_s=30)
    with pytest.raises(ConfigError, match=r"K = 16 steps \(strategy.block_size_samples=64 over batch_size x N\) but "
                                          r"this run trains 10 steps .* set trainer.max_epochs>=2 or "
                                          r"strategy.block_size_samples<=40$"):
        check_steps(_cfg(trainer={"max_epochs": 1, "max_steps": -1}), samples, 80)
    sync = build_strategy({"name": "sync"}, nodes=4, timeout_s=30)
    check_steps(_cfg(strategy={"name": "sync"}, trainer={"max_epochs": 1, "max_steps": -1}), sync, 8)  # no block
    with pytest.raises(ConfigError, match=r"^trainer.max_steps=0 trains 0 steps; raise it$"):
        check_steps(_cfg(strategy={"name": "sync"}, trainer={"max_epochs": 1, "max_steps": 0}), sync, 80)


def _split(n: int) -> SplitFeatures:
    """`n` two-frame utterances, held in memory like a loaded feature cache."""
    lengths = torch.full((n,), 2, dtype=torch.long)
    return SplitFeatures([], [f"utt{i:03d}" for i in range(n)], ["A"] * n, lengths, torch.zeros(n, dtype=torch.long),
                         torch.cumsum(lengths, 0) - lengths, {"mean": torch.zeros(2), "std": torch.ones(2)},
                         shards=[torch.zeros(2 * n, 2)])


@pytest.mark.slow
def test_train_frames_sum_every_ranks_own_frames(corpus, tmp_path):
    """Under torch.distributed, results.json counts the frames each rank trained, summed over ranks
    (ranks' shards differ in length); one epoch with every utterance in a full batch trains the
    whole training split once: its frames counted here from the audio files, not the feature cache."""
    import json

    import soundfile as sf

    run = tmp_path / "run"
    args = overrides(corpus, "cluster=processes", "accelerator=cpu", "strategy=sync", "nodes=2", "batch_size=2",
                     "trainer.max_epochs=1")
    proc = subprocess.run([sys.executable, "-m", "asrbench.cli", "train", *args, f"hydra.run.dir={run}"], cwd=ROOT,
                          env=os.environ | {"WANDB_MODE": "disabled"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # by hand: 1 + (samples - 400) // 160 fbank frames (25 ms window, 10 ms shift), stacked 3, every 3rd kept
    lengths = [(1 + (sf.info(p).frames - 400) // 160 - 3) // 3 + 1
               for p in (corpus / "train-clean-100").rglob("*.flac")]
    assert len(lengths) == 12 and min(lengths) != max(lengths)  # shards differ
    assert json.loads((run / "results.json").read_text())["train_frames"] == sum(lengths)
