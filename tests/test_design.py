"""The fair-race design of `asrbench reproduce`: claims read against a control at the same N, the
ceiling a shared warm start leaves, recovery, pooled seeds and the lr each run started from."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from asrbench import analysis, report, stats
from asrbench.paper import Claim


def _scores(errors, counts, ids=None) -> stats.Scores:
    ids = ids or [f"s{i % 2}-1-{i}" for i in range(len(errors))]
    return stats.Scores.from_table({"ids": ids, "wer_errors": errors, "wer_counts": counts})


def _write(run: Path, sc_errors, counts) -> Path:
    (run / "hyps").mkdir(parents=True)
    ids = [f"s{i % 2}-1-{i}" for i in range(len(sc_errors))]
    (run / "hyps" / "test_seen.scores.json").write_text(json.dumps(
        {"ids": ids, "wer_errors": sc_errors, "wer_counts": counts}))
    return run


def test_effect_against_a_control_subtracts_the_control_seed_by_seed() -> None:
    base = {0: _scores([10, 10], [50, 50]), 1: _scores([10, 10], [50, 50])}     # WER .20
    sync = {0: _scores([12, 12], [50, 50]), 1: _scores([11, 11], [50, 50])}     # +20%, +10%
    gtc = {0: _scores([13, 13], [50, 50]), 1: _scores([12, 12], [50, 50])}      # +30%, +20%
    idx = stats.bootstrap_indices(2, 100, seed=0)
    # "gtc below the baseline" read against sync: 0 - (rel(gtc) - rel(sync)) = -10 points on both seeds
    res = stats.effect([gtc], [None], base, "wer", idx, controls=([sync], [None]))
    assert res.per_seed == pytest.approx((-0.1, -0.1))
    # a pair at one N is the same with or without the control (it cancels)
    plain = stats.effect([sync], [gtc], base, "wer", idx)
    ctrl = stats.effect([sync], [gtc], base, "wer", idx, controls=([sync], [sync]))
    assert ctrl.per_seed == pytest.approx(plain.per_seed)
    with pytest.raises(ValueError, match="one entry per cell"):
        stats.effect([gtc], [None], base, "wer", idx, controls=([sync, sync], [None]))


def test_a_margin_above_the_warm_starts_ceiling_is_not_testable(tmp_path) -> None:
    """Warm start at WER .22 against a baseline at .20: the ceiling is +10 points. A claim whose paper margin
    is 30 points that the data "exclude" reads "not testable by this design"; one with a 2-point margin keeps
    its verdict."""
    rows = {}
    for s in (0, 1, 2):
        base = _write(tmp_path / f"seed{s}" / "single", [10, 10], [50, 50])
        a = _write(tmp_path / f"seed{s}" / "a", [10, 10 + s % 2], [50, 50])
        b = _write(tmp_path / f"seed{s}" / "b", [10, 10 + (s + 1) % 2], [50, 50])
        _write(tmp_path / f"seed{s}" / "warm", [11, 11], [50, 50])
        rows[s] = [{"strategy": "single", "nodes": 1, "run_dir": str(base)},
                   {"strategy": "a", "nodes": 4, "run_dir": str(a)}, {"strategy": "b", "nodes": 4, "run_dir": str(b)}]
    claims = [Claim("{32}: a < b (big)", ("a", 0), (("b", 0),), 0.30),
              Claim("{32}: a < b (small)", ("a", 0), (("b", 0),), 0.02)]
    ev = analysis.analyse(rows, "test_seen", [4], ["a", "b"], claims=claims, resamples=200,
                          warm_starts={s: tmp_path / f"seed{s}" / "warm" for s in rows})
    assert ev["warm_start"]["ceiling"] == pytest.approx(0.10)
    big, small = ev["claims"]
    assert big["ceiling"] == pytest.approx(0.10) and not big["testable"]
    assert stats.EXCLUDES not in big["verdict"] and analysis.NOT_TESTABLE in big["verdict"]
    assert small["testable"] and analysis.NOT_TESTABLE not in small["verdict"]
    # recovery: the baseline recovers all of the warm start's excess, a run at the warm start's WER none
    assert ev["warm_start"]["recovery"]["single x1"] == pytest.approx(1.0)
    assert 0 < ev["warm_start"]["recovery"]["a x4"] < 1
    md = report.claims_table(ev["claims"])
    assert "design's ceiling" in md and "+10.0 pts" in md and analysis.NOT_TESTABLE in md


def test_claims_against_the_control_and_the_under_trained_flag(tmp_path) -> None:
    rows = {}
    for s in (0, 1):
        base = _write(tmp_path / f"seed{s}" / "single", [10, 10], [50, 50])             # .20
        sync = _write(tmp_path / f"seed{s}" / "sync", [14, 14 + s], [50, 50])           # ~.28-.29
        gtc = _write(tmp_path / f"seed{s}" / "gtc", [14, 14 + s], [50, 50])             # as sync
        _write(tmp_path / f"seed{s}" / "warm", [15, 15], [50, 50])                       # .30
        rows[s] = [{"strategy": "single", "nodes": 1, "run_dir": str(base)},
                   {"strategy": "sync", "nodes": 4, "run_dir": str(sync)},
                   {"strategy": "gtc", "nodes": 4, "run_dir": str(gtc)}]
    claims = [Claim("{32}: GTC below the baseline", ("gtc", 0), (("single", None),), None)]
    ev = analysis.analyse(rows, "test_seen", [4], ["sync", "gtc"], claims=claims, resamples=200, control="sync",
                          warm_starts={s: tmp_path / f"seed{s}" / "warm" for s in rows})
    # against the baseline GTC is ~40% worse; against sync at the same N it costs nothing
    assert ev["claims"][0]["mean"] < -0.3
    assert ev["claims_vs_control"][0]["per_seed"] == pytest.approx((0.0, 0.0))
    # sync recovers (30 - 28) / (30 - 20) = 20% and (30 - 29) / 10 = 10%: under half, flagged
    assert ev["warm_start"]["recovery"]["sync x4"] == pytest.approx(0.15)
    text = "\n".join(report.design_section(ev, [4]))
    assert "**Under-trained:** sync at 4 workers recovers 15%" in text and "ceiling" in text


def test_finished_seeds_are_pooled_and_peak_lr_reads_the_scaling(tmp_path) -> None:
    from asrbench.reproduce import finished_seeds, peak_lr

    for s in (0, 3):
        (tmp_path / f"seed{s}" / "single").mkdir(parents=True)
        (tmp_path / f"seed{s}" / "single" / "results.json").write_text("{}")
    (tmp_path / "seed7" / "single").mkdir(parents=True)       # started, never finished
    (tmp_path / "seedling").mkdir()
    assert finished_seeds(tmp_path) == [0, 3]
    cfg = {"nodes": 16, "strategy": {"name": "sync"},
           "optim": {"name": "adam", "lr": 0.0003, "lr_scaling": "sqrt"}}
    assert peak_lr(cfg) == pytest.approx(0.0012)
    assert peak_lr(cfg | {"optim": cfg["optim"] | {"lr_scaling": "linear"}}) == pytest.approx(0.0048)
    assert peak_lr({}) is None


def test_lr_search_table_marks_the_winner_at_each_n() -> None:
    md = report.lr_search_table({"nodes": {4: {"winner": 1, "candidates": [
        {"overrides": ["optim.lr_scaling=none"], "lr": 3e-4, "dev_wer": 0.3, "test_wer": 0.31, "steps": 100},
        {"overrides": ["optim.lr_scaling=sqrt"], "lr": 6e-4, "dev_wer": 0.28, "test_wer": 0.29, "steps": 100}]}}})
    lines = md.splitlines()
    assert "0.0006" in lines[3] and "**winner**" in lines[3] and "**winner**" not in lines[2]


def test_the_statistics_note_says_how_the_bootstrap_resamples_and_what_not_testable_means() -> None:
    note = report.statistics_note({"resamples": 1000, "bootstrap": "speaker-stratified"}, 3, [4, 8, 16])
    assert "1000 paired bootstrap resamples, drawn within each speaker (stats.bootstrap_indices(strata=)" in note
    assert "analyse(stratify=True)" in note and "4 / 8 / 16" in note and "the 3 claims tested" in note
    assert f"*{report.NOT_TESTABLE}* replaces *excludes* when the paper's margin lies above the design's ceiling" in note
    assert "the warm start's mean relative change against the baseline" in note
    old = report.statistics_note({"resamples": 200}, 1, [4])  # a reproduce.json from before the stratified bootstrap
    assert "drawn over all utterances" in old and "{" not in old


def test_a_diverged_search_candidate_is_not_eligible_and_all_diverged_stops_in_one_line(tmp_path) -> None:
    from asrbench import reproduce
    from asrbench.jobs import Job

    res = {"eval": {"dev": {"wer": 0.3}}, "wer": 0.31, "steps": 100, "wall_s": 5.0, "config": {},
           "elements_sent_per_step": 5, "elements_total_per_step": 100}
    job = Job("search gtc x4 #0", [], tmp_path / "gtc_0")
    rows = [reproduce.candidate_row(job, ["optim.lr=1"], None, "step 3: the loss of worker 0 is nan"),
            reproduce.candidate_row(job, ["optim.lr=0.1"], res, None)]
    assert rows[0]["eligible"] is False and rows[0]["reason"] == "diverged: step 3: the loss of worker 0 is nan"
    assert rows[1]["eligible"] is True and rows[1]["density"] == 0.05
    assert reproduce.pick_winner(rows) == 1 and reproduce.pick_winner(rows, max_density=0.01) == 1
    assert reproduce.pick_winner(rows[:1]) is None
    err = reproduce.no_winner("knob search of gtc x4", rows[:1])
    assert str(err) == ("every candidate of the knob search of gtc x4 diverged (1 runs; the first: step 3: the loss "
                        "of worker 0 is nan); give it smaller learning rates or more warm-up")
    table = report.search_table({"strategies": {"gtc": {"candidates": rows, "winner": 1, "max_density": None}}})
    assert "| gtc | `optim.lr=1` | diverged | - | - | - | not eligible (diverged) |" in table
    assert "| gtc | `optim.lr=0.1` | 30.0% | 31.0% | 5.0% | 100 | **winner** |" in table
    lr = report.lr_search_table({"nodes": {4: {"candidates": rows, "winner": 1}}})
    assert "| 4 | `optim.lr=1` | - | diverged | - | - | not eligible (diverged) |" in lr


def test_the_lr_search_skips_a_diverged_candidate_and_stops_when_every_one_diverges(tmp_path, monkeypatch) -> None:
    """lr_search_step over fake jobs: optim.lr=1e6 diverges (RunFailed, no results.json)."""
    from concurrent.futures import ThreadPoolExecutor

    from omegaconf import OmegaConf

    from asrbench import jobs, reproduce
    from asrbench.errors import RunFailed

    def train(conf_dir, overrides, run_dir, threads):
        over = dict(o.split("=", 1) for o in overrides)
        if over.get("optim.lr") == "1e6":
            raise RunFailed("the training loss is NaN or inf at step 2: the run diverged and was stopped")
        wer = 0.5 - float(over["optim.lr"])
        return {"eval": {"dev": {"wer": wer}}, "wer": wer, "steps": 10, "wall_s": 1.0, "config": {}}

    monkeypatch.setattr(jobs, "_train_job", train)
    monkeypatch.setattr(jobs, "ProcessPoolExecutor", lambda max_workers, mp_context: ThreadPoolExecutor(max_workers))

    def plan(candidates) -> reproduce.Plan:
        rc = OmegaConf.create({"nodes": [4], "search": None, "lr_search": {"candidates": candidates, "inherit": []}})
        return reproduce.Plan(rc=rc, out=tmp_path, runner=jobs.Runner("conf", parallel=1), seeds=[0], common=[],
                              logger="csv", warm=0, warm_dir={}, start={0: []}, rest=[], search_rest=[],
                              same_budget=True, control="sync", fer=None, fixed={"sync": []})

    p = plan([["optim.lr=1e6"], ["optim.lr=0.1"]])
    lr = reproduce.lr_search_step(p)
    first, second = json.loads((tmp_path / "lr_search" / "lr_search.json").read_text())["nodes"]["4"]["candidates"]
    assert lr["nodes"][4]["winner"] == 1 and p.lr_winners == {4: ["optim.lr=0.1"]}
    assert first["eligible"] is False and first["reason"].startswith("diverged: the training loss is NaN")
    assert first["dev_wer"] is None and second["eligible"] is True
    with pytest.raises(RunFailed, match=r"^every candidate of the learning-rate search of sync x4 diverged \(1 runs"):
        reproduce.lr_search_step(plan([["optim.lr=1e6"]]))


def test_the_baselines_lr_is_searched_first_and_becomes_every_later_runs_base(tmp_path, monkeypatch) -> None:
    """lr_search_step over fake jobs: the baseline's candidates run first at one worker; the winner's optim.lr
    goes to the control's candidates and the baselines (with its warm-up); GTC-BMUF takes sync's rule over its
    group; a winner at the end of three candidates is marked in the table."""
    from concurrent.futures import ThreadPoolExecutor

    from omegaconf import OmegaConf

    from asrbench import jobs, reproduce
    from asrbench.errors import ConfigError

    seen = []

    def train(conf_dir, overrides, run_dir, threads):
        over = dict(o.split("=", 1) for o in overrides)  # the last of a key wins, as in Hydra
        seen.append(over)
        lr, n = float(over["optim.lr"]), int(over["nodes"])
        wer = abs(lr * {"none": 1, "sqrt": n ** 0.5, "linear": n}[over.get("optim.lr_scaling", "none")] - 0.004)
        return {"eval": {"dev": {"wer": wer}, "test": {"wer": wer}}, "wer": wer, "steps": 10, "wall_s": 1.0,
                "config": {}}

    monkeypatch.setattr(jobs, "_train_job", train)
    monkeypatch.setattr(jobs, "ProcessPoolExecutor", lambda max_workers, mp_context: ThreadPoolExecutor(max_workers))
    rc = OmegaConf.create({"nodes": [4], "search": None, "lr_search": {
        "overrides": ["optim.warmup_steps=5"], "inherit": ["gtc"], "inherit_group": ["gtc_bmuf"],
        "base_candidates": [["optim.lr=0.0001"], ["optim.lr=0.0003"], ["optim.lr=0.001"]],
        "candidates": [["optim.lr_scaling=none"], ["optim.lr_scaling=sqrt"], ["optim.lr_scaling=linear"]]}})
    p = reproduce.Plan(rc=rc, out=tmp_path, runner=jobs.Runner("conf", parallel=1), seeds=[0, 1],
                       common=["optim.lr=0.0003"], logger="csv", warm=0, warm_dir={}, start={0: [], 1: []},
                       rest=["trainer.max_epochs=2"], search_rest=["trainer.max_epochs=1"], same_budget=False,
                       control="sync", fer=None, fixed={"sync": []})
    p.set_baselines()
    lr = reproduce.lr_search_step(p)
    # 0.001 at one worker (|0.001 - 0.004| is the least), then at 4 workers 0.001 x 4 = 0.004 (linear)
    assert lr["base"]["winner"] == 2 and lr["base"]["winner_overrides"] == ["optim.warmup_steps=5", "optim.lr=0.001"]
    assert [s["nodes"] for s in seen[:3]] == ["1", "1", "1"]  # the baseline's candidates ran first
    assert all(s["optim.lr"] == "0.001" for s in seen[3:]) and len(seen) == 3 + 3 + 2
    assert p.lr_winners == {4: ["optim.warmup_steps=5", "optim.lr_scaling=linear"]}
    assert [j.overrides[-2:] for j in p.baselines] == [["optim.warmup_steps=5", "optim.lr=0.001"]] * 2
    assert p.lr_at("gtc", 4) == p.lr_winners[4] and p.lr_at("bmuf", 4) == []
    assert p.lr_at("gtc_bmuf", 4) == ["optim.warmup_steps=5", "optim.lr_scaling=linear_group"]
    md = report.lr_search_table(lr)
    assert md.count("(at the grid's edge)") == 2 and "| 1 | `optim.warmup_steps=5 optim.lr=0.001` |" in md
    assert report.lr_edge_winners(lr) == ["1", "4"]
    saved = json.loads((tmp_path / "lr_search" / "lr_search.json").read_text())
    assert saved["runs"] == 6 and saved["inherit_group"] == ["gtc_bmuf"]
    # reusing the finished search sets the same base lr without training anything
    seen.clear()
    rc.lr_search.reuse = str(tmp_path)
    q = reproduce.Plan(rc=rc, out=tmp_path / "again", runner=jobs.Runner("conf", parallel=1), seeds=[0],
                       common=[], logger="csv", warm=0, warm_dir={}, start={0: []}, rest=[], search_rest=[],
                       same_budget=False, control="sync", fer=None, fixed={"sync": []})
    reproduce.lr_search_step(q)
    assert not seen and q.common == ["optim.lr=0.001"] and q.baselines[0].overrides[-2:] == lr["base"]["winner_overrides"]
    with pytest.raises(ConfigError, match=r"^reproduce.lr_search.base_candidates: \['optim.lr_scaling=sqrt'\] sets no"):
        reproduce.check_config(OmegaConf.create({"epochs": 2, "strategies": ["sync"], "control": "sync",
                                                 "lr_search": {"base_candidates": [["optim.lr_scaling=sqrt"]]}}))


def test_one_rule_gives_every_n_the_candidate_best_on_average(tmp_path, monkeypatch) -> None:
    """lr_search.select=one_rule over fake jobs: at 8 workers `none` is best by a hair, at 4 and 16 `sqrt`
    by more; each_n picks none at 8, one_rule sqrt at every N (the lowest mean dev WER); a candidate that
    diverged at any N is not eligible, and none finishing everywhere stops in one line."""
    from concurrent.futures import ThreadPoolExecutor

    from omegaconf import OmegaConf

    from asrbench import jobs, reproduce
    from asrbench.errors import ConfigError, RunFailed

    dev = {("none", "4"): 0.374, ("sqrt", "4"): 0.349, ("none", "8"): 0.372, ("sqrt", "8"): 0.379,
           ("none", "16"): 0.398, ("sqrt", "16"): 0.363}

    def train(conf_dir, overrides, run_dir, threads):
        over = dict(o.split("=", 1) for o in overrides)
        rule, n = over["optim.lr_scaling"], over["nodes"]
        if (rule, n) == ("linear", "16") or ((rule, n) == ("none", "4") and "none_left" in str(run_dir)):
            raise RunFailed("the training loss is NaN or inf at step 2: the run diverged and was stopped")
        wer = 0.30 if rule == "linear" else dev[rule, n]  # linear: best where it finished, but not at 16
        return {"eval": {"dev": {"wer": wer}}, "wer": wer, "steps": 10, "wall_s": 1.0, "config": {}}

    monkeypatch.setattr(jobs, "_train_job", train)
    monkeypatch.setattr(jobs, "ProcessPoolExecutor", lambda max_workers, mp_context: ThreadPoolExecutor(max_workers))

    def plan(select, out, candidates=("none", "sqrt", "linear")) -> reproduce.Plan:
        rc = OmegaConf.create({"nodes": [4, 8, 16], "search": None, "lr_search": {
            "select": select, "inherit": [], "candidates": [[f"optim.lr_scaling={c}"] for c in candidates]}})
        return reproduce.Plan(rc=rc, out=tmp_path / out, runner=jobs.Runner("conf", parallel=1), seeds=[0],
                              common=[], logger="csv", warm=0, warm_dir={}, start={0: []}, rest=[], search_rest=[],
                              same_budget=True, control="sync", fer=None, fixed={"sync": []})

    each = plan("each_n", "each")
    reproduce.lr_search_step(each)
    assert each.lr_winners == {4: ["optim.lr_scaling=linear"], 8: ["optim.lr_scaling=linear"],
                               16: ["optim.lr_scaling=sqrt"]}
    one = plan("one_rule", "one")
    lr = reproduce.lr_search_step(one)
    assert one.lr_winners == {n: ["optim.lr_scaling=sqrt"] for n in (4, 8, 16)}
    assert lr["select"] == "one_rule" and lr["one_rule"]["winner"] == 1
    assert lr["one_rule"]["mean_dev_wer"][2] is None  # linear diverged at 16
    assert lr["one_rule"]["mean_dev_wer"][1] == pytest.approx((0.349 + 0.379 + 0.363) / 3)
    saved = json.loads((tmp_path / "one" / "lr_search" / "lr_search.json").read_text())
    assert saved["nodes"]["8"]["winner"] == 1 and saved["select"] == "one_rule"
    assert one.reused_paths[("sync", 8, 0)] == tmp_path / "one" / "lr_search" / "sync_n8_1"
    with pytest.raises(RunFailed, match=r"^reproduce.lr_search.select=one_rule: no candidate finished at every"):
        reproduce.lr_search_step(plan("one_rule", "none_left", candidates=("none", "linear")))
    with pytest.raises(ConfigError, match=r"^reproduce.lr_search.select=pooled is unknown; use each_n"):
        reproduce.check_config(OmegaConf.create({"epochs": 2, "strategies": ["sync"], "control": "sync",
                                                 "lr_search": {"select": "pooled"}}))
