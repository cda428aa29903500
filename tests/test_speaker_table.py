"""The reproduce report's per-speaker and edit-kind tables, and analyse's speaker-stratified bootstrap."""
from __future__ import annotations

import json
import math

import pytest

from asrbench import analysis, metrics, report, stats

IDS = ["300-1-0", "300-1-1", "302-2-0", "305-3-0"]
REFS = ["A B", "C D", "E F G", "H"]


def _run(hyps: list[str]) -> stats.Scores:
    return stats.Scores.from_table({"ids": IDS, **metrics.utterance_errors(REFS, hyps)})


def test_speaker_table_means_each_cells_per_speaker_wer_over_seeds() -> None:
    base = {0: _run(["A B", "C D", "E F G", "H"]), 1: _run(["A B", "C X", "E F G", "H"])}
    gtc = {0: _run(["A", "C D", "E X", ""]), 1: _run(["A B", "C D", "", "H"])}
    table = report.speaker_table({"single x1": base, "gtc x4": gtc})
    lines = table.splitlines()
    assert lines[0] == "| speaker | utterances | words | single x1 WER | gtc x4 WER |"
    # by hand: speaker 300 (4 words): base 0 and 1 edits -> 12.5%; gtc 1 and 0 -> 12.5%
    # 302 (3 words): base 0, 0; gtc 2 (sub + del) and 3 -> 83.3%; 305 (1 word): gtc 1 and 0 -> 50%
    assert lines[2] == "| 300 | 2 | 4 | 12.5% | 12.5% |"
    assert lines[3] == "| 302 | 1 | 3 | 0.0% | 83.3% |"
    assert lines[4] == "| 305 | 1 | 1 | 0.0% | 50.0% |"
    # all speakers: base 0/8 and 1/8; gtc 4/8 and 3/8
    assert lines[5] == "| all | 4 | 8 | 6.2% | 43.8% |"
    assert report.speaker_table({}) == ""


def test_edit_kinds_table_splits_the_wer_and_shows_old_runs_without_it() -> None:
    runs = {0: _run(["A", "C D X", "E Y G", "H"])}  # 1 deletion, 1 insertion, 1 substitution of 8 words
    old = {0: stats.Scores.from_table({"ids": IDS, "wer_errors": [1, 0, 0, 0], "wer_counts": [2, 2, 3, 1]})}
    lines = report.edit_kinds_table({"gtc x4": runs, "old x4": old}).splitlines()
    assert lines[0] == "| cell | seeds | WER | sub | del | ins | SER |"
    assert lines[2] == "| gtc x4 | 1 | 37.5% | 12.5% | 12.5% | 12.5% | 75.0% |"
    assert lines[3] == "| old x4 | 1 | 12.5% | - | - | - | - |"


def _write(tmp_path, name: str, sc_table: dict) -> str:
    d = tmp_path / name / "hyps"
    d.mkdir(parents=True)
    (d / "test_seen.scores.json").write_text(json.dumps(sc_table))
    return str(d.parent)


def test_analyse_resamples_within_speakers_unless_told_not_to(tmp_path) -> None:
    """Two speakers: the baseline errs on speaker 1 only, the cell on speaker 2 only; the per-speaker
    resample keeps both speakers' weights, so the cell's relative WER moves less than under the
    utterance resample, which redraws how much of each speaker a resample holds."""
    ids = [f"{1 + i // 10}-0-{i:02d}" for i in range(20)]
    counts = [5] * 20
    base = {"ids": ids, "wer_errors": [1] * 10 + [0] * 10, "wer_counts": counts}
    cell = {"ids": ids, "wer_errors": [0] * 10 + [1] * 10, "wer_counts": counts}
    rows = {s: [{"strategy": "single", "nodes": 1, "run_dir": _write(tmp_path, f"b{s}", base)},
                {"strategy": "gtc", "nodes": 4, "run_dir": _write(tmp_path, f"g{s}", cell)}] for s in (0, 1)}
    strat = analysis.analyse(rows, "test_seen", [4], ["gtc"], claims=(), resamples=300)
    plain = analysis.analyse(rows, "test_seen", [4], ["gtc"], claims=(), resamples=300, stratify=False)
    assert strat["bootstrap"] == "speaker-stratified" and plain["bootstrap"] == "utterance"
    s, p = strat["cells"][0]["wer"], plain["cells"][0]["wer"]
    assert s["mean"] == p["mean"] == pytest.approx(0.0)  # the same 10 errors in 100 words
    assert math.isclose(s["se_boot"], 0.0, abs_tol=1e-12) and p["se_boot"] > 0.1


def test_the_reproduce_report_has_the_edit_kinds_ser_and_speaker_tables(tmp_path) -> None:
    """errors_section reads every run's scores: the edit kinds with SER, their CIs, one column per cell per speaker."""
    def table(hyps: list[str]) -> dict:
        return {"ids": IDS, **metrics.utterance_errors(REFS, hyps)}

    rows = {s: [{"strategy": "single", "nodes": 1,
                 "run_dir": _write(tmp_path, f"b{s}", table(["A X", "C", "E F G H", "Y"]))},
                {"strategy": "gtc", "nodes": 4, "run_dir": _write(tmp_path, f"g{s}", table(["A", "C D X", "E Y G", ""]))}]
            for s in (0, 1)}
    ev = analysis.analyse(rows, "test_seen", [4], ["gtc"], claims=(), resamples=50)
    assert ev["metrics"] == ["wer", "cer", "ser", "sub", "del", "ins"]
    result = {"rows_by_seed": rows, "cells": [{"strategy": "single", "nodes": 1}, {"strategy": "gtc", "nodes": 4}],
              "evidence": {"test_seen": ev}}
    text = "\n".join(report.errors_section(result, "test_seen", [4]))
    assert "| cell | seeds | WER | sub | del | ins | SER |" in text
    assert "| gtc x4 | 2 | 50.0% | 12.5% | 25.0% | 12.5% | 100.0% |" in text
    assert "| strategy | workers | SUB | DEL | INS | rel. SUB [95% CI] | rel. DEL [95% CI] | rel. INS [95% CI] |" in text
    assert "| speaker | utterances | words | single x1 WER | gtc x4 WER |" in text
    cells = report.evidence_cells_table(ev, [4]).splitlines()[0]
    assert cells.startswith("| strategy | workers | WER | CER | SER | rel. WER [95% CI]") and "SUB" not in cells
