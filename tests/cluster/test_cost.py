import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from asrbench.cluster import cost
from asrbench.errors import ConfigError

PRESETS = Path(__file__).resolve().parents[2] / "conf" / "network"

# Toy network: 4 workers per machine, free fast links inside, slow links with 1 s latency between.
NET = {"name": "toy", "latency_s": 1.0, "bandwidth_Bps": 10.0, "gpus_per_machine": 4,
       "intra_latency_s": 0.0, "intra_bandwidth_Bps": 100.0}
STATS = {"dense_bytes_per_worker_per_step": 80.0, "gtc_msg_bytes_mean": 12.0, "gtc_msg_bytes_max": 20.0,
         "elements_sent_per_step": 5.0, "decode_rate": 10.0, "model_bytes": 160.0, "block_size": 4,
         "group_size": 4}


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def comm(strategy, n, stats=STATS, net=NET):
    return cost.step_time(strategy, 0.0, stats, n, net)["comm_s"]


def test_ring_allreduce_by_hand():
    # 2 (n-1) (alpha + m / (n B)) = 6 (1e-5 + 8e6 / 4e9) = 6 x 0.00201
    assert close(cost.ring_allreduce_time(8e6, 4, 1e-5, 1e9), 0.01206)
    assert cost.ring_allreduce_time(8e6, 1, 1e-5, 1e9) == 0.0


def test_allgather_equal_and_padded_variable_sizes():
    assert close(cost.allgather_time(1000, 5, 1e-6, 1e6), 4 * (1e-6 + 1e-3))
    # lengths: 2 x 8/1000 = 0.016; padded messages 2 x 4000/1000 = 8; unpadded bound 2 x 1000/1000 = 2
    assert close(cost.allgatherv_time(1000, 4000, 3, 0.0, 1e3), 8.016)
    assert close(cost.allgatherv_time(1000, 4000, 3, 0.0, 1e3, padded=False), 2.016)
    assert cost.allgatherv_time(500, 500, 3, 1e-6, 1e3) == cost.allgatherv_time(500, 500, 3, 1e-6, 1e3, padded=False)
    with pytest.raises(ValueError, match="max_bytes"):
        cost.allgatherv_time(10, 5, 3, 0.0, 1.0)


def test_pipelined_broadcast():
    # best S = sqrt((n-2) m beta / alpha) = sqrt(3 x 12) = 6 segments: (3 + 6) x (1 + 12/6) = 27
    assert close(cost.broadcast_time(12, 5, 1.0, 1.0), 27.0)
    assert close(27.0, (math.sqrt(3) + math.sqrt(12)) ** 2)
    assert close(cost.broadcast_time(12, 2, 1.0, 1.0), 13.0)  # one hop, one message
    assert cost.broadcast_time(0, 8, 1.0, 1.0) == 7.0  # latency-bound: S = 1
    assert cost.broadcast_time(800, 8, 0.0, 100.0) == 8.0  # no latency: m beta, whatever n
    assert cost.broadcast_time(800, 1, 1.0, 1.0) == 0.0


def test_decode_time():
    assert close(cost.decode_time(1e6, 1e8), 0.01)
    with pytest.raises(ValueError, match="decode_rate"):
        cost.decode_time(1, 0.0)


def test_placement():
    assert cost.within_one_machine(0, 3, 4) and not cost.within_one_machine(0, 4, 4)
    assert cost.groups_within_machines(16, 4, 8)
    assert not cost.groups_within_machines(12, 6, 8)  # ranks 6..11 straddle machines 0 and 1
    assert not cost.groups_within_machines(8, 8, 4)


def test_sync_intra_and_across_machines():
    assert close(comm("sync", 4), 2 * 3 * (80 / (4 * 100)))  # one machine: NVLink figures
    assert close(comm("sync", 8), 2 * 7 * (1 + 80 / (8 * 10)))  # two machines: the slow link
    assert comm("single", 8) == 0.0


def test_gtc_by_hand():
    parts = cost.comm_parts("gtc", STATS, 8, NET)
    assert close(parts["gtc_lengths"], 7 * (1 + 8 / 10))
    assert close(parts["gtc_messages"], 7 * (1 + 20 / 10))  # padded to the max, not the mean
    assert close(parts["gtc_decode"], 8 * 5 / 10)
    assert close(comm("gtc", 8), 12.6 + 21 + 4)


def test_gtc_dense_warm_up_steps_cost_a_ring_all_reduce():
    quarter = {**STATS, "gtc_dense_step_fraction": 0.25}
    parts = cost.comm_parts("gtc", quarter, 8, NET)
    assert close(parts["gtc_messages"], 0.75 * 7 * (1 + 20 / 10))
    # by hand: the dense steps' ring of 8 over the slow link, 2 x 7 x (1 + 80 / (8 x 10)) = 28 s
    assert close(parts["gtc_dense_allreduce"], 0.25 * 28)
    # 3/4 of GTC's 12.6 + 21 + 4 = 37.6 s (test_gtc_by_hand) and 1/4 of the 28 s ring
    assert close(comm("gtc", 8, quarter), 0.75 * 37.6 + 0.25 * 28)
    assert close(comm("gtc", 8, {**STATS, "gtc_dense_step_fraction": 1.0}), 28.0)
    with pytest.raises(ValueError, match="gtc_dense_step_fraction"):
        cost.comm_parts("gtc", {**STATS, "gtc_dense_step_fraction": 1.5}, 8, NET)


def test_bmuf_is_amortised_over_the_block():
    per_block = 2 * 7 * (1 + 160 / (8 * 10))  # by hand: the model's ring of 8 over the slow link, 42 s
    assert close(comm("bmuf", 8), per_block / 4)
    assert close(comm("bmuf", 8, {**STATS, "block_size": 1}), per_block)
    assert close(comm("bmuf", 8, {**STATS, "block_size": 40}) * 40, per_block)


def test_gtc_bmuf_by_hand():
    parts = cost.comm_parts("gtc_bmuf", STATS, 8, NET)
    # GTC inside each machine's group of 4 (intra, alpha ~ 0): 3 x 8/100, 3 x 20/100, 4 x 5 / 10
    assert close(parts["gtc_lengths"], 0.24) and close(parts["gtc_messages"], 0.6)
    assert close(parts["gtc_decode"], 2.0)
    # representatives 0 and 4 are on two machines: 2 x (1 + 160 / 20) / K
    assert close(parts["block_allreduce"], 2 * 9 / 4)
    # pipelined broadcast within 4 (intra, alpha = 0): m beta = 160/100, / K
    assert close(parts["block_broadcast"], 0.4)
    assert close(comm("gtc_bmuf", 8), 0.24 + 0.6 + 2.0 + 4.5 + 0.4)


@pytest.mark.parametrize("n", [4, 8, 32])
def test_gtc_bmuf_limits(n):
    one_group = {**STATS, "group_size": n}
    alpha, bandwidth = (0.0, 100.0) if n <= 4 else (1.0, 10.0)  # NET's links: inside one machine, or across
    # the pipelined chain's optimum (sqrt((n-2) alpha) + sqrt(m / B))^2, by hand; its S >= 1 for these n
    broadcast = (math.sqrt((n - 2) * alpha) + math.sqrt(160 / bandwidth)) ** 2 / 4
    assert close(comm("gtc_bmuf", n, one_group), comm("gtc", n) + broadcast)
    assert close(comm("gtc_bmuf", n, {**STATS, "group_size": 1}), comm("bmuf", n))


def test_overlap_and_speedup():
    assert cost.speedup(32, 0.5, 0.5, 16) == 32.0  # no communication: linear
    assert close(cost.speedup(4, 2.0, 1.0, 16), 2.0)
    assert cost.scaling("single", 0.3, {}, [1, 32], NET)[1]["speedup"] == 32.0
    full = cost.step_time("sync", 100.0, STATS, 8, NET, overlap=1.0)
    assert full["total_s"] == 100.0 and cost.speedup(8, full["total_s"], 100.0) == 8.0
    # 28 s of communication, half hidden, but never more than the 1 s of compute
    assert close(cost.step_time("sync", 1.0, STATS, 8, NET, overlap=0.5)["total_s"], 28.0)
    assert close(cost.step_time("sync", 100.0, STATS, 8, NET, overlap=0.5)["total_s"], 114.0)


@settings(max_examples=60, deadline=None)
@given(strategy=st.sampled_from(["sync", "gtc", "bmuf", "gtc_bmuf"]), n=st.sampled_from([2, 4, 8, 16, 64]),
       nbytes=st.floats(1.0, 1e9), factor=st.floats(1.01, 100.0))
def test_more_bandwidth_less_time(strategy, n, nbytes, factor):
    stats = {**STATS, "dense_bytes_per_worker_per_step": nbytes, "model_bytes": nbytes,
             "gtc_msg_bytes_mean": nbytes / 2, "gtc_msg_bytes_max": nbytes, "group_size": 2}
    faster = {**NET, "bandwidth_Bps": 10.0 * factor, "intra_bandwidth_Bps": 100.0 * factor}
    assert comm(strategy, n, stats, faster) < comm(strategy, n, stats)
    lower_latency = {**NET, "latency_s": 1.0 / factor}
    assert comm(strategy, n, stats, lower_latency) <= comm(strategy, n, stats)


def test_presets_load_and_order():
    nets = {p.stem: yaml.safe_load(p.read_text()) for p in PRESETS.glob("*.yaml")}
    assert set(nets) >= {"paper", "eth10", "eth25", "eth100", "infiniband", "nvlink"}
    for stem, net in nets.items():
        assert net["name"] == stem and net["notes"]
        assert isinstance(cost.check_network(net)["gpus_per_machine"], int)
    sync = [comm("sync", 32, STATS | {"dense_bytes_per_worker_per_step": 88e6}, nets[name])
            for name in ("eth10", "eth25", "eth100", "infiniband", "nvlink")]
    assert sync == sorted(sync, reverse=True) and len(set(sync)) == len(sync)


def test_errors_name_the_input():
    with pytest.raises(ValueError, match="model_bytes"):
        cost.step_time("bmuf", 1.0, {"block_size": 4}, 8, NET)
    with pytest.raises(ValueError, match="group_size"):
        cost.step_time("gtc_bmuf", 1.0, {**STATS, "group_size": 3}, 8, NET)
    with pytest.raises(ValueError, match="gtc_msg_bytes_max"):
        cost.step_time("gtc", 1.0, {**STATS, "gtc_msg_bytes_max": 1.0}, 8, NET)
    with pytest.raises(ValueError, match="overlap"):
        cost.step_time("sync", 1.0, STATS, 8, NET, overlap=1.5)
    with pytest.raises(ValueError, match="strategy='ddp'"):
        cost.step_time("ddp", 1.0, STATS, 8, NET)
    with pytest.raises(ConfigError, match="intra_bandwidth_Bps"):
        cost.step_time("sync", 1.0, STATS, 8, {k: v for k, v in NET.items() if k != "intra_bandwidth_Bps"})


@pytest.mark.parametrize("key,value", [("bandwidth_Bps", 0.0), ("latency_s", -1.0), ("gpus_per_machine", 2.5),
                                       ("gpus_per_machine", math.inf), ("bandwidth_Bps", "fast")])
def test_bad_network_values(key, value):
    with pytest.raises(ConfigError, match=key):
        cost.check_network({**NET, key: value})
