"""The Markdown tables of asrbench's reports: runs against the baseline, per split and speaker, the
reproduce report's evidence (cells, pairs, claims), searches, runs, speed and the errors by kind."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from asrbench import strategies
from asrbench.paper import PAPER_NODES, paper_rel_wer_text, paper_value

if TYPE_CHECKING:
    import numpy as np

    from asrbench import stats


def _fmt(v, pct: bool = False, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if pct:
        return f"{v * 100:+.1f}%" if signed else f"{v * 100:.1f}%"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _num(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _ci(d: Mapping | None, scale: float = 100.0, signed: bool = True) -> str:
    """'+2.1 [+0.4, +3.8]' from a stats.Paired dict (points of relative error)."""
    if not d or d.get("mean") is None or math.isnan(d["mean"]):
        return "-"
    f = "{:+.1f}" if signed else "{:.1f}"
    if d.get("low") is None or math.isnan(d["low"]):
        return f.format(d["mean"] * scale)
    return f"{f.format(d['mean'] * scale)} [{f.format(d['low'] * scale)}, {f.format(d['high'] * scale)}]"


def _p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _pct_pm(mean: float, sd: float, signed: bool = True) -> str:
    if math.isnan(mean):
        return "-"
    text = f"{mean * 100:+.1f}" if signed else f"{mean * 100:.1f}"
    return text + ("" if math.isnan(sd) else f" ± {sd * 100:.1f}") + "%"


def _mde(j: Mapping) -> str:
    """A claim's MDE at α 0.05 / at Holm's level; "-" where it is undefined (one seed: no seed spread)."""
    mde, holm = j.get("mde"), j.get("mde_holm")
    if mde is None or holm is None or not (math.isfinite(mde) and math.isfinite(holm)):
        return "-"
    return f"{mde * 100:.1f} / {holm * 100:.1f} pts"


def _seeds(n: float | None, floor: float | None, target: float) -> str:
    """A stats.seeds_for projection: a count; "> 100"; "none: test set" when the test set's noise alone
    keeps the MDE above the target at any number of seeds (`floor`, stats.mde_floor); "-" when unknown."""
    if n is None or math.isnan(n):
        return "-"
    if math.isfinite(n):
        return f"{int(n)}"
    return "none: test set" if floor is not None and floor >= target else "> 100"


COLUMNS = (("strategy", "strategy", {}), ("nodes", "workers", {}), ("wer", "WER", {"pct": True}),
           ("rel_wer", "rel. WER", {"pct": True, "signed": True}), ("cer", "CER", {"pct": True}),
           ("fer", "FER", {"pct": True}), ("rel_fer", "rel. FER", {"pct": True, "signed": True}),
           ("steps", "steps", {}), ("train_frames_per_s", "frames/s", {}),
           ("bytes_sent_per_worker_per_step", "bytes sent/worker/step", {}),
           ("compression_ratio", "compression", {}), ("wall_s", "wall s", {}),
           ("projected_train_s", "projected training s", {}), ("time_to_target_s", "time to target s", {}))


OPTIONAL_COLUMNS = ("projected_train_s", "time_to_target_s")  # only runs on the simulated cluster have them


def markdown_table(rows: Sequence[Mapping]) -> str:
    columns = [c for c in COLUMNS if c[0] not in OPTIONAL_COLUMNS or any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), **kw) for k, _, kw in columns) + " |")
    return "\n".join(lines)


def per_split_table(results: Mapping) -> str:
    lines = ["| split | WER | CER | FER | utterances |", "|---|---|---|---|---|"]
    for split, m in (results.get("eval") or {}).items():
        lines.append(f"| {split} | {_fmt(m.get('wer'), pct=True)} | {_fmt(m.get('cer'), pct=True)} | "
                     f"{_fmt(m.get('fer'), pct=True)} | {m.get('utterances')} |")
    return "\n".join(lines)


def per_speaker_table(results: Mapping) -> str:
    """WER/CER of every speaker of every evaluated split (empty when the results have none)."""
    lines = ["| split | speaker | WER | CER | utterances |", "|---|---|---|---|---|"]
    for split, m in (results.get("eval") or {}).items():
        for speaker, s in (m.get("speakers") or {}).items():
            lines.append(f"| {split} | {speaker} | {_fmt(s.get('wer'), pct=True)} | {_fmt(s.get('cer'), pct=True)} | "
                         f"{s.get('utterances')} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def strategies_table(cells: Sequence[Mapping], effect: Mapping[tuple[str, int], Mapping]) -> str:
    """Every strategy and worker count on one line: relative WER on the scored split with its paired
    CI, bytes per step, projected speedup, projected training time and time to target."""
    lines = ["| strategy | workers | rel. WER [95% CI] | bytes sent/worker/step | projected speedup | "
             "projected training time (s) | time to target (s), runs that reached it | plateaus |",
             "|" + "---|" * 8]
    for c in cells:
        e = effect.get((c["strategy"], int(c["nodes"])))
        rel = "baseline" if e is None else _ci(e)
        tt = _num(c.get("time_to_target_s"))
        lines.append(f"| {c['strategy']} | {c['nodes']} | {rel} | {_num(c.get('bytes_sent_per_worker_per_step'))} | "
                     f"{_num(c.get('predicted_speedup'))}x | {_num(c.get('projected_train_s'))} | "
                     f"{tt} ({c.get('reached_target', 0)} of {len(c.get('seeds') or [])}) | "
                     f"{c.get('plateaus', 0)} of {len(c.get('seeds') or [])} |")
    return "\n".join(lines)


def speedup_errors(rows: Sequence[Mapping]) -> tuple[list[dict], float]:
    """Relative error of each predicted speedup against the paper's, and their median."""
    out = []
    for r in rows:
        paper_s = paper_value(r["strategy"], r["nodes"], "speedup")
        if paper_s and r.get("predicted_speedup"):
            out.append({"strategy": r["strategy"], "nodes": r["nodes"], "ours": r["predicted_speedup"],
                        "paper": paper_s, "rel_error": (r["predicted_speedup"] - paper_s) / paper_s})
    errs = sorted(abs(e["rel_error"]) for e in out)
    median = errs[len(errs) // 2] if len(errs) % 2 else (sum(errs[len(errs) // 2 - 1:len(errs) // 2 + 1]) / 2 if errs else math.nan)
    return out, median


def comparison_table(rows: Sequence[Mapping]) -> str:
    """Speed and communication of each run: the predicted speedup under the network preset (the paper's
    beside it at the same worker count), steps, bytes and GTC's density; accuracy has its own tables."""
    head = ("| strategy | workers | speedup (ours) | speedup (paper) | steps | bytes sent/worker/step "
            "| compression | density (elements sent) |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        s, n = r["strategy"], r["nodes"]
        paper_s = paper_value(s, n, "speedup")
        entry = strategies.registry().get(s)
        density = r.get("density") if entry is not None and entry.compresses else None  # BMUF sends the model dense
        lines.append(
            f"| {s} | {n} | {_num(r.get('predicted_speedup'))}x | {_num(paper_s)}{'x' if paper_s else ''} | "
            f"{r.get('steps')} | {_num(r.get('bytes_sent_per_worker_per_step'))} | "
            f"{_num(r.get('compression_ratio'))} | {'-' if density is None else f'{density * 100:.1f}%'} |")
    return "\n".join(lines)


def projection_table(proj: Sequence[Mapping]) -> str:
    lines = ["| strategy | workers | step (s) | of which comm (s) | largest comm part | speedup (projected) "
             "| speedup (paper) | rel. error |", "|" + "---|" * 8]
    for p in proj:
        paper_s = paper_value(p["strategy"], p["nodes"], "speedup")
        part = max(p["comm_parts"].items(), key=lambda kv: kv[1], default=("-", 0.0))
        err = f"{(p['predicted_speedup'] - paper_s) / paper_s * 100:+.0f}%" if paper_s else "-"
        lines.append(f"| {p['strategy']} | {p['nodes']} | {p['step_s']:.3f} | {p['comm_s']:.3f} | "
                     f"{part[0]} ({part[1]:.3f} s) | {p['predicted_speedup']:.1f}x | "
                     f"{_num(paper_s)}{'x' if paper_s else ''} | {err} |")
    return "\n".join(lines)


def search_table(search: Mapping) -> str:
    lines = ["| strategy | candidate overrides | dev WER | test WER | density | steps | |", "|" + "---|" * 7]
    for s, v in (search.get("strategies") or {}).items():
        for i, c in enumerate(v["candidates"]):
            dens = "-" if c.get("density") is None else f"{c['density'] * 100:.1f}%"
            if c.get("over_density_cap"):
                dens += f" (over the cap of {v['max_density'] * 100:g}%)"
            lines.append(f"| {s} | `{' '.join(c['overrides']) or '(defaults)'}` | {_candidate(c, i == v['winner'], dens)} |")
    return "\n".join(lines)


def _lr_searches(lr_search: Mapping) -> list[tuple[Any, Mapping]]:
    """(workers, search) of every lr search: the baseline's at 1 worker first, then the control's at each N."""
    base = lr_search.get("base")
    return ([(1, base)] if base else []) + list((lr_search.get("nodes") or {}).items())


def _at_edge(search: Mapping) -> bool:
    """The winner is the first or last of three or more candidates (listed low to high)."""
    return len(search["candidates"]) >= 3 and search["winner"] in (0, len(search["candidates"]) - 1)


def lr_search_table(lr_search: Mapping) -> str:
    """The learning-rate candidates, the baseline's (1 worker) first, then the control's at each worker
    count: dev WER, the peak lr, the winner. A winner at either end of its candidates (more than two, in
    the order the preset lists them, low to high) is marked: the best lr may lie beyond the grid."""
    lines = ["| workers | candidate overrides | peak lr | dev WER | test WER | steps | |", "|" + "---|" * 7]
    for n, v in _lr_searches(lr_search):
        for i, c in enumerate(v["candidates"]):
            lr = "-" if c.get("lr") is None else f"{c['lr']:.2g}"
            row = f"| {n} | `{' '.join(c['overrides'])}` | {lr} | {_candidate(c, i == v['winner'])} |"
            if i == v["winner"] and _at_edge(v):
                row = row[:-2] + " (at the grid's edge) |"
            lines.append(row)
    return "\n".join(lines)


def lr_edge_winners(lr_search: Mapping) -> list[str]:
    """The worker counts whose lr winner is at its grid's edge ("1" the baseline)."""
    return [str(n) for n, v in _lr_searches(lr_search) if _at_edge(v)]


def _candidate(c: Mapping, winner: bool, density: str | None = None) -> str:
    """A search candidate's cells: dev WER, test WER, its density (when given), steps and whether it won;
    a diverged one (no dev WER) reads 'diverged' and 'not eligible'."""
    dens = "" if density is None else f" {density} |"
    if c.get("dev_wer") is None:
        return f"diverged | - |{dens} - | not eligible (diverged)"
    return f"{c['dev_wer'] * 100:.1f}% | {c['test_wer'] * 100:.1f}% |{dens} {c['steps']:,} | {'**winner**' if winner else ''}"


def runs_table(rows: Sequence[Mapping], splits: Sequence[str]) -> str:
    """Every run: seed, steps, WER per split, and the plateau test of its dev-loss curve."""
    lines = ["| run | seed | steps | peak lr | BMUF blocks | dev WER | " + " | ".join(f"{s} WER" for s in splits)
             + f" | {splits[0]} WER from the warm start | dev loss: change over the last points [95% CI] | plateau |",
             "|" + "---|" * (9 + len(splits))]
    for r in rows:
        pl = r.get("plateau") or {}
        change = ("-" if pl.get("rel_change") is None or math.isnan(pl["rel_change"]) else
                  f"{pl['rel_change'] * 100:+.1f}% [{pl['low'] * 100:+.1f}, {pl['high'] * 100:+.1f}] "
                  f"({pl['points']} points, steps {pl['from_step']:,}-{pl['to_step']:,})")
        blocks = r.get("bmuf_blocks")
        lr = r.get("lr")
        moved = (r.get("from_warm_start") or {}).get(splits[0])
        lines.append(f"| {r['strategy']} x{r['nodes']} | {r['seed']} | {r['steps']:,} | "
                     f"{'-' if lr is None else f'{lr:.2g}'} | "
                     f"{'-' if blocks is None else f'{int(blocks):,}'} | {r['dev_wer'] * 100:.1f}% | "
                     + " | ".join(f"{r['eval'][s]['wer'] * 100:.1f}%" if s in r.get("eval", {}) else "-" for s in splits)
                     + f" | {'-' if moved is None else f'{moved * 100:+.1f} pts'}"
                     + f" | {change} | {'yes' if pl.get('plateau') else 'no'} ({pl.get('trend', '-')}) |")
    return "\n".join(lines)


def settings_table(settings: Sequence[tuple[str, Mapping]]) -> str:
    """Each claim's verdict and difference in this and other finished reproduce runs (compare_with)."""
    names = [n for n, _ in settings]
    claims = {n: {j["claim"]: j for j in r.get("claims", [])} for n, r in settings}
    order = list(dict.fromkeys(c for n in names for c in claims[n]))
    lines = ["| claim | " + " | ".join(names) + " |", "|" + "---|" * (1 + len(names))]
    for c in order:
        row = []
        for n in names:
            j = claims[n].get(c)
            if j is None or j.get("verdict") == "not measured":
                row.append("-")
            elif "low" in j:
                row.append(f"**{j['verdict']}** ({_ci(j)} pts)")
            else:  # an older reproduce.json: margin against the seed spread
                row.append(f"**{j['verdict']}** ({j['margin'] * 100:+.1f} pts, older rule)")
        lines.append(f"| {c} | " + " | ".join(row) + " |")
    return "\n".join(lines)


FER_NOTES = {
    "phones": " FER is the frame error of a phone probe, a linear classifier on the acoustic model's top layer "
              "trained beside it on a stopped gradient (it does not change the CTC model), against the "
              "synthesiser's exact phone timings: the same reference for every run and seed. The claims use WER, "
              "the paper's measure.",
    "alignment": " FER counts the frames whose most likely label differs from the CTC forced alignment made with "
                 "the same seed's warm start: it measures agreement with that model, so it favours runs that move "
                 "little from it and does not rank the strategies; the claims use WER only.",
}


SHOWN_METRICS = ("wer", "cer", "fer", "ser")  # the columns of the evidence tables, where a split scored them


EDIT_METRICS = ("sub", "del", "ins")  # the WER's edit kinds, per reference word: their own table


def _shown(ev: Mapping, metrics: Sequence[str] | None) -> list[str]:
    return [m for m in (metrics or SHOWN_METRICS) if m in ev["metrics"]]


def evidence_cells_table(ev: Mapping, nodes: Sequence[int], metrics: Sequence[str] | None = None,
                         paper: bool = True) -> str:
    """Every cell against the baseline on one split: absolute error rates and relative changes with
    their paired 95% CIs (of `metrics`, SHOWN_METRICS by default, those the split scored), beside the
    paper's relative WER at the same tier of workers (with `paper`)."""
    metrics = _shown(ev, metrics)
    head = ["strategy", "workers", *[f"{m.upper()}" for m in metrics],
            *[f"rel. {m.upper()} [95% CI]" for m in metrics], *(["paper (tier)"] if paper else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = ev["baseline"]
    lines.append("| single | 1 | " + " | ".join(f"{base[m] * 100:.1f}%" for m in metrics) + " | "
                 + " | ".join("0" for _ in metrics) + (" | - |" if paper else " |"))
    tier = {int(n): p for n, p in zip(nodes, PAPER_NODES)}
    for c in ev["cells"]:
        at = tier.get(int(c["nodes"]))
        paper_cell = ((f" {paper_rel_wer_text(c['strategy'], at)} (x{at}) |" if at else " - |") if paper else "")
        lines.append(f"| {c['strategy']} | {c['nodes']} | " + " | ".join(f"{c[f'{m}_abs'] * 100:.1f}%" for m in metrics)
                     + " | " + " | ".join(_ci(c[m]) for m in metrics) + " |" + paper_cell)
    return "\n".join(lines)


def pairs_table(ev: Mapping, metrics: Sequence[str] | None = None) -> str:
    """Strategies against each other at each worker count: rel(b) - rel(a) in points with the paired
    95% CI and Holm's adjusted p over all pairs; positive: a is more accurate."""
    metrics = _shown(ev, metrics)
    head = ["workers", "a vs b", *[f"{m.upper()}: b - a [95% CI]" for m in metrics], *[f"p {m.upper()} (Holm)" for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in ev["pairs"]:
        lines.append(f"| {p['nodes']} | {p['a']} vs {p['b']} | " + " | ".join(_ci(p[m]) for m in metrics) + " | "
                     + " | ".join(_p(p[m].get("p_holm")) for m in metrics) + " |")
    return "\n".join(lines)


def claims_table(claims: Sequence[Mapping]) -> str:
    """The paper's claims: our paired difference (higher side minus lower side, points of relative
    error: positive is the paper's order), its CI, Holm-adjusted p against 0 and against the paper's
    margin, the minimum detectable effect and the verdict."""
    target = next((j["mde_target"] for j in claims if j.get("mde_target") is not None), None)
    seeds_head = "" if target is None else f" seeds for an MDE of {target * 100:g} pts (α 0.05 / Holm) |"
    ceiling = any(j.get("ceiling") is not None for j in claims)
    ceiling_head = " design's ceiling |" if ceiling else ""
    lines = ["| claim | paper | metric | ours: difference [95% CI] | p vs 0 (Holm) | paper's margin |" + ceiling_head
             + " p vs margin (Holm) | MDE (α 0.05 / Holm) |" + seeds_head + " verdict |",
             "|" + "---|" * (9 + bool(seeds_head) + ceiling)]
    for j in claims:
        if j.get("verdict") == "not measured":
            lines.append(f"| {j['claim']} | {j['paper']} | {j.get('metric', '-').upper()} | - | - | - | "
                         + ("- | " if ceiling else "") + "- | - | " + ("- | " if seeds_head else "") + "not measured |")
            continue
        margin = j.get("paper_margin")
        seeds = (f" {_seeds(j.get('seeds_for_mde'), j.get('mde_floor'), target)} / "
                 f"{_seeds(j.get('seeds_for_mde_holm'), j.get('mde_floor_holm'), target)} |" if seeds_head else "")
        room = j.get("ceiling")
        room_cell = (f" {'-' if room is None else f'{room * 100:+.1f} pts'} |" if ceiling else "")
        lines.append(
            f"| {j['claim']} | {j['paper']} | {j['metric'].upper()} | {_ci(j)} pts | {_p(j.get('p_holm'))} | "
            f"{'-' if margin is None else f'{margin * 100:+.1f} pts'} |{room_cell} {_p(j.get('p_ref_holm'))} | "
            f"{_mde(j)} |{seeds} **{j['verdict']}** |")
    return "\n".join(lines)


def _mean_rate(runs: Mapping, metric: str, group: np.ndarray | None = None, groups: int = 1):
    """The mean over seeds of each run's rate of `metric` (stats.Scores), per group of utterances with
    `group` (a group number per utterance): NaN where a run lacks the metric or a group has no counts."""
    import numpy as np

    group = np.zeros(len(next(iter(runs.values())).ids), dtype=int) if group is None else group
    rates = []
    for sc in runs.values():
        if metric not in sc.errors:
            return np.full(groups, np.nan)
        e = np.bincount(group, weights=sc.errors[metric], minlength=groups)
        c = np.bincount(group, weights=sc.counts[metric], minlength=groups)
        rates.append(np.divide(e, c, out=np.full(groups, np.nan), where=c > 0))
    return np.mean(rates, axis=0)


def speaker_table(cells: Mapping[str, Mapping[int, stats.Scores]], metric: str = "wer") -> str:
    """Per speaker of the scored split: its utterances and reference words, and each cell's `metric`
    (WER by default; the mean over the cell's seeds of the rate on that speaker's utterances), one
    column per cell in the order given (the baseline first, then each strategy at each worker count,
    labelled by the caller: {"single x1": {seed: Scores}, "gtc x16": ...}); a last row for all
    speakers. The speaker is the utterance id's first `-` field (asrbench.stats.speakers). With few
    test speakers one hard voice can carry a cell's difference: this shows whether it does."""
    import numpy as np

    from asrbench.stats import speakers

    runs = [sc for c in cells.values() for sc in c.values()]
    if not runs:
        return ""
    ids = runs[0].ids
    assert all(sc.ids == ids for sc in runs), "the cells scored different utterances"
    names, group = np.unique(np.asarray(speakers(ids), dtype=object), return_inverse=True)
    utts = np.bincount(group, minlength=len(names))
    words = np.bincount(group, weights=runs[0].counts["wer"], minlength=len(names)).astype(int)
    per = {label: _mean_rate(c, metric, group, len(names)) for label, c in cells.items() if c}
    whole = {label: _mean_rate(c, metric)[0] for label, c in cells.items() if c}
    head = ["speaker", "utterances", "words", *[f"{label} {metric.upper()}" for label in per]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, name in enumerate(names):
        lines.append(f"| {name} | {utts[i]:,} | {words[i]:,} | "
                     + " | ".join(_fmt(float(r[i]), pct=True) for r in per.values()) + " |")
    lines.append(f"| all | {len(ids):,} | {int(words.sum()):,} | "
                 + " | ".join(_fmt(float(r), pct=True) for r in whole.values()) + " |")
    return "\n".join(lines)


def edit_kinds_table(cells: Mapping[str, Mapping[int, stats.Scores]]) -> str:
    """Per cell: WER and its substitutions, deletions and insertions (each per reference word, so they
    add up to the WER) and the sentence error rate, means over the cell's seeds. A run scored before
    these were written shows '-' for them."""
    head = ["cell", "seeds", "WER", "sub", "del", "ins", "SER"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, c in cells.items():
        if c:
            lines.append(f"| {label} | {len(c)} | "
                         + " | ".join(_fmt(float(_mean_rate(c, m)[0]), pct=True)
                                      for m in ("wer", "sub", "del", "ins", "ser")) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""
