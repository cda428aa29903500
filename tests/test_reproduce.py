"""The paper-scale projection of `asrbench reproduce`: hand-computed cases and its consistency
with a run's own cost-model prediction."""
from __future__ import annotations

import json
import math

import pytest
import torch

from asrbench import reproduce as rep
from asrbench.cluster import cost
from asrbench.data import text
from asrbench.errors import ConfigError
from asrbench.model.lstm import LSTMAcousticModel

NET = {"name": "t", "latency_s": 1e-5, "bandwidth_Bps": 1e9, "gpus_per_machine": 8,
       "intra_latency_s": 1e-6, "intra_bandwidth_Bps": 1e11}


def row(strategy, nodes, params, **stats):
    base = {"dense_bytes_per_worker_per_step": 4.0 * params}
    return {"strategy": strategy, "nodes": nodes,
            "cost_model": {"stats": base | stats, "strategy": strategy, "n": nodes}}


@pytest.mark.parametrize("cfg", [dict(hidden_size=96, num_layers=2), dict(hidden_size=32, num_layers=3, proj_size=16)])
def test_model_parameters_counts_the_real_model(cfg):
    real = LSTMAcousticModel(240, text.vocab_size(), **cfg)
    assert rep.model_parameters({"name": "x", **cfg}, 240) == sum(p.numel() for p in real.parameters())


def test_paper_model_is_22m_parameters():
    # 4 h (in + h) + 8 h per layer: 4*768*1008 + 4 * 4*768*1536, + biases, + the output layer
    lstm = 4 * 768 * (240 + 768) + 4 * (4 * 768 * 1536) + 5 * 8 * 768
    out = 768 * text.vocab_size() + text.vocab_size()
    assert rep.model_parameters({"hidden_size": 768, "num_layers": 5}, 240) == lstm + out


def test_bmuf_projection_by_hand():
    # a run of a 1,000-parameter model; projected to 1,000,000 parameters, 64 workers, K = 4
    r = row("bmuf", 64, 1000, model_bytes=4000.0, block_size=4.0, group_size=1.0)
    (p,) = rep.project([r], NET, {"compute_s_per_worker_step": 0.1}, 1_000_000)
    m = 4e6  # model bytes scaled 1000x
    comm = 2 * 63 * (1e-5 + m / (64 * 1e9)) / 4  # 64 workers span 8 machines: the Ethernet link
    assert p["comm_s"] == pytest.approx(comm)
    assert p["predicted_speedup"] == pytest.approx(64 * 0.1 / (0.1 + comm))


def test_gtc_projection_keeps_density_and_uses_profile_rates():
    # 2% of 1,000 elements sent as 4-byte words; projected to 10^6 parameters at 128 workers
    r = row("gtc", 128, 1000, gtc_msg_bytes_mean=80.0, gtc_msg_bytes_max=96.0, elements_sent_per_step=20.0,
            decode_rate=1e6)
    prof = {"compute_s_per_worker_step": 0.2, "decode_rate": 1e9, "gtc_encode_s_per_worker_step": 0.01}
    (p,) = rep.project([r], NET, prof, 1_000_000)
    lengths = 127 * (1e-5 + 8 / 1e9)
    messages = 127 * (1e-5 + 96_000 / 1e9)
    decode = 128 * 20_000 / 1e9
    assert p["comm_s"] == pytest.approx(lengths + messages + decode)
    assert p["step_s"] == pytest.approx(0.21 + lengths + messages + decode)
    assert p["predicted_speedup"] == pytest.approx(128 * 0.2 / p["step_s"])


def test_projection_at_the_runs_own_size_equals_the_runs_prediction():
    stats = {"gtc_msg_bytes_mean": 500.0, "gtc_msg_bytes_max": 700.0, "elements_sent_per_step": 125.0,
             "decode_rate": 3e8, "model_bytes": 8000.0, "block_size": 4.0, "group_size": 8.0}
    r = row("gtc_bmuf", 64, 2000, **stats)
    (p,) = rep.project([r], NET, {"compute_s_per_worker_step": 0.05, "decode_rate": 3e8}, 2000)
    own = cost.step_time("gtc_bmuf", 0.05, r["cost_model"]["stats"], 64, NET)
    assert p["step_s"] == pytest.approx(own["total_s"])
    assert p["predicted_speedup"] == pytest.approx(cost.speedup(64, own["total_s"], 0.05))


def test_projection_table_and_errors():
    rows = [{"strategy": "gtc", "nodes": 32, "predicted_speedup": 13.0, "step_s": 1.0, "comm_s": 0.5,
             "comm_parts": {"gtc_messages": 0.4, "gtc_decode": 0.1}},
            {"strategy": "bmuf", "nodes": 128, "predicted_speedup": 120.0, "step_s": 0.2, "comm_s": 0.01,
             "comm_parts": {"block_allreduce": 0.01}}]
    table = rep.projection_table(rows)
    assert "| gtc | 32 |" in table and "gtc_messages (0.400 s)" in table and "| -50% |" in table
    errors, median = rep.speedup_errors(rows)
    assert [round(e["rel_error"], 3) for e in errors] == [-0.5, 0.5]
    assert math.isclose(median, 0.5)


def test_rows_without_a_cost_model_are_skipped():
    assert rep.project([{"strategy": "single", "nodes": 1}], NET, {"compute_s_per_worker_step": 1.0}, 10) == []


# ---------------------------------------------------------------- convergence, seeds, claims
def test_convergence_is_the_relative_change_over_the_last_fifth():
    # dev loss 2 / (1 + step / 100), validated every 50 of 1,000 steps: at 800 it is 2/9, at 1,000 2/11
    curve = [(s, 2 / (1 + s / 100)) for s in range(50, 1001, 50)]
    c = rep.convergence(curve, 1000)
    assert c["from_step"] == 800 and c["to_step"] == 1000
    assert c["rel_change"] == pytest.approx((2 / 11 - 2 / 9) / (2 / 9))
    flat = rep.convergence([(s, 1.0 + 1e-4 * (s % 2)) for s in range(10, 101, 10)], 100)
    assert abs(flat["rel_change"]) < 1e-3
    # no validation before the tail: compared with the first; one point: not measurable
    assert rep.convergence([(900, 2.0), (1000, 1.0)], 1000)["rel_change"] == pytest.approx(-0.5)
    assert math.isnan(rep.convergence([(10, 1.0)], 10)["rel_change"])
    with pytest.raises(ValueError, match="tail"):
        rep.convergence(curve, 1000, tail=1.5)


def test_mean_sd_is_the_sample_deviation():
    assert rep.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    mean, sd = rep.mean_sd([0.5])
    assert mean == 0.5 and math.isnan(sd)
    assert rep.mean_sd([None, 4.0, float("nan"), 6.0]) == (5.0, pytest.approx(math.sqrt(2)))


@pytest.mark.parametrize("lower,higher,word", [
    ([0.01, 0.02, 0.03], [0.10, 0.11, 0.12], "agrees"),          # margin 0.09 > spread 0.01
    ([0.10, 0.11, 0.12], [0.01, 0.02, 0.03], "disagrees"),
    ([0.01, 0.05, 0.09], [0.03, 0.06, 0.09], "within noise"),   # margin 0.01 < spread 0.04
    ([0.01], [0.02], "agrees (one seed)"),
    ([0.05], [0.02], "disagrees (one seed)"),
])
def test_verdict_by_hand(lower, higher, word):
    v = rep.verdict(lower, higher)
    assert v["verdict"] == word
    assert v["margin"] == pytest.approx(sum(higher) / len(higher) - sum(lower) / len(lower))


def test_claims_use_the_baseline_as_zero_and_the_best_of_several_cells():
    per_seed = {("gtc_bmuf", 32): {0: -0.02, 1: -0.03, 2: -0.025}, ("gtc", 32): {0: 0.05, 1: 0.06, 2: 0.07},
                ("bmuf", 32): {0: 0.01, 1: 0.0, 2: 0.02}, ("gtc_bmuf", 128): {0: 0.2, 1: 0.1, 2: 0.15},
                ("gtc", 128): {0: 0.5, 1: 0.6, 2: 0.55}, ("bmuf", 128): {0: 0.12, 1: 0.13, 2: 0.14}}
    judged = {j["claim"]: j for j in rep.judge_claims(per_seed)}
    assert judged["32 workers: GTC-BMUF below the baseline"]["verdict"] == "agrees"
    assert judged["32 workers: GTC < BMUF"]["verdict"] == "disagrees"
    best = judged["trend: the hybrid is the most accurate at 128"]  # against bmuf, the better of the two
    assert best["higher"] == pytest.approx(0.13) and best["verdict"] == "within noise"
    assert judged["64 workers: GTC < GTC-BMUF"]["verdict"] == "not measured"
    table = rep.claims_table(list(judged.values()))
    assert "| 32 workers: GTC < BMUF | +1.4% vs +3.5% | +6.0% | +1.0% | -5.0 pts | 1.0 pts | **disagrees** |" in table


def test_aggregate_over_seeds_and_the_headline_table():
    rows = {s: [{"strategy": "gtc", "nodes": 32, "seed": s, "wer": w, "rel_wer": r, "fer": None, "steps": 100}]
            for s, w, r in ((0, 0.30, 0.10), (1, 0.32, 0.14), (2, 0.34, 0.12))}
    (cell,) = rep.aggregate(rows)
    assert cell["seeds"] == [0, 1, 2] and cell["wer"] == pytest.approx(0.32) and cell["wer_sd"] == pytest.approx(0.02)
    assert cell["rel_wer"] == pytest.approx(0.12) and math.isnan(cell["fer"])
    table = rep.accuracy_table([cell], {("gtc", 32): 13.0})
    assert "| gtc | 32 | 3 | 32.0 ± 2.0% | +12.0 ± 2.0% | +1.4% | - | - | 13.0x | 26x | 100 |" in table


def test_search_winner_is_lowest_dev_wer_and_a_finished_search_is_reused(tmp_path):
    cands = [{"dev_wer": 0.4}, {"dev_wer": 0.3}, {"dev_wer": 0.3}]
    assert rep.pick_winner(cands) == 1
    search = {"nodes": 32, "seed": 0, "strategies": {"gtc": {"candidates": [], "winner": 0,
                                                             "winner_overrides": ["strategy.tau=0.002"]}}}
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "search.json").write_text(json.dumps(search))
    assert rep.load_search(tmp_path) == search
    assert rep.load_search(tmp_path / "search" / "search.json") == search
    with pytest.raises(ConfigError, match="search.reuse"):
        rep.load_search(tmp_path / "nowhere")


def test_settings_side_by_side(tmp_path):
    def setting(rel, verdict, margin):
        return {"cells": [{"strategy": "single", "nodes": 1, "rel_wer": 0.0, "rel_wer_sd": 0.0},
                          {"strategy": "gtc", "nodes": 128, "rel_wer": rel, "rel_wer_sd": 0.02}],
                "claims": [{"claim": "trend: GTC collapses at 128 (worse than at 64)", "paper": "+2.8% vs +15.6%",
                            "verdict": verdict, "margin": margin}]}
    adam, sgd = setting(0.063, "within noise", 0.006), setting(0.5, "agrees", 0.3)
    (tmp_path / "reproduce.json").write_text(json.dumps(sgd))
    assert rep.load_reproduce(tmp_path) == sgd
    with pytest.raises(ConfigError, match="compare_with: .*nowhere holds no reproduce.json"):
        rep.load_reproduce(tmp_path / "nowhere")
    table = rep.settings_table([("cpu", adam), ("cpu_sgd", sgd)])
    assert "| strategy | workers | paper | cpu | cpu_sgd |" in table
    assert "| gtc | 128 | +15.6% | +6.3 ± 2.0% | +50.0 ± 2.0% |" in table
    assert ("| trend: GTC collapses at 128 (worse than at 64) | +2.8% vs +15.6% | **within noise** (+0.6 pts) | "
            "**agrees** (+30.0 pts) |") in table
    assert "single" not in table
