"""The command line end to end on a tiny synthetic corpus: prepare, train (CTC and CE), align, eval."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

pytestmark = pytest.mark.slow  # every test here runs the command line, most of them training

ROOT = Path(__file__).resolve().parents[1]
RESULT_KEYS = {"strategy", "nodes", "fer", "wer", "cer", "train_frames_per_s", "wall_s", "steps",
               "bytes_sent_per_worker_per_step", "config", "git_commit", "versions", "seed", "eval"}


def asrbench(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    env.pop("ASRBENCH_COMMAND", None)
    proc = subprocess.run([sys.executable, "-m", "asrbench.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"asrbench {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "synth_tiny"
    asrbench("prepare", "data=synth_tiny", f"data.root={root}", f"hydra.run.dir={root.parent}/prepare")
    return root


TINY = ("model=lstm_tiny", "batch_size=4", "eval_batch_size=16", "optim.lr=0.004")


@pytest.fixture(scope="module")
def ctc_run(corpus) -> Path:
    run = corpus.parent / "ctc"
    asrbench("train", "data=synth_tiny", f"data.root={corpus}", *TINY, "logger=csv", "trainer.max_epochs=6",
             "trainer.log_every_n_steps=1", f"hydra.run.dir={run}")
    return run


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_usage_and_help():
    proc = asrbench(check=False)
    assert proc.returncode == 2 and "commands:" in proc.stderr
    assert "strategy" in asrbench("train", "--help").stdout
    cfg = asrbench("train", "--cfg", "job", "nodes=4", "strategy=gtc_bmuf", "trainer.max_steps=7").stdout
    assert "nodes: 4" in cfg and "max_steps: 7" in cfg and "group_size" in cfg


def test_config_errors_are_one_line(tmp_path):
    proc = asrbench("train", "strategy=single", "nodes=2", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: strategy=single") and "Traceback" not in proc.stderr
    proc = asrbench("train", "data=librispeech", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "data.root" in proc.stderr and "Traceback" not in proc.stderr
    proc = asrbench("eval", f"run={tmp_path}", check=False)
    assert proc.returncode == 2 and "results.json" in proc.stderr


def test_ctc_training_learns_and_writes_results(ctc_run, corpus):
    results = json.loads((ctc_run / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["strategy"] == "single" and results["nodes"] == 1
    assert results["bytes_sent_per_worker_per_step"] == 0
    assert results["config"]["model"]["name"] == "lstm_tiny"
    assert set(results["eval"]) == {"dev", "test", "test_seen"}
    loss = losses(ctc_run)
    assert len(loss) >= 10 and sum(loss[-3:]) / 3 < 0.8 * sum(loss[:3]) / 3
    # by hand: 24 training utterances (3 speakers x 8) in batches of 4, 6 epochs
    assert results["steps"] == 36
    assert torch.load(ctc_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 36
    # the hypotheses are those of the corpus's 8 test utterances (its transcripts), and they are what was scored
    refs = dict(line.split(" ", 1) for trans in sorted((corpus / "test").glob("*/*/*.trans.txt"))
                for line in trans.read_text().splitlines())
    hyps = dict(line.split(" ", 1) for line in (ctc_run / "hyps" / "test.txt").read_text().splitlines())
    assert len(refs) == 8 and list(hyps) == sorted(refs)
    errors = sum(word_edits(refs[u].split(), hyps[u].split()) for u in refs)
    assert results["eval"]["test"]["wer"] == pytest.approx(errors / sum(len(r.split()) for r in refs.values()))


def word_edits(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words (substitutions, deletions, insertions), by the textbook recurrence."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def test_align_eval_and_ce_training(ctc_run, corpus):
    asrbench("align", f"run={ctc_run}")
    ali = ctc_run / "align"
    assert {p.name for p in ali.glob("*.ali")} == {"train.ali", "dev.ali", "test.ali", "test_seen.ali"}
    summary = json.loads((ali / "align.json").read_text())
    assert summary["subsets"]["train"]["words_checked"] > 0
    # train.ali: a line per aligned training utterance, its id and one label per stacked frame; by hand from the
    # audio's samples, 1 + (samples - 400) // 160 fbank frames (25 ms / 10 ms), stacked 3 and kept every 3rd
    samples = {p.stem: sf.info(p).frames for p in (corpus / "train").glob("*/*/*.flac")}
    labels = dict(line.split(" ", 1) for line in (ali / "train.ali").read_text().splitlines())
    assert len(samples) == 24 and set(labels) <= set(samples)
    assert len(labels) == summary["subsets"]["train"]["aligned"] == 24 - summary["subsets"]["train"]["too_short"]
    for utt, frames in labels.items():
        assert len(frames.split()) == (1 + (samples[utt] - 400) // 160 - 3) // 3 + 1, utt

    ce = corpus.parent / "ce"
    asrbench("train", "data=synth_tiny", f"data.root={corpus}", f"data.alignments={ali}", "criterion=ce",
             *TINY, "logger=csv", "trainer.max_epochs=4", "trainer.log_every_n_steps=1", f"hydra.run.dir={ce}")
    base = json.loads((ce / "results.json").read_text())
    assert base["criterion"] == "ce" and base["fer"] is not None
    loss = losses(ce)
    assert loss[-1] < 0.8 * loss[0]

    # the CTC run against another run (the CE one), so the relative changes are not 0 by construction
    # (both tiny models may still decode nothing, WER 1.0; their frame error rates differ)
    out = asrbench("eval", f"run={ctc_run}", f"baseline={ce}", f"data.alignments={ali}").stdout
    res = json.loads((ctc_run / "eval" / "results.json").read_text())
    assert res["fer"] is not None and 0 <= res["fer"] <= 1 and res["fer"] != base["fer"]
    assert res["rel_wer"] == pytest.approx((res["wer"] - base["wer"]) / base["wer"])
    assert res["rel_fer"] == pytest.approx((res["fer"] - base["fer"]) / base["fer"])
    assert "rel. WER" in out and (ctc_run / "eval" / "curves.png").stat().st_size > 1000
    speakers = res["eval"]["test"]["speakers"]
    assert sum(s["utterances"] for s in speakers.values()) == res["eval"]["test"]["utterances"]
    assert "per speaker" in (ctc_run / "eval" / "report.md").read_text()


def test_reproduce_tiny_writes_report_and_plots(tmp_path):
    out = tmp_path / "rep"
    asrbench("reproduce", "reproduce=tiny", "run_logger=csv", f"hydra.run.dir={out}", timeout=900)
    md = (out / "report.md").read_text()
    search = json.loads((out / "search" / "search.json").read_text())
    assert [len(search["strategies"][s]["candidates"]) for s in ("gtc", "bmuf", "gtc_bmuf")] == [2, 1, 1]
    tau = search["strategies"]["gtc"]["winner_overrides"]
    assert search["strategies"]["gtc_bmuf"]["winner_overrides"][:1] == tau  # inherited from GTC's winner
    # sync's lr searched at each N (2 candidates each), its winner the seed-0 sync cell; GTC inherits it
    lr_search = json.loads((out / "lr_search" / "lr_search.json").read_text())
    assert sorted(lr_search["nodes"]) == ["4", "8"] and lr_search["inherit"] == ["gtc"]
    assert all(len(v["candidates"]) == 2 for v in lr_search["nodes"].values())
    # ... after the baseline's at one worker (2 candidates), whose optim.lr every later run takes; its winner is
    # seed 0's baseline; GTC-BMUF takes sync's rule over its group
    base = lr_search["base"]
    assert len(base["candidates"]) == 2 and lr_search["inherit_group"] == ["gtc_bmuf"]
    base_lr = float(base["winner_overrides"][-1].split("=")[1])
    assert not (out / "seed0" / "single").exists() and (out / "seed1" / "single" / "results.json").is_file()
    for seed in (0, 1):
        assert (out / f"seed{seed}" / "warm_start" / "results.json").is_file()
        for strategy in ("sync", "gtc", "bmuf", "gtc_bmuf"):
            for nodes in (4, 8):
                run = out / f"seed{seed}" / f"{strategy}_n{nodes}"
                if seed == 0 and (nodes == 4 or strategy == "sync"):  # a search's winner is this cell's run
                    assert not run.exists()
                    continue
                res = json.loads((run / "results.json").read_text())
                assert res["simulated"] is True and res["predicted_speedup"] > 1 and res["fer"] is not None
                assert res["config"]["init_from"].endswith(f"seed{seed}/warm_start")
                # FER of the phone probe against the synthesiser's timings
                assert res["config"]["data"]["phone_labels"] is True and res["config"]["data"]["alignments"] is None
                assert res["config"]["optim"]["lr"] == base_lr
                won = lr_search["nodes"][str(nodes)]["winner_overrides"][-1].split("=")[1]
                if strategy == "gtc":  # sync's winning lr at the same N
                    assert res["config"]["optim"]["lr_scaling"] == won
                if strategy == "gtc_bmuf":  # its rule over the group
                    assert res["config"]["optim"]["lr_scaling"] == (won if won == "none" else f"{won}_group")
    for strategy in ("sync", "gtc", "bmuf", "gtc_bmuf"):
        for nodes in (4, 8):
            assert re.search(rf"\| {strategy} \| {nodes} \| [0-9.]+% \|.*\[[-+0-9.]+, [-+0-9.]+\]", md)
    # the claims again against sync at the same N, the design's ceiling from each seed's warm start, the lr search
    assert "### The same claims against sync at the same worker count" in md and "design's ceiling" in md
    assert "## What the design can show" in md and "## The learning-rate search (sync)" in md
    assert "peak lr" in md and "WER from the warm start" in md
    assert "## The paper's claims (test_seen" in md and md.count("| trend: ") == 8  # 4 trends in each claims table
    assert "## The knob search" in md and "**winner**" in md
    assert "## Projected to the paper's scale (lstm_paper, 22.0M parameters)" in md
    for png in ("tradeoff.png", "learning_curves.png", "speedup.png", "rel_wer.png", "bytes.png"):
        assert (out / png).stat().st_size > 1000
    summary = json.loads((out / "reproduce.json").read_text())
    assert summary["baseline"]["strategy"] == "single" and len(summary["claims"]) == 11
    claims = {c["claim"]: c for c in summary["claims"]}
    assert claims["trend: GTC collapses at 128 (worse than at 64) (the paper's workers; tier not run)"]["verdict"] == "not measured"
    # one claim recomputed from every run's own WER (jiwer, results.json), seed by seed
    c = claims["4: GTC < BMUF"]
    rel = {(r["strategy"], r["nodes"], r["seed"]): r["eval"]["test_seen"]["fer"]  # reproduce=tiny's claim metric
           for rows in summary["rows_by_seed"].values() for r in rows}
    diffs = [(rel["bmuf", 4, s] - rel["gtc", 4, s]) / rel["single", 1, s] for s in (0, 1)]
    assert c["per_seed"] == pytest.approx(diffs) and c["mean"] == pytest.approx(sum(diffs) / 2)
    assert c["low"] < c["mean"] < c["high"]
    # every measured claim's verdict by the rule, from its own Holm-adjusted p-values (alpha 0.05): a difference
    # shown against 0 agrees (positive) or disagrees; else the paper's margin rejected excludes its effect
    measured = [j for j in summary["claims"] if j["verdict"] != "not measured"]
    for j in measured:
        assert j["p"] <= j["p_holm"] <= min(1.0, len(measured) * j["p"])  # Holm: at most m times p, never less
        ref_out = j["p_ref_holm"] is not None and j["p_ref_holm"] < 0.05  # (NaN compares False)
        if j["p_holm"] < 0.05:
            expected = "disagrees" if j["mean"] <= 0 else "agrees; excludes the paper's effect" if ref_out else "agrees"
        else:
            expected = "excludes the paper's effect" if ref_out else "inconclusive"
        if not j["testable"]:  # a paper margin above the design's ceiling (the warm start's) is never excluded
            assert j["paper_margin"] > j["ceiling"]
            expected = {"excludes the paper's effect": "not testable by this design",
                        "agrees; excludes the paper's effect":
                            "agrees; the paper's margin not testable by this design"}.get(expected, expected)
        assert j["verdict"] == expected, j
    # each measured claim projects the seeds its MDE needs for 2 points (stats.seeds_for), shown in the table
    assert all({"seeds_for_mde", "seeds_for_mde_holm", "mde_floor"} <= j.keys() for j in measured)
    assert "seeds for an MDE of 2 pts (α 0.05 / Holm)" in md
    # every run's plateau test: judged on its last 3 dev points (tiny's plateau_points), or marked too short
    plateaus = [r["plateau"] for rows in summary["rows_by_seed"].values() for r in rows]
    assert all(p["trend"] in ("flat", "rising", "falling", "too few points") for p in plateaus)
    assert all((p["trend"] == "too few points") == (p["points"] < 3) for p in plateaus)
    # started again, every finished run is reused and the table is the same
    again = asrbench("reproduce", "reproduce=tiny", "run_logger=csv", f"hydra.run.dir={out}", timeout=120)
    assert "finished before, reused" in again.stderr + again.stdout

    def claims_section(text: str) -> str:
        return text.split("## The paper's claims")[1].split("## The knob search")[0]

    assert claims_section((out / "report.md").read_text()) == claims_section(md)
    # the setup line says what the invocation itself trained: everything the first time, nothing the second
    runs = summary["runs"]
    assert summary["invocations"][-1]["trained"] == runs and f"{runs} runs whose own wall times" in md
    assert "and trained every one of them." in md
    assert json.loads((out / "reproduce.json").read_text())["invocations"][-1]["trained"] == 0
    assert f"and trained 0 of them; the other {runs} an earlier invocation had finished" in (out / "report.md").read_text()
    # ... and names the invocation that trained them
    first, second = json.loads((out / "reproduce.json").read_text())["invocations"]
    assert first["trained"] == runs and second["trained"] == 0 and first["wall_s"] == summary["wall_s"]
    assert (f"Earlier invocation in this directory: {first['wall_s'] / 60:.1f} min at commit "
            f"{str(first['git_commit'])[:7]} ({runs} runs trained).") in (out / "report.md").read_text()
    # one seed of the same runs (all reused): the report says its CIs are the test set's alone, and no "± nan"
    asrbench("reproduce", "reproduce=tiny", "run_logger=csv", "reproduce.seeds=[0]", "reproduce.pool_seeds=false",
             f"hydra.run.dir={out}", timeout=120)
    one = (out / "report.md").read_text()
    assert "**One seed:** every CI and p-value here holds the test set's noise alone" in one
    assert "WER" in one and "words, one seed)" in one and "nan%" not in one and "; 1 seed)" in one
    assert "nan" not in one.split("## The paper's claims")[1].split("**One seed:**")[0]  # no MDE without a spread
    assert one.count("Earlier invocation in this directory:") == 1  # re-renders that trained nothing are not listed
    # seeds accumulate: an invocation naming seed 0 alone pools seed 1, which an earlier one finished here
    asrbench("reproduce", "reproduce=tiny", "run_logger=csv", "reproduce.seeds=[0]", f"hydra.run.dir={out}", timeout=120)
    pooled = json.loads((out / "reproduce.json").read_text())
    assert pooled["seeds"] == [0, 1] and pooled["claims"] == json.loads(json.dumps(summary["claims"]))
    # every claim's CI recomputed from what reproduce.json keeps: its per-seed differences, se_boot and df
    from scipy import stats as sps
    for j in (c for c in pooled["claims"] if c["verdict"] != "not measured"):
        d = np.array(j["per_seed"])
        se = np.sqrt(d.var(ddof=1) / len(d) + j["se_boot"] ** 2)
        half = sps.t.ppf(0.975, j["df"]) * se if np.isfinite(j["df"]) else sps.norm.ppf(0.975) * se
        assert (j["low"], j["high"]) == pytest.approx((d.mean() - half, d.mean() + half))
    assert set(pooled["evidence"]["test_seen"]["errors_per_seed"]) >= {"single x1", "sync x4", "gtc_bmuf x8"}


def test_every_command_of_the_one_registry_runs_a_hydra_app():
    from asrbench import apps, cli

    for name, (what, function) in cli.COMMANDS.items():
        app = getattr(apps, function)
        assert callable(app) and what, name
        assert app.__module__ == "asrbench.apps"
