"""From finished runs to evidence: each cell's effect against the baseline, strategies against each
other, and the paper's claims, every one a paired CI over seeds with test-set noise (asrbench.stats).

Inputs are the runs of one experiment (asrbench reproduce): for every seed a baseline and the
(strategy, workers) cells, all continuing that seed's warm start and scored on the same utterances
of one split, whose per-utterance error counts each run wrote to ``hyps/<split>.scores.json``.
"""
from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from asrbench import stats, strategies
from asrbench.paper import CLAIMS, Claim

Cell = tuple[str, int]
BASELINE: Cell = (strategies.BASELINE, 1)
# every rate a run scores per utterance (hyps/<split>.scores.json), each judged by the same paired machinery:
# word, character and frame error, sentence error, and the WER's substitutions, deletions and insertions
# (each per reference word, so they add up to the WER); claims are decided on one (claim_metric)
METRICS = ("wer", "cer", "fer", "ser", "sub", "del", "ins")


def load_scores(run_dir: str | Path, split: str) -> stats.Scores | None:
    """A run's per-utterance error counts on `split`; None when the run wrote none."""
    path = Path(run_dir) / "hyps" / f"{split}.scores.json"
    return stats.Scores.from_table(json.loads(path.read_text())) if path.is_file() else None


def by_cell(rows_by_seed: Mapping[int, Sequence[Mapping]], split: str) -> dict[Cell, dict[int, stats.Scores]]:
    """{(strategy, workers): {seed: Scores}} for every run that has scores on `split`."""
    out: dict[Cell, dict[int, stats.Scores]] = {}
    for seed, rows in rows_by_seed.items():
        for r in rows:
            sc = load_scores(r["run_dir"], split)
            if sc is not None:
                out.setdefault((r["strategy"], int(r["nodes"])), {})[int(seed)] = sc
    ids = {sc.ids for cell in out.values() for sc in cell.values()}
    if len(ids) > 1:
        raise ValueError(f"the runs scored different utterances of {split}; a paired comparison needs the same ones")
    return out


def analyse(rows_by_seed: Mapping[int, Sequence[Mapping]], split: str, nodes: Sequence[int],
            strategies: Sequence[str], claim_metric: str = "wer", claims: Sequence[Claim] = CLAIMS,
            resamples: int = 1000, boot_seed: int = 0, alpha: float = stats.ALPHA,
            mde_target: float = 0.02, control: str | None = None,
            warm_starts: Mapping[int, str | Path] | None = None, stratify: bool = True) -> dict[str, Any]:
    """Cells against the baseline, strategy pairs at each worker count, and the claims judged with
    Holm's correction over the claims (one family for "differs from 0", one for "differs from the
    paper's margin"). Effects are relative error changes (0.02 = 2 points); positive means the
    first-named side is better. Per claim, the seeds its MDE would need to reach `mde_target` on
    this test set (stats.seeds_for: a projection from the measured spreads).

    `control` (e.g. sync SGD) is a strategy run at every worker count: the claims are judged a
    second time with every cell read against the control at its own N (``claims_vs_control``), which
    separates what a strategy costs from what N-times-larger steps cost. `warm_starts` (seed -> the
    run dir every run of that seed continued from) gives the design's ceiling: a run that never left
    its warm start scores the warm start's relative change, so no claim can show a larger margin, and
    a paper margin above it is "not testable by this design" (never "excluded"); and each cell's
    recovery, the fraction of the baseline's improvement over the warm start it achieved."""
    cells = by_cell(rows_by_seed, split)
    if BASELINE not in cells:
        raise ValueError(f"no baseline run has scores on {split}")
    base = cells[BASELINE]
    some = next(iter(base.values()))
    # the rates every run scored; a relative change against a baseline rate of 0 is undefined (no insertions)
    metrics = [m for m in METRICS if all(m in sc.errors for c in cells.values() for sc in c.values())
               and (m == claim_metric or all(sc.rate(m) > 0 for sc in base.values()))]
    # the same resample for every run; within speakers, the test set's main correlation (stats.bootstrap_indices)
    index = stats.bootstrap_indices(len(some.ids), resamples, seed=boot_seed,
                                    strata=stats.speakers(some.ids) if stratify else None)
    out: dict[str, Any] = {"split": split, "utterances": len(some.ids), "metrics": metrics, "resamples": resamples,
                           "seeds": sorted(base), "words": int(some.counts["wer"].sum()), "alpha": alpha}
    out["bootstrap"] = "speaker-stratified" if stratify else "utterance"

    # 1. every cell against the baseline: rel(cell) - 0, positive = worse than one worker
    out["cells"] = []
    for cell in sorted(cells, key=lambda c: (c != BASELINE, c[1], c[0])):
        if cell == BASELINE:
            continue
        row: dict[str, Any] = {"strategy": cell[0], "nodes": cell[1]}
        for m in metrics:
            row[m] = stats.effect([None], [cells[cell]], base, m, index).as_dict()
            row[f"{m}_abs"] = float(np.mean([cells[cell][s].rate(m) for s in cells[cell]]))
        out["cells"].append(row)
    out["baseline"] = {m: float(np.mean([sc.rate(m) for sc in base.values()])) for m in metrics}
    out["baseline_per_seed"] = {m: {int(s): float(sc.rate(m)) for s, sc in base.items()} for m in metrics}
    # every run's summed errors and counts per metric, so that the report can be recomputed from reproduce.json
    out["errors_per_seed"] = {("single x1" if c == BASELINE else f"{c[0]} x{c[1]}"):
                              {int(s): {m: [float(sc.errors[m].sum()), float(sc.counts[m].sum())] for m in metrics}
                               for s, sc in runs.items()} for c, runs in cells.items()}

    # 2. strategies against each other at each worker count: rel(b) - rel(a), positive = a better
    out["pairs"] = strategy_pairs(cells, base, index, nodes, strategies, metrics, alpha)

    # 3. the design's room: the warm start's relative change (the ceiling) and each cell's recovery
    warm = {int(s): sc for s, d in (warm_starts or {}).items()
            if int(s) in base and (sc := load_scores(d, split)) is not None}
    ceiling = None
    if warm and claim_metric in metrics:
        out["warm_start"] = warm_start_summary(warm, base, cells, metrics, claim_metric)
        ceiling = out["warm_start"]["ceiling"]
        recovery = out["warm_start"]["recovery"]
        for row in out["cells"]:
            row["recovery"] = recovery.get(f"{row['strategy']} x{row['nodes']}")

    # 4. the paper's claims on `claim_metric`, against the baseline and (with a control) against it at each N
    out["claims"] = judge_claims(claims, cells, base, index, claim_metric, nodes, alpha, mde_target, ceiling=ceiling)
    out["control"] = control
    if control and any(c[0] == control for c in cells):
        ctrl_mean = {c[1]: float(np.mean([stats.relative(cells[c][s], base[s], claim_metric) for s in cells[c]]))
                     for c in cells if c[0] == control}
        out["claims_vs_control"] = judge_claims(claims, cells, base, index, claim_metric, nodes, alpha, mde_target,
                                                control=control, ceiling=ceiling, control_mean=ctrl_mean)
    return out


def strategy_pairs(cells: Mapping[Cell, Mapping[int, stats.Scores]], base: Mapping[int, stats.Scores],
                   index: np.ndarray, nodes: Sequence[int], strategies: Sequence[str], metrics: Sequence[str],
                   alpha: float = stats.ALPHA) -> list[dict]:
    """Every pair of strategies at each worker count that has both: rel(b) - rel(a) per metric (positive:
    a is more accurate), with Holm's adjusted p over all pairs of one metric."""
    pairs = []
    for n in nodes:
        for a, b in itertools.combinations(strategies, 2):
            if (a, n) in cells and (b, n) in cells:
                row = {"nodes": int(n), "a": a, "b": b}
                for m in metrics:
                    row[m] = stats.effect([cells[(a, n)]], [cells[(b, n)]], base, m, index).as_dict()
                pairs.append(row)
    for m in metrics:
        adj = stats.holm([p[m]["p"] for p in pairs], alpha)
        for p, q in zip(pairs, adj):
            p[m]["p_holm"] = q
    return pairs


def warm_start_summary(warm: Mapping[int, stats.Scores], base: Mapping[int, stats.Scores],
                       cells: Mapping[Cell, Mapping[int, stats.Scores]], metrics: Sequence[str],
                       claim_metric: str) -> dict[str, Any]:
    """Per seed, the warm start's rates and its relative change against the baseline (the design's
    ceiling on `claim_metric`: mean over seeds), and per cell the recovery, (rate(warm start) -
    rate(cell)) / (rate(warm start) - rate(baseline)), mean over seeds: 1 is the baseline's whole
    improvement over the shared start, 0 a run that learnt nothing after it."""
    seeds = sorted(warm)
    per_seed = {s: {m: float(warm[s].rate(m)) for m in metrics if m in warm[s].errors} for s in seeds}
    rel = {s: float(stats.relative(warm[s], base[s], claim_metric)) for s in seeds}
    recovery: dict[str, float] = {}
    for (strategy, n), runs in cells.items():
        vals = []
        for s in seeds:
            if s in runs:
                gained = warm[s].rate(claim_metric) - base[s].rate(claim_metric)
                if gained > 0:
                    vals.append((warm[s].rate(claim_metric) - runs[s].rate(claim_metric)) / gained)
        label = "single x1" if (strategy, n) == BASELINE else f"{strategy} x{n}"
        recovery[label] = float(np.mean(vals)) if vals else math.nan
    return {"seeds": seeds, "rates": per_seed, "rel": rel, "metric": claim_metric,
            "ceiling": float(np.mean(list(rel.values()))), "recovery": recovery}


NOT_TESTABLE = "not testable by this design"


def judge_claims(claims: Sequence[Claim], cells: Mapping[Cell, Mapping[int, stats.Scores]],
                 base: Mapping[int, stats.Scores], index: np.ndarray, metric: str, nodes: Sequence[int],
                 alpha: float = stats.ALPHA, mde_target: float = 0.02, control: str | None = None,
                 ceiling: float | None = None, control_mean: Mapping[int, float] | None = None) -> list[dict]:
    """Each claim's paired difference, Holm-adjusted p-values (two families: against 0 and against the
    paper's margin), MDE, seed projection and verdict. With `control`, every cell is read against the
    control strategy at its own worker count (the baseline in a claim then stands for the control
    itself). A paper margin above the design's ceiling (the warm start's relative change, less the
    control's own change at the claim's largest N when read against the control) cannot be excluded:
    that verdict reads "not testable by this design"."""
    judged = []
    for c in claims:
        text = c.describe(nodes)
        lower, higher = c.cells(nodes) or (None, ())
        need = [x for x in (lower, *higher) if x is not None and x != BASELINE]
        if control:
            need += [(control, x[1]) for x in need]
        if lower is None or any(x not in cells for x in need):
            judged.append({"claim": text, "paper": c.paper_text(), "metric": metric, "verdict": "not measured"})
            continue
        side = [None if lower == BASELINE else cells[lower]]
        others = [None if h == BASELINE else cells[h] for h in higher]
        controls = None
        if control:
            def ctrl(x: Cell):
                return None if x == BASELINE else cells[(control, x[1])]
            controls = ([ctrl(lower)], [ctrl(h) for h in higher])
        res = stats.effect(side, others, base, metric, index, reference=c.margin, controls=controls)
        room = ceiling
        if room is not None and control:
            room -= max(control_mean[x[1]] for x in (lower, *higher) if x != BASELINE)
        judged.append({"claim": text, "paper": c.paper_text(), "paper_margin": c.margin, "metric": metric,
                       "ceiling": room} | res.as_dict())
    measured = [j for j in judged if j.get("verdict") != "not measured"]
    for key, adj_key in (("p", "p_holm"), ("p_ref", "p_ref_holm")):
        adj = stats.holm([j[key] for j in measured], alpha)
        for j, q in zip(measured, adj):
            j[adj_key] = q
    for j in measured:
        j["verdict"] = stats.verdict(j["mean"], j["p_holm"], j["p_ref_holm"], alpha)
        margin, room = j.get("paper_margin"), j.get("ceiling")
        j["testable"] = margin is None or room is None or not margin > room
        if not j["testable"] and stats.EXCLUDES in j["verdict"]:
            j["verdict"] = (NOT_TESTABLE if j["verdict"] == stats.EXCLUDES
                            else j["verdict"].replace(stats.EXCLUDES, f"the paper's margin {NOT_TESTABLE}"))
        j["mde_holm"] = stats.mde(j["se"], j["n"], j["df"], alpha / max(len(measured), 1))
        j["mde_target"] = mde_target
        j["seeds_for_mde"] = stats.seeds_for(mde_target, j["sd_seeds"], j["se_boot"], alpha)
        j["seeds_for_mde_holm"] = stats.seeds_for(mde_target, j["sd_seeds"], j["se_boot"],
                                                  alpha / max(len(measured), 1))
        j["mde_floor"] = stats.mde_floor(j["se_boot"], alpha)
        j["mde_floor_holm"] = stats.mde_floor(j["se_boot"], alpha / max(len(measured), 1))
    return judged


def mean_sd(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of the finite values; NaN where undefined."""
    vals = np.array([float(v) for v in values if v is not None and math.isfinite(float(v))])
    if not len(vals):
        return math.nan, math.nan
    return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else math.nan


def cell_means(rows_by_seed: Mapping[int, Sequence[Mapping]]) -> list[dict]:
    """Per (strategy, workers): mean and sd over seeds of what each run reports (error rates on the
    first test split, predicted speedup, steps, bytes), and how many runs ended on a plateau."""
    cells: dict[Cell, list[Mapping]] = {}
    for rows in rows_by_seed.values():
        for r in rows:
            cells.setdefault((r["strategy"], int(r["nodes"])), []).append(r)
    out = []
    for (strategy, nodes), rs in cells.items():
        row: dict[str, Any] = {"strategy": strategy, "nodes": nodes, "seeds": sorted(int(r["seed"]) for r in rs),
                               "plateaus": sum(bool((r.get("plateau") or {}).get("plateau")) for r in rs)}
        for key in ("wer", "cer", "fer", "rel_wer", "rel_cer", "rel_fer", "predicted_speedup", "steps",
                    "bytes_sent_per_worker_per_step", "dev_wer", "predicted_step_s", "projected_train_s",
                    "time_to_target_s"):
            row[key], row[f"{key}_sd"] = mean_sd([r.get(key) for r in rs])
        row["reached_target"] = sum(r.get("time_to_target_s") is not None for r in rs)  # time_to_target_s: of these
        out.append(row)
    order = strategies.names()
    return sorted(out, key=lambda r: (order.index(r["strategy"]) if r["strategy"] in order else len(order),
                                      r["nodes"]))
