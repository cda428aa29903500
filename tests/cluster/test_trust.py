"""The "how far to trust these speedups" section (asrbench/cluster/trust.py) and the straggler re-costing."""
from __future__ import annotations

import pytest

from asrbench.cluster import cost, stragglers, trust

CAL = {"where": "a test box", "latency_s": 50e-6, "bandwidth_Bps": 2e9, "held_out_median_abs_error": 0.12,
       "held_out_worst_abs_error": 0.4, "per_collective": {"all_reduce": {"held_out_median_abs_error": 0.05}}}
CHECKS = [{"strategy": "sync", "nodes": 2, "predicted_s": 0.010, "measured_s": 0.020, "where": "a test box",
           "load": 1.5}]


def test_section_names_every_figure_and_assumption():
    shares = [{"strategy": "bmuf", "nodes": 32, "factor": 1.2, "share": 0.15},
              {"strategy": "bmuf", "nodes": 64, "factor": 1.25, "share": 0.19}]
    md = trust.trust_section([CAL], CHECKS, shares, findings=["Overhead is the missing term."])
    assert md.startswith("## How far to trust these speedups")
    assert "| a test box | 50 us | 2.00 GB/s | 12% | 40% | all_reduce 5% |" in md
    assert "| a test box (1.5) | sync | 2 | 10.0 | 20.0 | -50% |" in md
    assert "| bmuf | 15% (s 1.20) | 19% (s 1.25) |" in md
    assert "Overhead is the missing term." in md
    assert "v100_lstm_paper.yaml" in md and "p3.16xlarge" in md


def test_overhead_fitted_at_two_workers_predicts_the_held_out_checks():
    # a machine whose every step costs the model's prediction plus a constant per strategy
    true = {"single": 0.007, "sync": 0.013, "gtc": 0.027}
    checks = [{"strategy": st, "nodes": n, "predicted_s": p, "measured_s": p + true[st], "where": "box"}
              for st, n, p in [("single", 1, 0.009), ("sync", 2, 0.010), ("sync", 4, 0.0125), ("sync", 8, 0.016),
                               ("gtc", 2, 0.0136), ("gtc", 4, 0.0177)]]
    checks.append({"strategy": "bmuf", "nodes": 4, "predicted_s": 0.02, "measured_s": 0.03, "where": "box"})
    fitted, held = trust.fit_step_overhead(checks)
    assert fitted["box"] == pytest.approx(true)  # bmuf has no N = 2 check: nothing fitted, nothing held out
    assert [(h["strategy"], h["nodes"]) for h in held] == [("sync", 4), ("sync", 8), ("gtc", 4)]
    assert all(h["error"] == pytest.approx(0.0, abs=1e-12) for h in held)
    # a miss is the relative error of the prediction plus the overhead
    checks[2]["measured_s"] = (0.0125 + 0.013) * 1.25
    _, held = trust.fit_step_overhead(checks)
    assert held[0]["error"] == pytest.approx(1 / 1.25 - 1)
    md = trust.trust_section([CAL], checks, [])
    assert "**With the per-step overhead term**" in md and "| box | sync | 4 | lstm_tiny | 13.0 | 25.5 | 31.9 | -20% |" in md
    # another model at the fitted N is held out too
    checks.append({"strategy": "sync", "nodes": 2, "model": "lstm_small", "predicted_s": 0.03, "measured_s": 0.05,
                   "where": "box"})
    fitted, held = trust.fit_step_overhead(checks)
    assert fitted["box"]["sync"] == pytest.approx(0.013)
    assert held[-1]["model"] == "lstm_small" and held[-1]["error"] == pytest.approx(0.043 / 0.05 - 1)


def test_overhead_term_enters_step_time_and_speedup():
    assert cost.load_network("loopback_gloo_idle16")["step_overhead_s"]["sync"] > 0  # the measured file has one
    net = {"name": "box", "latency_s": 1e-4, "bandwidth_Bps": 1e9, "gpus_per_machine": 1, "intra_latency_s": 1e-4,
           "intra_bandwidth_Bps": 1e9, "step_overhead_s": {"single": 0.005, "sync": 0.01}}
    stats = {"dense_bytes_per_worker_per_step": 4e6}
    plain = cost.step_time("sync", 0.01, stats, 4, net | {"step_overhead_s": None})
    timed = cost.step_time("sync", 0.01, stats, 4, net)
    # by hand: a ring of 4, 2 x 3 x (1e-4 + 4e6 / (4 x 1e9)) = 6.6 ms; sync's overhead 10 ms on top
    assert plain["total_s"] == pytest.approx(0.01 + 0.0066)
    assert timed["overhead_s"] == 0.01 and timed["total_s"] == pytest.approx(0.0266)
    rows = cost.scaling("sync", 0.01, stats, [4], net)
    assert rows[0]["speedup"] == pytest.approx(4 * (0.01 + 0.005) / 0.0266)  # T_1 pays single's 5 ms: 2.26
    assert cost.step_overhead(cost.load_network("paper"), "gtc") == 0.0  # nothing measured at the paper's scale


@pytest.mark.parametrize("value, words", [(-0.01, "single] must be a number of seconds >= 0"),
                                          ({"syncc": 0.01}, "names syncc, not a strategy"),
                                          ({"gtc": "fast"}, "gtc] must be a number")])
def test_bad_overhead_is_one_line(value, words):
    net = {"name": "box", "latency_s": 1e-5, "bandwidth_Bps": 1e9, "gpus_per_machine": 1,
           "intra_latency_s": 1e-5, "intra_bandwidth_Bps": 1e9, "step_overhead_s": value}
    with pytest.raises(cost.ConfigError, match="network=box: `step_overhead_s`") as err:
        cost.check_network(net)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_straggler_shares_from_runs_and_their_projection():
    results = [{"strategy": "gtc", "nodes": 32, "cost_model": {"stats": {"straggler_factor": 1.5}}}]
    rows = [{"strategy": "gtc", "nodes": 32, "compute_s": 0.2, "step_s": 0.5},
            {"strategy": "bmuf", "nodes": 32, "compute_s": 0.2, "step_s": 0.25}]
    shares = trust.straggler_shares(results, rows)
    assert shares[0] == {"strategy": "gtc", "nodes": 32, "factor": 1.5, "share": pytest.approx(0.1 / 0.5)}
    assert shares[1]["factor"] == 1.0 and shares[1]["share"] == 0.0  # a run from before the straggler term


def test_report_section_reads_the_measured_files():
    md = trust.report_section([], [])
    assert "idle 16-core" in md and "2-core VM" in md and "predicted vs measured" in md


def test_with_stragglers_recosts_a_paper_bmuf_speedup_by_hand():
    net = cost.load_network("paper")
    stats = {"model_bytes": 88e6, "block_size": 4.0}
    # by hand: 128 workers span 16 machines, so the 25 Gb/s Ethernet (50 us, 3.125e9 B/s) each K = 4 steps:
    # 2 x 127 x (5e-5 + 88e6 / (128 x 3.125e9)) / 4 = 0.017145 s; T_1 = 0.22 s of compute
    comm = 2 * 127 * (50e-6 + 88e6 / (128 * 3.125e9)) / 4
    before = cost.speedup(128, cost.step_time("bmuf", 0.22, stats, 128, net)["total_s"], 0.22)
    assert before == pytest.approx(128 * 0.22 / (0.22 + comm))  # 118.7
    # the slowest worker computes 1.2 x as long; the communication is unchanged
    assert stragglers.with_stragglers(before, 128, 1.2) == pytest.approx(128 * 0.22 / (1.2 * 0.22 + comm))  # 100.2


def test_sampler_frames_deal_the_corpus_as_the_loaders_do():
    lengths = [10, 20, 30, 40, 50, 60, 70, 80]
    frames = stragglers.sampler_frames(lengths, nodes=2, batch_size=2)
    assert len(frames) == 2 and all(len(step) == 2 for step in frames)  # 8 utterances / (2 workers x 2)
    from torch.utils.data import BatchSampler, DistributedSampler

    batches = list(BatchSampler(DistributedSampler(range(8), num_replicas=2, rank=1, shuffle=True, seed=0,
                                                   drop_last=True), 2, True))
    assert [step[1] for step in frames] == [2 * max(lengths[i] for i in b) for b in batches]
    bucketed = stragglers.sampler_frames(lengths, nodes=2, batch_size=2, sampler="bucketed")
    assert sum(map(sum, bucketed)) <= sum(map(sum, frames))  # sorted batches pad less
    imb = stragglers.imbalance(frames)
    assert imb["steps"] == 2 and imb["median"] >= 1.0
