"""PowerSGD (torch's powerSGD_hook, wrapped): the simulated cluster against 4 real gloo processes,
full rank against sync SGD, the bytes against (n + m) r 4 by hand, the cost schedule against the
alpha-beta formula, the split into compressed and uncompressed tensors, and bad knobs refused."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dist_utils, equivalence
from equivalence import NODES, STEPS, case, check_equal, real_runs, rel, simulated  # noqa: E402

from asrbench import config  # noqa: E402
from asrbench.cluster import cost  # noqa: E402
from asrbench.errors import ConfigError  # noqa: E402
from asrbench.strategies import build_strategy  # noqa: E402
from asrbench.strategies.powersgd import plan_bucket, power_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CASES = {
    # error feedback and warm start, 2 dense steps, then rank 1
    "rank1": case({"name": "powersgd", "rank": 1, "warmup_steps": 2}),
    # a fresh random Q every step, no error memory, compressing from step 0 (DDP's first bucket layout)
    "rank2_cold": case({"name": "powersgd", "rank": 2, "warmup_steps": 0, "warm_start": False,
                        "error_feedback": False}),
    # r >= min(n, m) of every matrix and every tensor compressed: P Q^T reproduces the mean
    "full_rank": case({"name": "powersgd", "rank": 64, "min_compression_rate": 0, "warmup_steps": 2}),
}
SYNC = case({"name": "sync"})
# the test model's trainable parameters, in model order (equivalence.MODEL: LSTM 8 -> 16, 29 outputs)
SHAPES = [(64, 8), (64, 16), (64,), (64,), (29, 16), (29,)]
NUMEL = 2157


@pytest.fixture(scope="module")
def real():
    return real_runs(CASES)


_SIMULATED: dict[str, dict] = {}


def sim_run(name: str) -> dict:
    """The case on the simulated cluster, once per test session."""
    if name not in _SIMULATED:
        _SIMULATED[name] = simulated(SYNC if name == "sync" else CASES[name])
    return _SIMULATED[name]


def ring(nbytes: float, n: int = NODES) -> float:
    """Bytes one worker sends in a ring all-reduce of `nbytes`: 2 (n - 1) / n b."""
    return 2 * (n - 1) / n * nbytes


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_simulated_workers_equal_torch_hook_on_real_processes(real, name):
    sim = sim_run(name)
    check_equal(sim, [r[name] for r in real], name)


@pytest.mark.slow
def test_full_rank_powersgd_is_sync_sgd(real):
    """r >= min(n, m) and every tensor compressed: P spans M's columns, so P Q^T = P P^T mean_w M_w
    is the mean (up to rounding): the run is sync SGD's, simulated and on real processes."""
    sync = sim_run("sync")
    sim = sim_run("full_rank")
    worst = max(rel(sim["per_step"][s, 0], sync["per_step"][s, 0]) for s in range(STEPS))
    assert worst <= 1e-5, worst
    for rank in range(NODES):
        real_run = real[rank]["full_rank"]["per_step"]
        assert max(rel(real_run[s], sync["per_step"][s, 0]) for s in range(STEPS)) <= 1e-5
    assert rel(sync["final"], sync["per_step"][0, 0]) > 1e-2  # it trained


@pytest.mark.slow
def test_bytes_are_n_plus_m_times_r_words_per_matrix(real):
    """Rank 1 on the test model: the three matrices (64x8, 64x16, 29x16) compress, the three biases
    (64, 64, 29) are all-reduced as they are; 2 dense steps, then 24 compressed ones."""
    p = (64 + 64 + 29) * 1 * 4  # sum n r, fp32
    q = (8 + 16 + 16) * 1 * 4  # sum m r
    unc = (64 + 64 + 29) * 4
    dense = NUMEL * 4
    expected = (2 * ring(dense) + (STEPS - 2) * (ring(p) + ring(q) + ring(unc))) / STEPS
    for rank in range(NODES):
        s = real[rank]["rank1"]["summary"]
        assert s["all_reduce_bytes_sent_per_worker_per_step"] == pytest.approx(expected, rel=1e-12)
        assert s["bytes_sent_per_worker_per_step"] == pytest.approx(expected, rel=1e-12)
        assert s["dense_bytes_per_worker_per_step"] == pytest.approx(ring(dense), rel=1e-12)
        assert s["collectives_per_step"] == pytest.approx((2 * 1 + (STEPS - 2) * 3) / STEPS)
        assert s["density"] == pytest.approx((2 * NUMEL + (STEPS - 2) * (157 + 40 + 157)) / (STEPS * NUMEL))
    cluster = sim_run("rank1")["cluster"]
    stats = cluster.cost_stats()
    assert (stats["powersgd_p_bytes"], stats["powersgd_q_bytes"], stats["powersgd_uncompressed_bytes"]) == (p, q, unc)
    assert stats["powersgd_dense_step_fraction"] == 2 / STEPS


def test_the_split_follows_torch_should_compress_by_hand():
    """(n + m) r x rate < n m: at rank 4, rate 2, 64x8 is kept (576 > 512), 64x16 (640 < 1024) and
    29x16 (360 < 464) compress; a bias (64x1, r = 1: 130 > 64) never does; Qs grouped by shape."""
    plan = plan_bucket(SHAPES, 4, 2.0)
    assert plan.compressed == (1, 4) and plan.uncompressed == (0, 2, 3, 5)
    assert plan.matrices == ((64, 16, 4), (29, 16, 4))
    assert (plan.p_elements, plan.q_elements, plan.uncompressed_elements) == ((64 + 29) * 4, 32 * 4, 512 + 157)
    grouped = plan_bucket([(5, 3), (4, 4), (5, 3)], 1, 0.0)  # the hook draws Q for both 5x3 first
    assert grouped.compressed == (0, 2, 1)


def test_power_step_over_stacked_workers_by_hand():
    """Steps 5-6 for two workers against the formulas written out: P = orth(M_1 Q + M_2 Q), Q' = mean M_w^T P."""
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(4, 2, generator=gen, dtype=torch.float64))[0]
    P, Q_new = power_step(M, Q.unsqueeze(0).clone(), 0.0)
    expected_P = torch.linalg.qr(M[0] @ Q + M[1] @ Q)[0]
    signs = torch.sign((P[0] * expected_P).sum(0))  # Gram-Schmidt's columns, QR's up to sign
    assert torch.allclose(P[0], expected_P * signs, atol=1e-12)
    assert torch.allclose(Q_new[0], (M[0].T @ P[0] + M[1].T @ P[0]) / 2, atol=1e-12)


def test_cost_schedule_by_hand():
    net = {"name": "toy", "latency_s": 1.0, "bandwidth_Bps": 10.0, "gpus_per_machine": 4,
           "intra_latency_s": 0.0, "intra_bandwidth_Bps": 100.0}
    stats = {"powersgd_p_bytes": 40.0, "powersgd_q_bytes": 16.0, "powersgd_uncompressed_bytes": 24.0,
             "powersgd_dense_step_fraction": 0.25, "dense_bytes_per_worker_per_step": 800.0}
    n, f = 8, 0.25  # two machines: every ring pays 1 s latency and 10 B/s per hop

    def allreduce(m):  # 2 (n-1) (alpha + m / (n B))
        return 2 * (n - 1) * (1.0 + m / (n * 10.0))

    parts = cost.comm_parts("powersgd", stats, n, net)
    assert parts["powersgd_p"] == pytest.approx((1 - f) * allreduce(40), rel=1e-12)
    assert parts["powersgd_q"] == pytest.approx((1 - f) * allreduce(16), rel=1e-12)
    assert parts["powersgd_uncompressed"] == pytest.approx((1 - f) * allreduce(24), rel=1e-12)
    assert parts["powersgd_dense_allreduce"] == pytest.approx(f * allreduce(800), rel=1e-12)
    within = cost.comm_parts("powersgd", stats | {"powersgd_dense_step_fraction": 0.0}, 4, net)
    assert set(within) == {"powersgd_p", "powersgd_q", "powersgd_uncompressed"}
    assert within["powersgd_p"] == pytest.approx(2 * 3 * 40 / (4 * 100.0), rel=1e-12)  # one machine, no latency
    with pytest.raises(ValueError, match="powersgd_dense_step_fraction"):
        cost.comm_parts("powersgd", stats | {"powersgd_dense_step_fraction": 1.5}, n, net)


def test_bad_knobs_are_refused_in_one_line():
    def composed(*overrides):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            return compose("train", ["strategy=powersgd", "nodes=4", *overrides])

    config.validate(composed())
    for override, key in (("strategy.rank=0", "strategy.rank="), ("strategy.warmup_steps=1", "strategy.warmup_steps="),
                          ("strategy.random_seed=-1", "strategy.random_seed=")):
        with pytest.raises(ConfigError) as err:
            config.validate(composed(override))
        assert str(err.value).startswith(key) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match=r"^strategy=powersgd: Arg `rank` .* got 0$"):
        build_strategy({"name": "powersgd", "rank": 0, "warmup_steps": 2}, nodes=4, timeout_s=30)
    build_strategy({"name": "powersgd", "warmup_steps": 0, "warm_start": False, "error_feedback": False},
                   nodes=4, timeout_s=30)  # torch allows no warm-up without error memory or warm start


def test_simulation_records_ddp_rebuilt_order_from_the_first_backward():
    """The order the gradients became ready in worker 0's first backward, measured independently
    with DDP on gloo for this LSTM: output.bias, output.weight, weight_ih, bias_ih, weight_hh, bias_hh."""
    exchange = sim_run("rank1")["cluster"].exchange
    assert exchange.rebuilt == [[5, 4, 0, 2, 1, 3]]
    assert [tuple(s) for s in exchange.shapes] == SHAPES and sum(math.prod(s) for s in SHAPES) == NUMEL
