"""`asrbench reproduce`'s report.md: the setup, the paper's claims with their statistics, what the design
can show, every cell and pair of strategies, where the errors are, the searches, every run, the speed
and the projection to the paper's scale, and the figures."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from asrbench.report_plots import plot_learning_curves, plot_pareto, plot_reproduce_tradeoff, plot_scaling
from asrbench.report_tables import (EDIT_METRICS, FER_NOTES, claims_table, comparison_table, edit_kinds_table,
                                    evidence_cells_table, lr_edge_winners, lr_search_table, pairs_table, projection_table,
                                    runs_table, search_table, settings_table, speaker_table, speedup_errors, strategies_table)


NOT_TESTABLE = "not testable by this design"


STATISTICS_NOTE = (
    "How to read the numbers. Every effect is a relative error change, (rate - baseline rate) / baseline "
    "rate, in points (+2.0 = 2% worse than one worker). Each seed has one warm start from which its "
    "baseline and every distributed run continue, and every run is scored on the same utterances, so a "
    "comparison is paired twice: the difference is taken seed by seed, and the test set's own noise is "
    "the spread of the mean difference when the utterances are resampled with replacement, the same "
    "resample for every run ({resamples} paired bootstrap resamples{bootstrap}). The 95% CI is a t interval on "
    "sqrt(s_d^2 / n + se_boot^2) with Welch-Satterthwaite degrees of freedom (asrbench/stats.py). A "
    "claim's difference is the higher side minus the lower side, so a positive value is the paper's "
    "order. Its verdict uses Holm's correction over the {claims} claims tested: *agrees* / *disagrees* "
    "when the difference is non-zero after correction, *excludes the paper's effect* when it is not, but "
    "the paper's margin is rejected after correction (a second Holm family), *inconclusive* otherwise; "
    "*not testable by this design* replaces *excludes* when the paper's margin lies above the design's "
    "ceiling, the warm start's mean relative change against the baseline: a run that learnt nothing after "
    "the shared start would score that change, so no run can show a larger margin and the data cannot "
    "exclude one. "
    "The MDE is the smallest true difference the claim's test finds with 80% power: at a = 0.05, and at "
    "the strictest Holm level (0.05 / {claims}). The seeds column projects, from each claim's measured seed "
    "spread and test-set noise, how many seeds its MDE would need to reach the target on this test set "
    "(stats.seeds_for); *none: test set* means the test set's noise alone keeps the MDE above it at any "
    "number of seeds, so a larger test set is the lever. The paper's margins were measured at 32 / 64 / 128 "
    "workers; here each claim is restated at this experiment's worker counts {nodes}, the same tiers "
    "smallest to largest.")


def statistics_note(ev: Mapping, tested: int, nodes: Sequence[int]) -> str:
    """STATISTICS_NOTE for one split's evidence: its resamples and how they were drawn, the claims tested."""
    return STATISTICS_NOTE.format(resamples=ev["resamples"], claims=tested, nodes=" / ".join(map(str, nodes)),
                                  bootstrap=BOOTSTRAP_NOTES.get(ev.get("bootstrap", "utterance"), ""))


BOOTSTRAP_NOTES = {  # analysis.analyse's "bootstrap": how the utterances were resampled
    "speaker-stratified": ", drawn within each speaker (stats.bootstrap_indices(strata=), the default "
                          "analyse(stratify=True)): every speaker keeps its weight in every resample, so the "
                          "interval reads 'on these speakers', not on a new set of them",
    "utterance": ", drawn over all utterances (analyse(stratify=False))",
}


def design_section(ev: Mapping, nodes: Sequence[int], metric: str = "wer") -> list[str]:
    """What the design leaves room for: each seed's warm start (the shared start every run of the seed
    continues from) against its baseline, the ceiling that makes, each cell's recovery of the baseline's
    improvement over the warm start, and a flag when the control at the largest N recovers under half."""
    ws = ev.get("warm_start")
    if not ws:
        return []
    m = ws["metric"]
    base = ev["baseline_per_seed"][m]
    lines = [f"| seed | warm start {m.upper()} | baseline {m.upper()} | warm start vs baseline (relative) |",
             "|---|---|---|---|"]
    for s in ws["seeds"]:
        rate = ws["rates"][s if s in ws["rates"] else str(s)][m]
        b = base[s] if s in base else base[str(s)]
        rel = ws["rel"][s if s in ws["rel"] else str(s)]
        lines.append(f"| {s} | {rate * 100:.1f}% | {b * 100:.1f}% | {rel * 100:+.1f} pts |")
    rec = ws["recovery"]
    rec_lines = ["| cell | recovery of the baseline's improvement (mean over seeds) |", "|---|---|"]
    rec_lines += [f"| {k} | {'-' if v is None or math.isnan(v) else f'{v:.0%}'} |" for k, v in rec.items()]
    parts = ["## What the design can show", "",
             f"Every run of a seed continues from that seed's warm start. A run that learnt nothing after it would "
             f"score the warm start's relative change, so no claim can show a larger margin than that: the "
             f"design's **ceiling** is {ws['ceiling'] * 100:+.1f} points of relative {m.upper()} (mean over "
             f"seeds), and a paper margin above it is *{NOT_TESTABLE}*, never excluded.", "", "\n".join(lines), "",
             "Recovery: (rate(warm start) - rate(run)) / (rate(warm start) - rate(baseline)), the share of the "
             "baseline's own improvement over the shared start that a run achieved (1 = all of it).", "",
             "\n".join(rec_lines), ""]
    control = ev.get("control")
    if control:
        top = max(int(n) for n in nodes)
        r = rec.get(f"{control} x{top}")
        if r is not None and not math.isnan(r) and r < 0.5:
            parts += [f"**Under-trained:** {control} at {top} workers recovers {r:.0%} of the baseline's "
                      f"improvement, under half: at that N the comparison measures fewer, larger steps more than "
                      f"the strategies; read the claims against {control} below.", ""]
    return parts


def errors_section(result: Mapping, split: str, nodes: Sequence[int]) -> list[str]:
    """Where the errors are on the scored split: each cell's WER split into substitutions, deletions
    and insertions with its SER, their relative changes against the baseline with paired CIs, and
    each speaker's WER per cell (read from every run's per-utterance scores)."""
    from asrbench import analysis  # numpy and scipy: loaded only for a reproduce report

    scores = analysis.by_cell(result["rows_by_seed"], split)
    order = [analysis.BASELINE, *((c["strategy"], int(c["nodes"])) for c in result["cells"])]
    cells = {("single x1" if c == analysis.BASELINE else f"{c[0]} x{c[1]}"): scores[c]
             for c in dict.fromkeys(order) if c in scores}
    if not cells:
        return []
    ev = result["evidence"][split]
    parts = [f"## Where the errors are: {split}", "",
             "Each cell's WER split by kind of word edit (substitutions, deletions, insertions, each per "
             "reference word, so they add up to the WER) and its sentence error rate (SER: the share of "
             "utterances with any error), means over seeds.", "", edit_kinds_table(cells), ""]
    if any(m in ev["metrics"] for m in EDIT_METRICS):
        parts += ["Each edit kind's relative change against the same seed's baseline, with its paired 95% CI.", "",
                  evidence_cells_table(ev, nodes, EDIT_METRICS, paper=False), ""]
    parts += [f"### Per speaker: {split}", "",
              "WER on each speaker's utterances, mean over seeds: with few test speakers one hard voice can carry "
              "a cell's difference, and the bootstrap resamples within speakers.", "", speaker_table(cells), ""]
    return parts


def write_reproduce(out_dir: Path, result: Mapping, network: str, projection: Mapping | None, setup: str,
                    others: Sequence[tuple[str, Mapping]] = (), name: str = "this run") -> Path:
    """report.md (setup, claims with their statistics, effects per cell and per pair of strategies on
    every scored split, where the errors are, search, runs with their plateau tests, speed) and its plots."""
    from asrbench.cluster import trust  # imports omegaconf, which report's other users need not load

    out_dir = Path(out_dir)
    split = result["split"]
    # the figures show the split the claims are decided on: its relative WER and paired CI per cell
    effect = {(c["strategy"], int(c["nodes"])): c["wer"] for c in result["evidence"][split]["cells"]}
    scored = [c | {"rel_wer": effect[k]["mean"], "rel_wer_low": effect[k]["low"], "rel_wer_high": effect[k]["high"]}
              for c in result["cells"] if (k := (c["strategy"], int(c["nodes"]))) in effect]
    pareto = plot_pareto([c | {"label": f"{c['strategy']} x{c['nodes']}"} for c in scored], out_dir / "pareto.png",
                         f"{split}: mean over seeds, paired 95% CI; projected on the {network} network")
    projected = {(p["strategy"], p["nodes"]): p["predicted_speedup"] for p in (projection or {}).get("rows", [])}
    plots = [plot_reproduce_tradeoff(scored, projected, out_dir), plot_learning_curves(result["histories"], out_dir),
             *plot_scaling(scored, out_dir)]
    parts = ["# asrbench reproduce", "", setup, "", *claims_sections(result),
             *strategies_section(result, effect, network, pareto), *evidence_sections(result),
             *errors_section(result, split, result["nodes"])]
    if others:
        parts += ["## Beside other settings", "",
                  "Each claim's verdict in this run and in the other finished reproduce runs named by "
                  "`reproduce.compare_with`.", "", settings_table([(name, result), *others]), ""]
    parts += [*search_sections(result), *runs_and_speed_sections(result), *projection_section(projection, network),
              trust.report_section(result["first_seed_rows"], (projection or {}).get("rows", [])), "",
              *[f"![{p.stem}]({p.name})" for p in plots]]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def claims_sections(result: Mapping) -> list[str]:
    """The paper's claims on the scored split, again against the control at the same N, what the
    design can show, and how to read the statistics."""
    main, nodes = result["evidence"][result["split"]], result["nodes"]
    parts = [f"## The paper's claims ({result['split']}, {main['utterances']:,} utterances, {main['words']:,} words; "
             f"{len(main['seeds'])} seed{'s' if len(main['seeds']) != 1 else ''})", "",
             claims_table(main["claims"]), ""]
    control = result.get("control") or main.get("control")
    if main.get("claims_vs_control"):
        parts += [f"### The same claims against {control} at the same worker count", "",
                  f"Every cell read against {control} at its own N: rel(cell) - rel({control} x N), seed by seed and "
                  f"resample by resample; the baseline in a claim stands for {control} itself. This separates what "
                  f"a strategy costs from what N-times-larger steps at this learning rate cost. Holm over these "
                  f"claims; the ceiling is the warm start's, less {control}'s own change at the claim's largest N.", "",
                  claims_table(main["claims_vs_control"]), ""]
    parts += design_section(main, nodes)
    tested = sum(j.get("verdict") != "not measured" for j in main["claims"])
    if not tested:
        parts += ["No claim could be tested: each needs cells (strategies at worker counts) this run did not "
                  "train. The tables below still give every cell's effect with its paired CI.", ""]
    if len(main["seeds"]) == 1:
        parts += ["**One seed:** every CI and p-value here holds the test set's noise alone (the paired "
                  "bootstrap over utterances). Nothing measures how far another seed would move a run, so a "
                  "verdict says what this test set can tell about these runs, not about the strategies; "
                  "the MDE and seeds columns need two seeds or more.", ""]
    return parts + [statistics_note(main, tested, nodes), ""]


def strategies_section(result: Mapping, effect: Mapping[tuple[str, int], Mapping], network: str,
                       pareto: Path | None) -> list[str]:
    """Every strategy on one line: accuracy, bytes, projected speed and time to target, and pareto.png."""
    within = float(result.get("target_within", 0.05))
    parts = [f"## Every strategy: accuracy, bytes and time ({result['split']})", "",
             f"Relative WER against the same seed's baseline with its paired 95% CI; bytes each worker sends per "
             f"step; the cost model's speedup and training time (steps x its step time) on the `{network}` network; "
             f"**time to target**: the projected time until the run's dev WER first comes within {within:.0%} of "
             f"its baseline's final dev WER (MLPerf's time-to-train on the cost model; mean over the runs that "
             f"reached it).", "", strategies_table(result["cells"], effect), ""]
    return parts + ([f"![accuracy against bytes and projected time]({pareto.name})", ""] if pareto else [])


def evidence_sections(result: Mapping) -> list[str]:
    """Per scored split: each cell against the baseline, and the strategies against each other."""
    parts = []
    for sp, e in result["evidence"].items():
        role = "the split the claims are decided on" if sp == result["split"] else "scored beside it"
        parts += [f"## Each cell against the baseline: {sp} ({role}; {e['utterances']:,} utterances, "
                  f"{e['words']:,} words)", "",
                  "Mean over seeds of each rate, and the relative change against the same seed's baseline with "
                  "its paired 95% CI." + FER_NOTES.get(result.get("fer"), ""), "",
                  evidence_cells_table(e, result["nodes"]), "",
                  f"### Strategies against each other: {sp}", "",
                  "rel(b) - rel(a) in points: positive when a is more accurate; p adjusted by Holm over every "
                  "pair of one metric.", "",
                  pairs_table(e), ""]
    return parts


def _means(lr_search: Mapping) -> str:
    """lr_search.select=one_rule's mean dev WER per candidate, in the table's words."""
    means = (lr_search.get("one_rule") or {}).get("mean_dev_wer") or []
    return "mean dev WER per candidate " + ", ".join("diverged somewhere" if m is None else f"{100 * m:.1f}%"
                                                      for m in means)


def search_sections(result: Mapping) -> list[str]:
    """The control's learning-rate search and the knob search, with what they cost."""
    parts = []
    lr_search = result.get("lr_search") or {}
    if lr_search.get("nodes"):
        cost = (f"{lr_search.get('runs', '?')} runs, seed {lr_search.get('seed')}, "
                f"{lr_search['run_s'] / 60:.1f} min of run time" if "run_s" in lr_search else "reused from an earlier run")
        control = lr_search.get("strategy")
        inherit = ", ".join(lr_search.get("inherit") or []) or "no other strategy"
        group = ", ".join(lr_search.get("inherit_group") or [])
        base = (f"First the baseline's learning rate at one worker (workers 1): its winner's `optim.lr` is every later "
                f"run's base, which {control}'s candidates scale by N and BMUF's workers step at. "
                if lr_search.get("base") else "")
        edges = lr_edge_winners(lr_search)
        parts += [f"## The learning-rate search ({control})", "",
                  f"{base}{control}'s learning rate at each worker count on dev WER ({cost}); "
                  + (f"one candidate for every N (lr_search.select=one_rule: the lowest mean dev WER over the worker "
                     f"counts, {_means(lr_search)}) is {control}'s at each N and is inherited by {inherit}"
                     if lr_search.get("select") == "one_rule" else
                     f"the winner at each N is {control}'s there and is inherited by {inherit}")
                  + (f"; {group} take{'s' if ',' not in group else ''} its scaling rule applied to the workers one "
                     f"of {'its' if ',' not in group else 'their'} exchanges combines (`lr_scaling=<rule>_group`)"
                     if group else "") + ". A candidate that diverged is not eligible."
                  + (f" The winner at {', '.join(edges)} worker{'s' if edges != ['1'] else ''} is at its grid's edge: "
                     f"a better learning rate may lie beyond the candidates searched." if edges else ""), "",
                  lr_search_table(lr_search), ""]
    search = result.get("search") or {}
    if search:
        cost = (f"{search.get('runs', '?')} runs at {search.get('nodes')} workers, seed {search.get('seed')}, "
                f"{search['run_s'] / 60:.1f} min of run time" if "run_s" in search else "reused from an earlier run")
        parts += ["## The knob search", "",
                  f"One search at one worker count on dev WER ({cost}); each strategy's winner is kept for "
                  f"every worker count and seed. A candidate that diverged, or sent more than the density cap, "
                  f"is not eligible.", "", search_table(search), ""]
    return parts


def runs_and_speed_sections(result: Mapping) -> list[str]:
    """Every run with its plateau test, and the first seed's speed against the paper's."""
    all_rows = [r for rows in result["rows_by_seed"].values() for r in rows]
    first = result["first_seed_rows"]
    errors, median = speedup_errors(first)
    plateaus = sum(bool((r.get("plateau") or {}).get("plateau")) for r in all_rows)
    return ["## Every run: steps and plateau", "",
            f"{plateaus} of {len(all_rows)} runs end on a plateau: a least-squares line through the last dev-loss "
            f"points predicts a change over them whose 95% CI excludes a fall of the tolerance or more, so the run "
            f"is shown not to be still improving (asrbench.stats.plateau; trend: flat, rising = past its best, "
            f"falling = still improving or too noisy to tell). BMUF and GTC-BMUF are validated on the global "
            f"model W_g at block ends.", "",
            runs_table(all_rows, list(result["evidence"])), "",
            f"## Speed (seed {result['seeds'][0]}'s runs on this machine's simulated cluster)", "",
            comparison_table(first), "",
            (f"Median relative error of our predicted speedups against the paper's: {median * 100:.0f}% "
             f"over {len(errors)} figures." if errors else
             "No run is at one of the paper's worker counts; the projection below compares with its speedups."),
            ""]


def projection_section(projection: Mapping | None, network: str) -> list[str]:
    """Every run's communication re-costed at the paper's model size, against the paper's speedups."""
    if not projection or not projection["rows"]:
        return []
    proj_errors, proj_median = speedup_errors(projection["rows"])
    return [
        f"## Projected to the paper's scale ({projection['model']}, {projection['parameters'] / 1e6:.1f}M parameters)",
        "",
        f"Each run's measured communication pattern (strategy, N, K, group size, the fraction of elements "
        f"GTC sent) re-costed for `{projection['model']}` with the compute profile "
        f"`{projection['profile']}` on the `{network}` network: bytes scale with the parameter count, "
        f"compute is the profile's seconds per worker step.", "",
        projection_table(projection["rows"]), "",
        (f"Median relative error of the projected speedups against the paper's: {proj_median * 100:.0f}% "
         f"over {len(proj_errors)} figures." if proj_errors else
         "These worker counts are not the paper's, so no projected speedup has a paper figure beside it."), ""]
