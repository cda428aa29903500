"""Reports: a Markdown table of runs against the single-worker baseline, and learning curves.

The tables live in report_tables, the figures in report_plots, a run's history (curves, time to
target, Pareto front) in report_history and `asrbench reproduce`'s report.md in report_reproduce;
their names are importable from here as well.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from asrbench.errors import ConfigError
from asrbench.metrics import relative_change
from asrbench.report_history import add_time_to_target, dev_curve, pareto_front, read_history, time_to_target
from asrbench.report_plots import (plot_curves, plot_learning_curves, plot_pareto, plot_reproduce_tradeoff,
                                   plot_scaling, plot_tradeoff)
from asrbench.report_reproduce import (BOOTSTRAP_NOTES, NOT_TESTABLE, STATISTICS_NOTE, design_section, errors_section,
                                       statistics_note, write_reproduce)
from asrbench.report_tables import (COLUMNS, EDIT_METRICS, FER_NOTES, OPTIONAL_COLUMNS, SHOWN_METRICS, claims_table,
                                    comparison_table, edit_kinds_table, evidence_cells_table, lr_edge_winners, lr_search_table,
                                    markdown_table, pairs_table, per_speaker_table, per_split_table, projection_table,
                                    runs_table, search_table, settings_table, speaker_table, speedup_errors,
                                    strategies_table)

__all__ = [  # what other code imports from asrbench.report
    "load_results", "with_relative", "rows_and_histories", "write_report",
    "add_time_to_target", "dev_curve", "pareto_front", "read_history", "time_to_target",
    "plot_curves", "plot_learning_curves", "plot_pareto", "plot_reproduce_tradeoff", "plot_scaling", "plot_tradeoff",
    "BOOTSTRAP_NOTES", "NOT_TESTABLE", "STATISTICS_NOTE", "design_section", "errors_section", "statistics_note",
    "write_reproduce",
    "COLUMNS", "EDIT_METRICS", "FER_NOTES", "OPTIONAL_COLUMNS", "SHOWN_METRICS", "claims_table", "comparison_table",
    "edit_kinds_table", "evidence_cells_table", "lr_edge_winners", "lr_search_table", "markdown_table", "pairs_table",
    "per_speaker_table", "per_split_table", "projection_table", "runs_table", "search_table", "settings_table",
    "speaker_table", "speedup_errors", "strategies_table",
]


def load_results(run_dir: Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no results.json; point run=/baseline= at a finished `asrbench train` run dir")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg}); re-run `asrbench eval` on that run") from None


def with_relative(results: dict, baseline: dict | None) -> dict:
    """Adds `rel_wer`, `rel_fer`, `rel_cer` (the paper's relative change) when a baseline is given."""
    out = dict(results)
    if baseline:
        for key in ("wer", "cer", "fer"):
            out[f"rel_{key}"] = relative_change(results.get(key), baseline.get(key))
    return out


def rows_and_histories(runs: Sequence[tuple[Path, Mapping]], baseline: tuple[Path, Mapping] | None = None,
                       show_baseline: bool = False, within: float = 0.05) -> tuple[list[dict], dict[str, list[dict]]]:
    """The rows of a report over finished runs ((run dir, results) each), relative to `baseline`
    (with the time to come within `within` of its final dev WER), and their learning curves by
    label; `show_baseline` puts the baseline's own row first."""
    rows: list[dict] = []
    histories: dict[str, list[dict]] = {}
    base = baseline[1] if baseline else None
    runs = [*([baseline] if baseline and show_baseline else []), *runs]
    for i, (path, res) in enumerate(runs):
        row = with_relative(dict(res), base)
        history = read_history(path)
        add_time_to_target(row, history, base, within)
        rows.append(row)
        label = f"{row['strategy']} x{row['nodes']}" + (" (baseline)" if baseline and show_baseline and i == 0 else "")
        histories[label] = history
    return rows, histories


def write_report(out_dir: Path, rows: Sequence[Mapping], histories: Mapping[str, list[dict]],
                 title: str = "asrbench report", intro: str = "") -> Path:
    """report.md in `out_dir`: the headline table first, then curves.png (every run's training
    loss against step and wall time, dev WER at every validation) and tradeoff.png (relative WER
    against bytes and time per step), then per-split and per-speaker tables; returns its path."""
    out_dir = Path(out_dir)
    curves = plot_curves(histories, out_dir / "curves.png")
    tradeoff = plot_tradeoff(rows, out_dir / "tradeoff.png") if len(rows) > 1 else None
    pareto = plot_pareto([r | {"label": f"{r['strategy']} x{r['nodes']}"} for r in rows], out_dir / "pareto.png")
    parts = [f"# {title}", ""] + ([intro, ""] if intro else []) + [markdown_table(rows), ""]
    if curves:
        parts += ["![learning curves](curves.png)", ""]
    if tradeoff:
        parts += ["![accuracy against communication and time per step](tradeoff.png)", ""]
    if pareto:
        parts += ["Time to target: the projected time (the cost model's step time x steps) until a run's dev WER "
                  "first comes within 5% of the baseline's final dev WER.", "",
                  "![accuracy against bytes and projected training time, with the Pareto front](pareto.png)", ""]
    for r in rows:
        parts += [f"## {r.get('strategy')} x{r.get('nodes')}: per split", "", per_split_table(r), ""]
    for r in rows:
        speakers = per_speaker_table(r)
        if speakers:
            parts += [f"### {r.get('strategy')} x{r.get('nodes')}: per speaker", "", speakers, ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts))
    return path
