"""Network calibration (asrbench/cluster/calibrate.py) and the straggler term of the cost model."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import yaml

from asrbench.cluster import calibrate as cal
from asrbench.cluster import cost

ROOT = Path(__file__).resolve().parents[2]
ALPHA, BANDWIDTH = 40e-6, 1.5e9
SIZES = [4096, 65536, 1048576, 16777216]


def alpha_beta_time(op: str, m: float, n: int, alpha: float, bandwidth: float) -> float:
    """The collectives' alpha-beta times written out here, not through the cost model: ring all-reduce
    2 (n-1) (a + m / (n B)); GTC's all-gather, 8-byte lengths then the m-byte messages, (n-1) (a + 8 / B) +
    (n-1) (a + m / B); pipelined chain broadcast in S = max(1, sqrt((n-2) m / (B a))) segments,
    (n-2+S) (a + m / (S B))."""
    if op == "all_reduce":
        return 2 * (n - 1) * (alpha + m / (n * bandwidth))
    if op == "all_gather":
        return (n - 1) * (alpha + 8 / bandwidth) + (n - 1) * (alpha + m / bandwidth)
    segments = max(1.0, math.sqrt((n - 2) * m / (bandwidth * alpha)))
    return (n - 2 + segments) * (alpha + m / (segments * bandwidth))


def synthetic_points(alpha: float = ALPHA, bandwidth: float = BANDWIDTH) -> list[dict]:
    return [{"op": op, "n": n, "bytes": nbytes, "seconds": alpha_beta_time(op, nbytes, n, alpha, bandwidth)}
            for op in ("all_reduce", "all_gather", "broadcast") for n in (2, 4, 8) for nbytes in SIZES]


def test_fit_recovers_known_constants():
    result = cal.calibrate(synthetic_points())
    assert result["latency_s"] == pytest.approx(ALPHA, rel=1e-3)
    assert result["bandwidth_Bps"] == pytest.approx(BANDWIDTH, rel=1e-3)
    assert result["held_out_worst_abs_error"] < 1e-3
    assert len(result["fit_points"]) == len(result["held_out"]) == 3 * 3 * 2  # alternate sizes per curve
    assert {p["bytes"] for p in result["fit_points"]} == {4096, 1048576}
    for op, r in result["per_collective"].items():
        assert r["latency_s"] == pytest.approx(ALPHA, rel=1e-3), op


def test_calibrated_network_round_trips_through_cluster_network(tmp_path):
    from hydra import compose, initialize_config_dir

    from asrbench.experiment import SimulatedRunner

    result = cal.calibrate(synthetic_points())
    path = cal.write_network(tmp_path / "net.yaml", cal.network_preset("loopback", result, backend="gloo"))
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["cluster=simulated", f"cluster.network={path}", "logger=none", "nodes=4"])
    network = SimulatedRunner(cfg, tmp_path / "run").network
    assert network["name"] == "loopback" and network["gpus_per_machine"] == 1
    assert network["latency_s"] == network["intra_latency_s"] == pytest.approx(result["latency_s"])
    assert network["bandwidth_Bps"] == network["intra_bandwidth_Bps"] == pytest.approx(result["bandwidth_Bps"])
    stats = {"dense_bytes_per_worker_per_step": 1e6}
    # 2 (n-1) (a + m / (n B)) at the fitted figures, by hand
    assert cost.comm_parts("sync", stats, 4, network)["allreduce"] == pytest.approx(
        2 * 3 * (result["latency_s"] + 1e6 / (4 * result["bandwidth_Bps"])))


def test_config_errors_name_the_input():
    good = {"world_sizes": [2], "sizes_bytes": [4096, 8192], "ops": ["all_reduce"], "repeats": 1}
    cal.check_config(good)
    for key, bad, words in (("world_sizes", [1], "at least 2 processes"), ("sizes_bytes", [4096], "at least 2 sizes"),
                            ("ops", ["reduce_scatter"], "use some of")):
        with pytest.raises(cal.ConfigError, match=words):
            cal.check_config(good | {key: bad})


@pytest.mark.slow
def test_short_calibrate_run_completes_in_seconds(tmp_path):
    cfg = {"name": "quick", "backend": "gloo", "world_sizes": [2], "sizes_bytes": [4096, 65536, 1048576],
           "ops": list(cal.OPS), "repeats": 2, "min_time_s": 0.005, "save_as": str(tmp_path / "saved.yaml")}
    t0 = time.perf_counter()
    result = cal.run(cfg, tmp_path / "out")
    assert time.perf_counter() - t0 < 60
    assert len(result["fit_points"]) + len(result["held_out"]) == 9
    assert all(p["seconds"] > 0 for p in result["fit_points"])
    assert cost.load_network(str(tmp_path / "saved.yaml"))["latency_s"] == pytest.approx(result["latency_s"])
    # the preset as plain yaml: one level at the fitted figures, and the 9 points it was fitted and checked on
    preset = yaml.safe_load((tmp_path / "out" / "network.yaml").read_text())
    assert (preset["name"], preset["gpus_per_machine"]) == ("quick", 1)
    assert preset["latency_s"] == preset["intra_latency_s"] == result["latency_s"]
    assert preset["bandwidth_Bps"] == preset["intra_bandwidth_Bps"] == result["bandwidth_Bps"]
    assert sorted((p["op"], p["n"], p["bytes"]) for p in preset["calibration"]["points"]) == sorted(
        (op, 2, size) for op in cal.OPS for size in (4096, 65536, 1048576))
    assert "held out" in (tmp_path / "out" / "calibrate.md").read_text()


# --- stragglers -------------------------------------------------------------------------------
FRAMES = [[10, 20, 30, 40],   # worker frames at step 0
          [40, 10, 10, 10],
          [10, 10, 10, 10],
          [20, 30, 10, 20]]
MEAN_WORK = 25 + 17.5 + 10 + 20


def test_straggler_factor_by_hand():
    assert cost.straggler_factor(FRAMES, group_size=4) == pytest.approx((40 + 40 + 10 + 30) / MEAN_WORK)  # sync, gtc
    # bmuf, K = 2: block sums per worker [50, 30, 40, 50] then [30, 40, 20, 30]
    assert cost.straggler_factor(FRAMES, group_size=1, block_size=2) == pytest.approx((50 + 40) / MEAN_WORK)
    assert cost.straggler_factor(FRAMES, group_size=1, block_size=4) == pytest.approx(80 / MEAN_WORK)
    # gtc_bmuf, g = 2, K = 2: group maxima per step (20, 40 | 40, 10) then (10, 30 | 10, 20)
    assert cost.straggler_factor(FRAMES, group_size=2, block_size=2) == pytest.approx((60 + 40) / MEAN_WORK)
    # a partial last block counts as it is: K = 3 is [0..2] then [3]
    assert cost.straggler_factor(FRAMES, group_size=1, block_size=3) == pytest.approx((60 + 30) / MEAN_WORK)
    assert cost.straggler_factor([[7, 7], [3, 3]], group_size=2) == 1.0  # equal batches: no waiting
    assert cost.straggler_factor([], group_size=1) == 1.0
    with pytest.raises(ValueError, match="divide"):
        cost.straggler_factor(FRAMES, group_size=3)


def test_step_time_charges_the_slowest_worker():
    net = cost.load_network("paper")
    stats = {"model_bytes": 4e6, "block_size": 2.0}
    even = cost.step_time("bmuf", 0.2, stats, 4, net)
    factor = cost.straggler_factor(FRAMES, *cost.waits("bmuf", 4, stats))
    slow = cost.step_time("bmuf", 0.2, stats | {"straggler_factor": factor}, 4, net)
    assert even["straggler_s"] == 0.0
    assert slow["straggler_s"] == pytest.approx(0.2 * (90 / MEAN_WORK - 1))
    # by hand: 4 workers on one machine (NVLink, 3 us, 1.5e11 B/s), the model's ring once per K = 2 steps
    comm = 2 * 3 * (3e-6 + 4e6 / (4 * 1.5e11)) / 2  # 29 us
    assert even["total_s"] == pytest.approx(0.2 + comm)
    assert slow["total_s"] == pytest.approx(0.2 * 90 / MEAN_WORK + comm)  # only the compute is stretched
    assert slow["comm_s"] == even["comm_s"]
    assert cost.waits("sync", 4, {}) == (4, 1) and cost.waits("gtc_bmuf", 8, {"group_size": 2,
                                                                               "block_size": 3}) == (2, 3)
    with pytest.raises(ValueError, match="straggler_factor"):
        cost.step_time("sync", 0.2, {"dense_bytes_per_worker_per_step": 1.0, "straggler_factor": 0.5}, 4, net)
