"""fp16 and bf16 gradients (asrbench/strategies/halfprec.py): the simulated cast against torch's
own hook arithmetic, the bytes by hand (2 per element), the schedule, and the simulated cluster
against real gloo processes running torch's fp16_compress_hook / bf16_compress_hook."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from asrbench.cluster import cost
from asrbench.strategies import build_strategy, spec
from asrbench.strategies.halfprec import BF16Strategy, FP16Strategy
from asrbench.strategies.hooked import SimulatedHook

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dist_utils, equivalence
from equivalence import NODES, STEPS, case, check_equal, real_runs, rel, simulated  # noqa: E402

CASES = {"fp16": case({"name": "fp16"}), "bf16": case({"name": "bf16"}), "sync": case({"name": "sync"})}
NET = {"name": "toy", "latency_s": 1.0, "bandwidth_Bps": 10.0, "gpus_per_machine": 4,
       "intra_latency_s": 0.0, "intra_bandwidth_Bps": 100.0}  # as tests/cluster/test_cost.py


@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_simulated_exchange_is_torchs_cast_divide_sum_cast_back(name, dtype):
    strategy = build_strategy({"name": name}, nodes=3, timeout_s=30)
    ex = SimulatedHook(strategy.hook_state, 3, [torch.Size([4, 5]), torch.Size([7])], torch.device("cpu"))
    g = torch.randn(3, 27, generator=torch.Generator().manual_seed(0))
    grads = g.clone()
    ex.exchange(grads, 0)
    half = g.to(dtype).div_(3)  # torch's _compress_hook: buffer.to(dtype).div_(world_size)
    expected = ((half[0] + half[1]) + half[2]).float()  # the all-reduce's sum, in rank order
    assert torch.equal(grads, expected.expand_as(grads))
    s = strategy.comm_stats.per_step()
    assert s["payload_bytes_per_worker_per_step"] == 2 * 27  # 2 bytes per element
    assert s["all_reduce_bytes_sent_per_worker_per_step"] == 2 * 2 / 3 * 54  # ring: 2 (N-1)/N b
    assert s["dense_bytes_per_worker_per_step"] == 2 * 2 / 3 * 108 and s["compression_ratio"] == 2.0
    assert s["density"] == 1.0
    assert ex.cost_stats()[f"{name}_msg_bytes"] == 54
    assert spec(name).stacked_arrays({}, 3) == {}  # no residual


def test_schedule_is_one_half_precision_ring_all_reduce():
    stats = {"fp16_msg_bytes": 40.0, "dense_bytes_per_worker_per_step": 80.0}
    parts = cost.comm_parts("fp16", stats, 8, NET)
    assert parts == {"fp16_allreduce": pytest.approx(2 * 7 * (1 + 40 / 80))}  # 2 (n-1)(alpha + m / (n B))
    assert cost.comm_parts("fp16", stats, 1, NET) == {}
    with pytest.raises(ValueError, match="bf16_msg_bytes"):
        cost.comm_parts("bf16", {"dense_bytes_per_worker_per_step": 80.0}, 8, NET)


def test_the_strategies_register_torchs_hooks_and_refuse_another():
    assert spec("fp16").strategy_class is FP16Strategy and spec("bf16").strategy_class is BF16Strategy
    assert FP16Strategy.hook.__name__ == "accounted_fp16_compress_hook"
    assert BF16Strategy.hook.__name__ == "accounted_bf16_compress_hook"
    with pytest.raises(Exception, match="ddp_comm_hook"):
        build_strategy({"name": "fp16", "ddp_comm_hook": print}, nodes=2, timeout_s=30)


@pytest.fixture(scope="module")
def real():
    return real_runs(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_simulated_workers_equal_real_processes_within_the_strategys_tolerance(real, name):
    sim = simulated(CASES[name])
    runs = [r[name] for r in real]
    worst = max(rel(sim["per_step"][s, rank], runs[rank]["per_step"][s]) for s in range(STEPS) for rank in range(NODES))
    print(f"{name}: worst relative difference from gloo {worst:.2e}")
    check_equal(sim, runs, name)  # within spec(name).equivalence_tolerance, bytes equal
    assert worst > 0  # gloo sums the half-precision rows in its own order: not the same bits
    sync = [r["sync"]["per_step"] for r in real]
    # the half-precision cast ran: the real workers left fp32 sync SGD's parameters
    assert max(rel(runs[0]["per_step"][s], sync[0][s]) for s in range(STEPS)) > 1e-6
    assert sim["summary"]["payload_compression_ratio"] == 2.0
