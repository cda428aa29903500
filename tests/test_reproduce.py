"""`asrbench reproduce`: the paper-scale projection (hand-computed cases, at a run's own size and
scaled), the claims restated over an experiment's worker counts, the report's tables."""
from __future__ import annotations

import json
import math

import pytest
import torch

from asrbench import report
from asrbench import reproduce as rep
from asrbench.data import text
from asrbench.errors import ConfigError
from asrbench.model.lstm import LSTMAcousticModel
from asrbench.paper import CLAIMS

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


def test_projection_at_the_runs_own_size_is_the_gtc_bmuf_cost_by_hand():
    stats = {"gtc_msg_bytes_mean": 500.0, "gtc_msg_bytes_max": 700.0, "elements_sent_per_step": 125.0,
             "decode_rate": 3e8, "model_bytes": 8000.0, "block_size": 4.0, "group_size": 8.0}
    r = row("gtc_bmuf", 64, 2000, **stats)
    (p,) = rep.project([r], NET, {"compute_s_per_worker_step": 0.05, "decode_rate": 3e8}, 2000)
    # by hand, nothing rescaled (2,000 parameters both): GTC inside each machine's group of 8 (NVLink figures)
    lengths = 7 * (1e-6 + 8 / 1e11)
    messages = 7 * (1e-6 + 700 / 1e11)
    decode = 8 * 125 / 3e8
    # once per K = 4 steps: a ring of the 8 representatives across machines (Ethernet), then a broadcast in
    # each group (S = sqrt(6 x 8e-8 / 1e-6) < 1, so one segment: 7 hops of 1e-6 + 8000 / 1e11)
    allreduce = 2 * 7 * (1e-5 + 8000 / (8 * 1e9)) / 4
    broadcast = 7 * (1e-6 + 8000 / 1e11) / 4
    comm = lengths + messages + decode + allreduce + broadcast  # 5.777e-5 s
    assert p["comm_s"] == pytest.approx(comm)
    assert p["comm_parts"]["block_broadcast"] == pytest.approx(broadcast)
    assert p["step_s"] == pytest.approx(0.05 + comm)
    assert p["predicted_speedup"] == pytest.approx(64 * 0.05 / (0.05 + comm))  # 63.93


def test_projection_table_and_errors():
    rows = [{"strategy": "gtc", "nodes": 32, "predicted_speedup": 13.0, "step_s": 1.0, "comm_s": 0.5,
             "comm_parts": {"gtc_messages": 0.4, "gtc_decode": 0.1}},
            {"strategy": "bmuf", "nodes": 128, "predicted_speedup": 120.0, "step_s": 0.2, "comm_s": 0.01,
             "comm_parts": {"block_allreduce": 0.01}}]
    table = report.projection_table(rows)
    assert "| gtc | 32 |" in table and "gtc_messages (0.400 s)" in table and "| -50% |" in table
    errors, median = report.speedup_errors(rows)
    assert [round(e["rel_error"], 3) for e in errors] == [-0.5, 0.5]
    assert math.isclose(median, 0.5)


def test_rows_without_a_cost_model_are_skipped():
    assert rep.project([{"strategy": "single", "nodes": 1}], NET, {"compute_s_per_worker_step": 1.0}, 10) == []


# ---------------------------------------------------------------- claims and the report's tables
def test_claims_are_restated_at_the_experiments_worker_counts():
    by_text = {c.text: c for c in CLAIMS}
    c = by_text["{128}: BMUF < GTC"]
    assert c.cells([4, 8, 16]) == (("bmuf", 16), (("gtc", 16),))
    assert c.cells([4, 8]) is None  # its tier of 128 was not run: labelled with the paper's counts
    assert c.describe([4, 8]) == "128: BMUF < GTC (the paper's workers; tier not run)"
    assert c.describe([4, 8, 16]) == "16: BMUF < GTC" and c.paper_text() == "+9.6% vs +15.6%"
    assert c.margin == pytest.approx(0.156 - 0.096)
    below = by_text["{32}: GTC-BMUF below the baseline"]
    assert below.cells([4, 8, 16]) == (("gtc_bmuf", 4), (("single", 1),)) and below.margin is None
    best = by_text["trend: the hybrid is the most accurate at {128}"]
    assert best.margin == pytest.approx(min(0.156, 0.096) - 0.047)  # against the better of the two


def test_claims_table_shows_the_interval_the_corrected_p_and_the_mde():
    j = {"claim": "16: BMUF < GTC", "paper": "+9.6% vs +15.6%", "metric": "wer", "mean": 0.021, "low": 0.004,
         "high": 0.038, "p_holm": 0.03, "paper_margin": 0.06, "p_ref_holm": 0.0004, "mde": 0.018, "mde_holm": 0.031,
         "verdict": "agrees; excludes the paper's effect"}
    table = report.claims_table([j, {"claim": "x", "paper": "y", "verdict": "not measured"}])
    assert ("| 16: BMUF < GTC | +9.6% vs +15.6% | WER | +2.1 [+0.4, +3.8] pts | 0.030 | +6.0 pts | <0.001 | "
            "1.8 / 3.1 pts | **agrees; excludes the paper's effect** |") in table
    assert "| x | y | - | - | - | - | - | - | not measured |" in table
    # with the seeds each claim's MDE would need (stats.seeds_for), a column more
    j |= {"mde_target": 0.02, "seeds_for_mde": 4, "seeds_for_mde_holm": math.inf, "mde_floor": 0.012,
          "mde_floor_holm": 0.021}
    table = report.claims_table([j, j | {"seeds_for_mde": math.inf},
                                 {"claim": "x", "paper": "y", "verdict": "not measured"}])
    assert "MDE (α 0.05 / Holm) | seeds for an MDE of 2 pts (α 0.05 / Holm) | verdict |" in table
    assert "| 1.8 / 3.1 pts | 4 / none: test set | **agrees" in table
    assert "| 1.8 / 3.1 pts | > 100 / none: test set | **agrees" in table
    assert "| x | y | - | - | - | - | - | - | - | not measured |" in table


def test_search_winner_is_lowest_dev_wer_and_a_finished_search_is_reused(tmp_path):
    cands = [{"dev_wer": 0.4}, {"dev_wer": 0.3}, {"dev_wer": 0.3}]
    assert rep.pick_winner(cands) == 1
    dense = [{"dev_wer": 0.30, "density": 0.15}, {"dev_wer": 0.32, "density": 0.012}, {"dev_wer": 0.5, "density": None}]
    assert rep.pick_winner(dense) == 0 and rep.pick_winner(dense, max_density=0.1) == 1  # the cap excludes 15%
    assert rep.pick_winner(dense[:1] + [{"dev_wer": 0.2, "density": 0.2}], max_density=0.1) == 0  # none under: sparsest
    search = {"nodes": 32, "seed": 0, "strategies": {"gtc": {"candidates": [], "winner": 0,
                                                             "winner_overrides": ["strategy.tau=0.002"]}}}
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "search.json").write_text(json.dumps(search))
    assert rep.load_search(tmp_path) == search
    assert rep.load_search(tmp_path / "search" / "search.json") == search
    with pytest.raises(ConfigError, match="search.reuse"):
        rep.load_search(tmp_path / "nowhere")


def test_settings_side_by_side(tmp_path):
    new = {"claims": [{"claim": "trend: GTC collapses at 16 (worse than at 8)", "verdict": "inconclusive",
                       "mean": 0.006, "low": -0.01, "high": 0.022}]}
    old = {"claims": [{"claim": "trend: GTC collapses at 16 (worse than at 8)", "verdict": "within noise",
                       "margin": 0.006}]}
    (tmp_path / "reproduce.json").write_text(json.dumps(new))
    assert rep.load_reproduce(tmp_path) == new
    with pytest.raises(ConfigError, match="compare_with: .*nowhere holds no reproduce.json"):
        rep.load_reproduce(tmp_path / "nowhere")
    table = report.settings_table([("cpu", new), ("older", old)])
    assert ("| trend: GTC collapses at 16 (worse than at 8) | **inconclusive** (+0.6 [-1.0, +2.2] pts) | "
            "**within noise** (+0.6 pts, older rule) |") in table


@pytest.mark.parametrize("preset", ["cpu", "cpu_compare", "cpu_sgd", "cpu_paper_n", "gpu"])
def test_every_scaled_preset_trains_each_run_at_least_1000_steps_and_the_block_runs_50_blocks(preset):
    """Every run that enters a claim: (epochs - warm start) x floor(training utterances / N) >= 1,000 optimizer
    steps at the preset's largest N, and every searched BMUF block size K gives >= 50 blocks there."""
    import os

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        rc = compose("reproduce", overrides=[f"reproduce={preset}"]).reproduce
        data = next(o.split("=", 1)[1] for o in rc.overrides if o.startswith("data="))
        synth = OmegaConf.load(os.path.join(conf, "data", f"{data}.yaml")).synth
    utterances = synth.utterances.train * sum(s.role == "train" for s in synth.speakers)
    n = max(rc.nodes)
    steps = (rc.epochs - rc.warm_start_epochs) * (utterances // n)
    assert steps >= 1000, f"reproduce={preset}: {steps} steps at {n} workers"
    for candidate in rc.search.grid.get("bmuf", []):
        k = next(int(o.split("=")[1]) for o in candidate if o.startswith("strategy.block_size="))
        assert steps // k >= 50, f"reproduce={preset}: K={k} gives {steps // k} blocks at {n} workers"


@pytest.mark.parametrize("key, value, what", [("mde_target", 0, "a positive fraction"),
                                              ("mde_target", "two", "a positive fraction"),
                                              ("plateau_tolerance", -0.1, "a fraction >= 0"),
                                              ("plateau_points", 2, "a whole number >= 3")])
def test_a_bad_statistics_key_stops_with_one_line_naming_it(tmp_path, key, value, what):
    from omegaconf import OmegaConf

    from asrbench.errors import ConfigError
    from asrbench.reproduce import run_reproduce
    cfg = OmegaConf.create({"reproduce": {"seeds": [0], "epochs": 2, "warm_start_epochs": 1, "strategies": [],
                                          key: value}})
    with pytest.raises(ConfigError, match=rf"^reproduce\.{key}={value} must be {what}"):
        run_reproduce(cfg, tmp_path, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was trained or written

