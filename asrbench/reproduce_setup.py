"""The setup paragraph of `asrbench reproduce`'s report: what every run trained on, for how long, the
learning rates its searches chose, and what each invocation in the directory trained."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from asrbench import analysis


def describe_setup(cfg: Any, result: Mapping) -> str:
    """The report's first paragraph: what every run trained on, for how long, the baseline's error
    rates on every scored split, and the wall time."""
    rc = cfg.reproduce
    steps = {}
    for rows in result["rows_by_seed"].values():
        for r in rows:
            steps.setdefault(int(r["nodes"]), set()).add(int(r["steps"]))
    steps_text = ", ".join(f"{min(v):,}" + (f"-{max(v):,}" if max(v) != min(v) else "") + f" at {n}"
                           for n, v in sorted(steps.items()))
    base = []
    for split, ev in result["evidence"].items():
        per_seed = list(ev["baseline_per_seed"]["wer"].values())
        mean, sd = analysis.mean_sd(per_seed)
        many = len(per_seed) > 1
        base.append(f"{split} WER {mean * 100:.1f}{f' ± {sd * 100:.1f}' if many else ''}% "
                    f"({ev['words']:,} words{'' if many else ', one seed'})")
    warm = rc.get("warm_start_overrides") or []
    *earlier, this = result["invocations"]
    trained = this["trained"]
    return (f"`reproduce={rc.name}`: baseline and {', '.join(rc.strategies)} at {', '.join(map(str, rc.nodes))} "
            f"workers on the simulated cluster, seeds {result['seeds']}. Every run sees {rc.epochs} epochs of "
            f"data, the first {rc.get('warm_start_epochs') or 0} as one single-worker warm start per seed"
            f"{f' (`{chr(32).join(warm)}`)' if warm else ''} from which every run of that seed continues. "
            f"Overrides for every run: `{' '.join(rc.overrides)}`. Optimizer steps per run: {steps_text} workers. "
            + _control_text(result) +
            f"Baseline, mean ± sd over seeds: {'; '.join(base)}. "
            f"{result['runs']} runs whose own wall times add up to {result['run_s'] / 60:.1f} min "
            f"({rc.get('parallel') or 1} at a time); this invocation took {result['wall_s'] / 60:.1f} min"
            + (" and trained every one of them." if trained >= result["runs"] else
               f" and trained {trained} of them; the other {result['runs'] - trained} "
               f"an earlier invocation had finished, and their wall times are theirs.")
            + _earlier_text(earlier))


def _control_text(result: Mapping) -> str:
    """The setup's sentence on the control and its learning-rate search ("" without a control)."""
    control = result.get("control")
    if not control:
        return ""
    lr = result.get("lr_search") or {}
    winners = result.get("lr_winners") or {}
    if not winners:
        return f"{control} runs at every worker count as the control. "
    chosen = "; ".join(f"{n}: `{' '.join(o)}`" for n, o in sorted((int(k), v) for k, v in winners.items()))
    inherit = ", ".join(x for x in lr.get("inherit") or [] if x != control)
    group = ", ".join(x for x in lr.get("inherit_group") or [] if x != control)
    base = (lr.get("base") or {}).get("winner_overrides")
    return ((f"The baseline's learning rate was searched on dev at one worker (winner `{' '.join(base)}`; its "
             f"optim.lr is every later run's base). " if base else "")
            + f"{control} runs at every worker count as the control, at the learning rate a search on dev chose for "
            f"each N ({chosen})" + (f", which {inherit} inherit{'s' if ',' not in inherit else ''} at the same N"
                                   if inherit else "")
            + (f"; {group} take{'s' if ',' not in group else ''} its scaling rule over one exchange's workers"
               if group else "") + ". ")


def _earlier_text(invocations: Sequence[Mapping]) -> str:
    """The earlier invocations in a reproduce directory that trained something (or did not record it)."""
    shown = [f"{inv['wall_s'] / 60:.1f} min at commit {str(inv.get('git_commit') or 'unknown')[:7]}"
             + (f" ({inv['trained']} runs trained)" if inv.get("trained") is not None else "")
             for inv in invocations if inv.get("wall_s") is not None and inv.get("trained") != 0]
    if not shown:
        return ""
    return f" Earlier invocation{'s' if len(shown) > 1 else ''} in this directory: {'; '.join(shown)}."
