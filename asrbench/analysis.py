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
METRICS = ("wer", "cer", "fer")


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
            mde_target: float = 0.02, stratify: bool = True) -> dict[str, Any]:
    """Cells against the baseline, strategy pairs at each worker count, and the claims judged with
    Holm's correction over the claims (one family for "differs from 0", one for "differs from the
    paper's margin"). Effects are relative error changes (0.02 = 2 points); positive means the
    first-named side is better. Per claim, the seeds its MDE would need to reach `mde_target` on
    this test set (stats.seeds_for: a projection from the measured spreads)."""
    cells = by_cell(rows_by_seed, split)
    if BASELINE not in cells:
        raise ValueError(f"no baseline run has scores on {split}")
    base = cells[BASELINE]
    some = next(iter(base.values()))
    metrics = [m for m in METRICS if all(m in sc.errors for c in cells.values() for sc in c.values())]
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

    # 2. strategies against each other at each worker count: rel(b) - rel(a), positive = a better
    out["pairs"] = []
    for n in nodes:
        for a, b in itertools.combinations(strategies, 2):
            if (a, n) in cells and (b, n) in cells:
                row = {"nodes": int(n), "a": a, "b": b}
                for m in metrics:
                    row[m] = stats.effect([cells[(a, n)]], [cells[(b, n)]], base, m, index).as_dict()
                out["pairs"].append(row)
    for m in metrics:  # Holm over all pairwise comparisons of one metric
        adj = stats.holm([p[m]["p"] for p in out["pairs"]], alpha)
        for p, q in zip(out["pairs"], adj):
            p[m]["p_holm"] = q

    # 3. the paper's claims on `claim_metric`
    judged = []
    for c in claims:
        text = c.describe(nodes)
        lower, higher = c.cells(nodes) or (None, ())
        need = [x for x in (lower, *higher) if x != BASELINE]
        if lower is None or any(x not in cells for x in need):
            judged.append({"claim": text, "paper": c.paper_text(), "metric": claim_metric, "verdict": "not measured"})
            continue
        side = [None if lower == BASELINE else cells[lower]]
        others = [None if h == BASELINE else cells[h] for h in higher]
        res = stats.effect(side, others, base, claim_metric, index, reference=c.margin)
        judged.append({"claim": text, "paper": c.paper_text(), "paper_margin": c.margin, "metric": claim_metric}
                      | res.as_dict())
    measured = [j for j in judged if j.get("verdict") != "not measured"]
    for key, adj_key in (("p", "p_holm"), ("p_ref", "p_ref_holm")):
        adj = stats.holm([j[key] for j in measured], alpha)
        for j, q in zip(measured, adj):
            j[adj_key] = q
    for j in measured:
        j["verdict"] = stats.verdict(j["mean"], j["p_holm"], j["p_ref_holm"], alpha)
        j["mde_holm"] = stats.mde(j["se"], j["n"], j["df"], alpha / max(len(measured), 1))
        j["mde_target"] = mde_target
        j["seeds_for_mde"] = stats.seeds_for(mde_target, j["sd_seeds"], j["se_boot"], alpha)
        j["seeds_for_mde_holm"] = stats.seeds_for(mde_target, j["sd_seeds"], j["se_boot"],
                                                  alpha / max(len(measured), 1))
        j["mde_floor"] = stats.mde_floor(j["se_boot"], alpha)
        j["mde_floor_holm"] = stats.mde_floor(j["se_boot"], alpha / max(len(measured), 1))
    out["claims"] = judged
    return out


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
