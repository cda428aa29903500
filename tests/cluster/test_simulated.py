"""The simulated cluster against real gloo processes, the stacked optimizer against N optimizers,
per-worker clipping against torch's, the memory guard, and `asrbench train cluster=simulated`."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from asrbench.cluster.simulated import (LoopConfig, RowBinding, SimulatedCluster, build_worker_optimizer, check_memory,
                                        clip_rows, fit, parse_max_time, row_parameters, stacked_arrays)
from asrbench.data.dataset import SpeechDataset
from asrbench.errors import ConfigError
from asrbench.model.module import AcousticModule
from asrbench.strategies import build_strategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "strategies"))  # dist_utils, equivalence
from equivalence import (BATCH, CLIP, DIM, MODEL, NODES, OPTIM, SEED, STEPS, case, check_equal,  # noqa: E402
                         flat, module, real_runs, simulated, synthetic_split)

ROOT = Path(__file__).resolve().parents[2]
TAU = 0.05  # sends ~30 % of this model's gradient elements per step (checked below)
# 6 dense steps teach Adam its second moment v, which then freezes and scales τ per element (the *_rms cases)
FREEZE = {"freeze_variance_after": 6}
CASES = {
    "sync": case({"name": "sync"}),
    "sync_step_decay": case({"name": "sync"}, lr_decay_interval="step"),  # the lr decays after every step
    "gtc": case({"name": "gtc", "tau": TAU, "max_density": None}),
    "bmuf": case({"name": "bmuf", "block_size": 4}),
    "gtc_bmuf": case({"name": "gtc_bmuf", "group_size": 2, "block_size": 4, "tau": TAU, "max_density": None}),
    "gtc_rms": case({"name": "gtc", "tau": 3.0, "max_density": None, "dense_warmup_steps": 6, "tau_units": "rms"},
                    **FREEZE),
    "gtc_bmuf_rms": case({"name": "gtc_bmuf", "group_size": 2, "block_size": 4, "tau": 3.0, "max_density": None,
                          "dense_warmup_steps": 6, "tau_units": "rms"}, **FREEZE),
    # BMUF with K = 1, block momentum 0 and block lr 1 is model averaging after every step
    "bmuf_k1": case({"name": "bmuf", "block_size": 1, "block_momentum": 0.0, "block_lr": 1.0}),
}
STRATEGIES = {name: c["strategy"] for name, c in CASES.items()}


def _module(name: str = "sync") -> AcousticModule:
    return module(CASES[name]["optim"] if name in CASES else None)


_flat = flat


@pytest.fixture(scope="module")
def real():
    return real_runs(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_simulated_workers_equal_real_processes(real, name):
    sim = simulated(CASES[name])
    runs = [r[name] for r in real]
    check_equal(sim, runs, name)
    kind = STRATEGIES[name]["name"]
    if kind in ("gtc", "gtc_bmuf") and not name.endswith("_rms"):  # no float sums in another order: the hook's bits
        assert all(torch.equal(sim["per_step"][s, rank], runs[rank]["per_step"][s])
                   for s in range(STEPS) for rank in range(NODES))
    s = sim["summary"]
    if kind in ("gtc", "gtc_bmuf"):
        assert 0.001 < s["density"] < 0.5 or name.endswith("_rms")  # the compression path ran
    if name.endswith("_rms"):  # 6 dense steps, then GTC sending a fraction of the elements
        assert 0.001 < (s["density"] * STEPS - 6) / (STEPS - 6) < 0.5
        assert sim["cluster"].cost_stats()["gtc_dense_step_fraction"] == 6 / STEPS  # costed as all-reduces
    if kind in ("bmuf", "gtc_bmuf") and name != "bmuf_k1":
        assert s["bmuf_blocks"] == runs[0]["summary"]["bmuf_blocks"] == STEPS // 4 + 1  # 6 blocks + the partial one
        rows = sim["per_step"]
        assert not torch.equal(rows[4, 0], rows[4, 2]) and torch.equal(rows[3, 0], rows[3, 2])  # step 4 syncs


def test_bmuf_with_k1_no_momentum_and_unit_block_lr_is_model_averaging_every_step():
    """Chen & Huo's filter with K = 1, eta = 0, zeta = 1 is plain model averaging after every step
    (torch's PeriodicModelAverager with period 1): W(t) = mean_i of each worker's locally stepped model."""
    cluster = SimulatedCluster(_module("bmuf_k1"), build_strategy(STRATEGIES["bmuf_k1"], nodes=NODES, timeout_s=30),
                               NODES, gradient_clip_val=CLIP)
    data = SpeechDataset(synthetic_split(NODES * BATCH * 6, 1))
    seen = []

    def before_average(cl, losses, step, epoch):
        seen.append(cl.P.clone())

    # the mean of the rows the optimizer produced, taken before the averager writes it back
    averager = cluster.averager
    means = []
    original = averager.average_parameters

    def spy(params, optimizer=None):
        means.append(cluster.P.mean(0).clone())
        return original(params, optimizer)

    averager.average_parameters = spy
    fit(cluster, data, batch_size=BATCH, seed=SEED, loop=LoopConfig(max_steps=8, enable_progress_bar=False),
        on_step=before_average)
    assert len(means) == len(seen) == 8
    for mean, rows in zip(means, seen):
        assert torch.allclose(rows, mean.expand_as(rows), rtol=0, atol=1e-6)  # every worker on the mean, every step


# ---------------------------------------------------------------------------------------------
# The stacked optimizer and clipping, exactly
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optim", [
    {"name": "adam", "lr": 0.01, "warmup_steps": 3},
    {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
    {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "lr_scaling": "linear"},
])
def test_one_optimizer_over_the_rows_of_p_equals_one_optimizer_per_worker(optim):
    workers = 3
    modules = [AcousticModule(DIM, MODEL, optim, "ctc", world_size=workers) for _ in range(workers)]
    binding = RowBinding(modules[0].model)
    stacked = torch.stack([RowBinding(m.model).flat() for m in modules])
    rows = row_parameters(stacked)
    stacked_opt, stacked_scheds = build_worker_optimizer(modules[0], rows)
    singles = [build_worker_optimizer(m, list(m.model.parameters())) for m in modules]
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        grads = torch.randn(workers, binding.numel, generator=gen)
        for row, g in zip(rows, grads.clone()):
            row.grad = g
        stacked_opt.step()
        for config in stacked_scheds:
            config.scheduler.step()
        for m, (opt, scheds), g in zip(modules, singles, grads):
            for p, v in zip(m.model.parameters(), binding.views(g)):
                p.grad = v.clone()
            opt.step()
            for config in scheds:
                config.scheduler.step()
    for i, m in enumerate(modules):
        assert torch.equal(stacked[i], RowBinding(m.model).flat())  # the rows are views of the stacked P
    assert not torch.equal(stacked[0], stacked[1])


def test_clip_rows_is_clip_grad_norm_of_each_worker():
    model = AcousticModule(DIM, MODEL, OPTIM, "ctc").model
    binding = RowBinding(model)
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(4, binding.numel, generator=gen) * torch.tensor([[0.001], [0.1], [1.0], [10.0]])
    expected = []
    for row in grads:
        for p, v in zip(model.parameters(), binding.views(row)):
            p.grad = v.clone()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.5)
        expected.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    clipped = grads.clone()
    clip_rows(clipped, binding, 1.5)
    assert torch.equal(clipped, torch.stack(expected))
    assert torch.equal(clipped[0], grads[0]) and not torch.equal(clipped[3], grads[3])  # small rows untouched


def test_bmuf_over_representative_rows_filters_the_mean_and_averages_optimizer_state():
    from asrbench.strategies.bmuf import SimulatedBMUFAverager
    from asrbench.strategies.accounting import CommStats
    from asrbench.strategies.bmuf import BMUFConfig

    gen = torch.Generator().manual_seed(2)
    start = torch.randn(10, generator=gen)
    stacked = start.expand(4, -1).clone()
    stats = CommStats(4)
    averager = SimulatedBMUFAverager(stacked, BMUFConfig(block_size=2, average_sync=True), group_size=2,
                                     comm_stats=stats)
    assert averager.num_workers == 2 and averager.block_momentum == 0.5  # eta = 1 - 1/G over G = 2 groups
    rows = row_parameters(stacked)
    optimizer = torch.optim.Adam(rows, lr=0.1)
    for row in rows:
        row.grad = torch.randn(10, generator=gen)
    optimizer.step()
    stacked[1], stacked[3] = stacked[0], stacked[2]  # groups {0, 1} and {2, 3} hold one model each, as GTC keeps them
    state = {k: torch.stack([optimizer.state[r][k] for r in rows]) for k in ("exp_avg", "exp_avg_sq")}
    assert not averager.average_parameters([stacked[0]], optimizer)  # step 1 of K = 2
    mean = (stacked[0] + stacked[2]) / 2
    assert averager.average_parameters([stacked[0]], optimizer)
    averager.broadcast_row0()
    # by hand, the first block of Nesterov block momentum (eta = 1/2, zeta = 1, no earlier Delta):
    # Delta = W_bar - S(0), W_g = S(0) + Delta, and the workers restart from W_g + eta Delta
    delta = mean - start
    assert torch.equal(averager.global_model, start + delta)
    assert torch.equal(stacked, (start + delta + 0.5 * delta).expand(4, -1))
    for key, before in state.items():
        after = torch.stack([optimizer.state[r][key] for r in rows])
        assert torch.equal(after, ((before[0] + before[2]) / 2).expand(4, -1))
    stats.step()  # parameters (10) and Adam's two moments (2 x 10), fp32: a ring of 2, then to the group's member
    assert stats.per_step()["all_reduce_bytes_sent_per_worker_per_step"] == 2 * (2 - 1) / 2 * (10 + 20) * 4
    assert stats.per_step()["broadcast_bytes_sent_per_worker_per_step"] == (10 + 20) * 4


# ---------------------------------------------------------------------------------------------
# Guards and knobs
# ---------------------------------------------------------------------------------------------
def test_absurd_cluster_is_refused_in_one_line_before_reading_data(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["cluster=simulated", "nodes=100000", "model=lstm_paper", "strategy=gtc",
                                f"data.root={tmp_path}/missing", "logger=none"])
    from asrbench.experiment import train

    with pytest.raises(ConfigError) as err:
        train(cfg, tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and "nodes=100000" in message and "lower nodes" in message
    assert "residuals" in message and "GiB" in message
    arrays = stacked_arrays({"name": "gtc"}, {"name": "adam"}, 4)
    assert arrays == {"parameters": 1, "gradients": 1, "optimizer state": 2, "residuals": 1}
    assert stacked_arrays({"name": "gtc_bmuf", "group_size": 1}, {"name": "sgd", "momentum": 0.0}, 4) == {
        "parameters": 1, "gradients": 1}
    assert check_memory(4, 1000, arrays, torch.device("cpu")) > 5 * 4 * 1000 * 4


def test_trainer_limits_follow_lightning():
    loop = LoopConfig.from_trainer({"max_epochs": None, "max_steps": 7, "max_time": "00:01:02:03",
                                    "gradient_clip_val": 0.0})
    assert loop.max_epochs is None and loop.max_steps == 7 and loop.gradient_clip_val is None
    assert loop.max_time_s == 3723 and parse_max_time({"minutes": 2}) == 120
    assert LoopConfig.from_trainer({"max_epochs": None}).max_epochs == 1000
    with pytest.raises(ConfigError, match="DD:HH:MM:SS"):
        parse_max_time("8 hours")


def test_too_many_workers_for_the_data_is_a_config_error():
    module = _module()
    cluster = SimulatedCluster(module, build_strategy(STRATEGIES["sync"], nodes=NODES, timeout_s=30), NODES)
    with pytest.raises(ConfigError, match=r"shard of the 24 training utterances \(nodes=4\) holds 6, fewer than "
                                          r"batch_size=8: the run would train 0 steps"):
        fit(cluster, SpeechDataset(synthetic_split(24, 1)), batch_size=8, seed=0, loop=LoopConfig())


# ---------------------------------------------------------------------------------------------
# `asrbench train cluster=simulated` end to end (in process)
# ---------------------------------------------------------------------------------------------
RESULT_KEYS = {"strategy", "nodes", "wer", "cer", "fer", "eval", "steps", "epochs", "train_frames_per_s",
               "bytes_sent_per_worker_per_step", "dense_bytes_per_worker_per_step", "compression_ratio", "density",
               "config", "git_commit", "versions", "wall_s", "checkpoint", "simulated", "network",
               "compute_s_per_worker_step", "predicted_step_s", "predicted_comm_s", "predicted_speedup", "cost_model",
               "bmuf_blocks"}


@pytest.mark.slow
def test_train_simulated_writes_the_results_of_the_real_path(tmp_path, make_librispeech_tree):
    from hydra import compose, initialize_config_dir

    from asrbench.experiment import train

    corpus = make_librispeech_tree(tmp_path / "corpus", {"train-clean-100": (2, 2, 8), "dev-clean": (1, 1, 2),
                                                         "test-clean": (1, 1, 2)}, nested=False)
    run = tmp_path / "run"
    profile = tmp_path / "v100.yaml"  # seconds per worker step measured on a target GPU
    profile.write_text("compute_s_per_worker_step: 0.05\ndecode_rate: 2.0e+8\ngtc_encode_s_per_worker_step: 0.001\n")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["cluster=simulated", "nodes=8", "strategy=gtc_bmuf", "strategy.group_size=2",
                                "strategy.block_size=3", "strategy.tau=0.01", "data=librispeech", f"data.root={corpus}",
                                "data.train_subsets=[train-clean-100]", "data.dev_subsets=[dev-clean]",
                                "data.test_subsets=[test-clean]", "model=lstm_tiny", "batch_size=2",
                                "trainer.max_epochs=3", "trainer.log_every_n_steps=1", "logger=csv",
                                "trainer.enable_progress_bar=false", "cluster.network=eth10",
                                f"cluster.compute_profile={profile}"])
    results = train(cfg, run)
    on_disk = json.loads((run / "results.json").read_text())
    assert RESULT_KEYS <= set(on_disk) and on_disk["nodes"] == 8 and on_disk["strategy"] == "gtc_bmuf"
    assert results["steps"] == 6 and results["epochs"] == 3  # 32 utterances / (8 workers x 2) = 2 steps per epoch
    assert results["simulated"] is True and results["network"] == "eth10"
    assert set(results["eval"]) == {"dev", "test-clean"} and 0 < results["density"] < 1
    assert results["compute_s_per_worker_step"] == 0.05 and results["compute_source"] == str(profile)
    assert results["measured_compute_s_per_worker_step"] > 0 and results["gtc_encode_s_per_worker_step"] == 0.001
    # The prediction can be recomputed from what results.json holds, here by hand: 8 workers on one eth10 machine
    # (NVLink figures, 3 us and 1.5e11 B/s); every step GTC in groups of 2 (lengths, the padded message, decoding
    # 2 messages at the profile's 2e8 elements/s); once per K = 3 steps a ring of the 4 group representatives and
    # a one-hop broadcast to each partner; compute (0.05 s + 0.001 s encode) stretched by the straggler factor.
    m = results["cost_model"]
    st = m["stats"]
    assert st["decode_rate"] == 2.0e8 and not st.get("gtc_dense_step_fraction")  # no dense warm-up steps
    assert m["network"]["gpus_per_machine"] == 8 and m["network"]["intra_latency_s"] == 3e-6
    a, bw = 3e-6, 1.5e11
    comm = ((a + 8 / bw) + (a + st["gtc_msg_bytes_max"] / bw) + 2 * st["elements_sent_per_step"] / 2e8
            + 2 * 3 * (a + st["model_bytes"] / (4 * bw)) / 3 + (a + st["model_bytes"] / bw) / 3)
    step_s = st["straggler_factor"] * (0.05 + 0.001) + comm
    assert results["predicted_step_s"] == pytest.approx(step_s) and results["predicted_comm_s"] == pytest.approx(comm)
    assert results["predicted_speedup"] == pytest.approx(8 * 0.05 / step_s)
    assert st["group_size"] == 2 and st["block_size"] == 3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 7))
    # validations due at the ends of epochs (steps 2, 4, 6) wait for block ends (K = 3): steps 3 and 6
    assert [r["step"] for r in rows if "val/wer" in r] == [3, 6] and "comm/bytes_sent" in rows[0]
    with open(run / "csv" / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(logged) == 6  # a training loss per step (trainer.log_every_n_steps=1)
    hyps = (run / "hyps" / "test-clean.txt").read_text().splitlines()  # the 2 test-clean utterances, by id
    assert [h.split(" ", 1)[0] for h in hyps] == sorted(p.stem for p in (corpus / "test-clean").rglob("*.flac"))
    ckpt = torch.load(results["checkpoint"], weights_only=True)
    restored = AcousticModule(**ckpt["hyper_parameters"])
    restored.load_state_dict(ckpt["state_dict"])  # `asrbench eval run=` loads it the same way


def test_clip_rows_clips_the_phone_probe_by_its_own_norm():
    module = AcousticModule(DIM, MODEL, OPTIM, "ctc", num_phones=5)
    binding = RowBinding(module.model)
    split = len(binding.params) - len(module.probe_parameters())
    gen = torch.Generator().manual_seed(2)
    grads = torch.randn(3, binding.numel, generator=gen) * 3.0
    expected = []
    for row in grads:
        for p, v in zip(module.model.parameters(), binding.views(row)):
            p.grad = v.clone()
        module.configure_gradient_clipping(None, 1.5, "norm")
        expected.append(torch.cat([p.grad.reshape(-1) for p in module.model.parameters()]))
    clipped = grads.clone()
    clip_rows(clipped, binding, 1.5, split=split)
    assert torch.equal(clipped, torch.stack(expected))
    trunk = sum(binding.sizes[:split])
    assert clipped[:, :trunk].norm(dim=1).sub(1.5).abs().max() < 1e-4  # each part at the clip norm
    assert clipped[:, trunk:].norm(dim=1).sub(1.5).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["sync", "gtc_bmuf"])
def test_a_phone_probe_leaves_the_simulated_training_of_the_acoustic_model_unchanged(name):
    """The probe trains on a stopped gradient and is clipped by its own norm: with clipping acting,
    the acoustic model's parameters follow the same path, bit for bit, with and without it."""
    split = synthetic_split(NODES * BATCH * 6, 1)
    gen = torch.Generator().manual_seed(5)
    labels = {u: torch.randint(0, 5, (int(n),), generator=gen) for u, n in zip(split.utt_ids, split.lengths)}
    paths = []
    for num_phones, data in ((0, SpeechDataset(split)), (5, SpeechDataset(split, labels))):
        torch.manual_seed(SEED)
        module = AcousticModule(DIM, MODEL, OPTIM, "ctc", world_size=NODES, num_phones=num_phones)
        cluster = SimulatedCluster(module, build_strategy(STRATEGIES[name], nodes=NODES, timeout_s=30), NODES,
                                   gradient_clip_val=CLIP)
        rows = []
        fit(cluster, data, batch_size=BATCH, seed=SEED, loop=LoopConfig(max_steps=12, enable_progress_bar=False),
            on_step=lambda c, losses, step, epoch: rows.append(c.P.clone()))
        paths.append(torch.stack(rows))
    plain, probed = paths
    assert probed.shape[-1] > plain.shape[-1]
    assert torch.equal(probed[..., :plain.shape[-1]], plain)


@pytest.mark.parametrize("name", ["bmuf", "gtc_bmuf"])
def test_blockwise_runs_validate_the_global_model_at_block_ends(name):
    """A due validation of BMUF / GTC-BMUF waits for the next block end and scores W_g, the global
    model the block filter just made, not worker 0's parameters in the middle of a block."""
    module = _module(name)
    cluster = SimulatedCluster(module, build_strategy(STRATEGIES[name], nodes=NODES, timeout_s=30), NODES)
    seen = []

    def validate(epoch, step):
        seen.append((step, _flat(cluster.module.model)))
        cluster.bind_global_model()
        seen[-1] += (_flat(cluster.module.model), cluster.averager.global_model.clone(), cluster.P[0].clone())

    # validation due every 3 steps of 6 per epoch; blocks of K = 4: due at 3, 6, 9, ... run at 4, 8, 12, ...
    fit(cluster, SpeechDataset(synthetic_split(NODES * BATCH * 6, 1)), batch_size=BATCH, seed=SEED,
        loop=LoopConfig(max_steps=STEPS, val_check_interval=3, enable_progress_bar=False), validate=validate)
    assert [s for s, *_ in seen] == [4, 8, 12, 16, 20, 24]
    for step, _, scored, global_model, row0 in seen:
        assert torch.equal(scored, global_model)  # what validation sees is W_g
        # with Nesterov block momentum the workers restart from W_g + eta Delta, not from W_g
        assert not torch.equal(scored, row0)


def test_sync_runs_validate_when_due():
    module = _module("sync")
    cluster = SimulatedCluster(module, build_strategy(STRATEGIES["sync"], nodes=NODES, timeout_s=30), NODES)
    steps = []
    fit(cluster, SpeechDataset(synthetic_split(NODES * BATCH * 6, 1)), batch_size=BATCH, seed=SEED,
        loop=LoopConfig(max_steps=12, val_check_interval=3, enable_progress_bar=False),
        validate=lambda epoch, step: steps.append(step))
    assert steps == [3, 6, 9, 12]
