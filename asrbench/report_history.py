"""A run's history for its report: the metrics.jsonl curves, time to target on the cost model, and
the Pareto front of accuracy against cost."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path


def read_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dev_curve(history: Sequence[Mapping], key: str = "val/loss") -> list[tuple[int, float]]:
    """(step, value) of every validation in a run's metrics history that logged `key`."""
    return [(int(h["step"]), float(h[key])) for h in history
            if h.get(key) is not None and math.isfinite(float(h[key]))]


def time_to_target(history: Sequence[Mapping], step_s: float | None, target: float | None) -> dict | None:
    """MLPerf's time-to-train on the cost model: the first validation at which the run's dev WER is at
    or below `target`, as {steps, projected_s = steps x step_s} (step_s: the run's predicted seconds
    per step on its network); None when the run never reached it or has no step time."""
    if target is None or not step_s:
        return None
    for step, wer in dev_curve(history, "val/wer"):
        if wer <= target:
            return {"steps": step, "projected_s": step * float(step_s)}
    return None


def add_time_to_target(row: dict, history: Sequence[Mapping], baseline: Mapping | None, within: float) -> dict:
    """`row` with time_to_target_s (and _steps): the target is the baseline's final dev WER x (1 + within),
    so a run of the baseline itself reaches it at its last validation at the latest; and
    projected_train_s, the whole run's steps x predicted step time."""
    base_dev = ((baseline or {}).get("eval") or {}).get("dev", {}).get("wer")
    hit = time_to_target(history, row.get("predicted_step_s"), None if base_dev is None else base_dev * (1 + within))
    row["target_dev_wer"] = None if base_dev is None else base_dev * (1 + within)
    row["time_to_target_s"] = hit["projected_s"] if hit else None
    row["time_to_target_steps"] = hit["steps"] if hit else None
    step_s = row.get("predicted_step_s")
    row["projected_train_s"] = float(step_s) * int(row["steps"]) if step_s and row.get("steps") else None
    return row


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better on each)."""
    return [i for i, (x, y) in enumerate(points)
            if not any((u <= x and v <= y) and (u < x or v < y) for j, (u, v) in enumerate(points) if j != i)]
