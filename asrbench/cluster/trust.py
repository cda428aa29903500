"""How far to trust the projected speedups: a report section from what was measured against the model.

Three checks feed it, each a measurement set beside a prediction:

1. the calibration (``asrbench calibrate``): the network model's held-out error on this
   machine's collectives (:mod:`asrbench.cluster.calibrate`);
2. step checks: a real run's step time (``train_time_s / steps`` over gloo processes) beside the
   simulated run's ``predicted_step_s`` on the calibrated network, per strategy and N;
3. stragglers: the share of each projected step spent waiting for the slowest worker
   (:func:`asrbench.cluster.cost.straggler_factor`), per strategy and N.

:func:`trust_section` turns them into Markdown; :func:`report_section` reads the measured
files this project keeps (conf/network/loopback_gloo.yaml and its step checks) and the rows of
a reproduce run, for its report.md.
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from asrbench import strategies

CONF = Path(__file__).resolve().parents[2] / "conf"
CALIBRATED_NETWORKS = (CONF / "network" / "loopback_gloo_idle16.yaml", CONF / "network" / "loopback_gloo_idle2.yaml",
                       CONF / "network" / "loopback_gloo.yaml")
STEP_CHECKS = CONF / "network" / "loopback_gloo_checks.json"
ASSUMPTIONS = (
    "the compute of one worker step on a V100 (conf/profiles/v100_lstm_paper.yaml: estimated from peak "
    "FLOP/s and an assumed 25% efficiency, not measured)",
    "the paper's cluster: AWS p3.16xlarge (8 V100 with NVLink, 25 Gb/s Ethernet) is assumed, not stated in the "
    "paper; conf/network/paper.yaml uses line rates and an assumed 50 us latency, which no calibration here "
    "measured (the calibration is gloo over loopback on one machine)",
    "the paper's data and per-worker batch (16 utterances of LibriSpeech's mean length is assumed): the straggler "
    "factor depends on the utterance length spread and on the batch size",
)


def load_calibration(path: str | Path) -> dict[str, Any]:
    """A network file written by ``asrbench calibrate``: its constants and its ``calibration`` block."""
    net = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    cal = dict(net.get("calibration") or {})
    return {"name": net["name"], "latency_s": net["latency_s"], "bandwidth_Bps": net["bandwidth_Bps"],
            "held_out_median_abs_error": cal.get("held_out_median_abs_error"),
            "held_out_worst_abs_error": cal.get("held_out_worst_abs_error"),
            "per_collective": cal.get("per_collective") or {}, "where": cal.get("where", cal.get("host", ""))}


def load_step_checks(path: str | Path = STEP_CHECKS) -> tuple[list[dict[str, Any]], list[str]]:
    """([{strategy, nodes, predicted_s, measured_s, where, load}], findings): measured beside predicted
    step times, and what the misses were traced to."""
    doc = json.loads(Path(path).read_text())
    return list(doc["checks"]), list(doc.get("findings") or [])


FIT_MODEL = "lstm_tiny"  # a check without a `model` key was made with it


def fit_step_overhead(checks: Sequence[Mapping[str, Any]], *, fit_nodes: int = 2, fit_model: str = FIT_MODEL
                      ) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """The per-step software overhead the cost model lacks, fitted on some step checks and tested on the rest.

    Per machine (``where``) and strategy, T_overhead = measured - predicted of the check with
    ``fit_model`` at ``fit_nodes`` workers (the single worker at its one). Every other check of
    that machine and strategy (other worker counts, other models) is held out: its prediction plus
    that overhead against its measurement. Returns ({where: {strategy: seconds}}, held-out rows
    with strategy, nodes, model, where, predicted_s, overhead_s, measured_s, error).
    """
    def fits(c: Mapping[str, Any]) -> bool:
        return (int(c["nodes"]) == (1 if c["strategy"] == strategies.BASELINE else fit_nodes)
                and c.get("model", FIT_MODEL) == fit_model)

    fitted: dict[str, dict[str, float]] = {}
    for c in checks:
        if fits(c):
            fitted.setdefault(c.get("where") or "this machine", {})[c["strategy"]] = c["measured_s"] - c["predicted_s"]
    held = []
    for c in checks:
        where = c.get("where") or "this machine"
        overhead = fitted.get(where, {}).get(c["strategy"])
        if overhead is None or fits(c):
            continue
        predicted = c["predicted_s"] + overhead
        held.append({"strategy": c["strategy"], "nodes": int(c["nodes"]), "model": c.get("model", FIT_MODEL),
                     "where": where, "load": c.get("load"), "predicted_s": predicted, "overhead_s": overhead,
                     "measured_s": c["measured_s"], "error": (predicted - c["measured_s"]) / c["measured_s"]})
    return fitted, held


def straggler_shares(results: Sequence[Mapping[str, Any]], projection_rows: Sequence[Mapping[str, Any]]
                     ) -> list[dict[str, Any]]:
    """Per (strategy, N) of a projection: the straggler factor s its run measured and the share of the
    projected step spent waiting for the slowest worker, (s - 1) T_compute / T_step."""
    factors = {(r["strategy"], r["nodes"]): float((r.get("cost_model") or {}).get("stats", {})
                                                   .get("straggler_factor") or 1.0) for r in results}
    out = []
    for p in projection_rows:
        s = factors.get((p["strategy"], p["nodes"]), 1.0)
        out.append({"strategy": p["strategy"], "nodes": p["nodes"], "factor": s,
                    "share": (s - 1) * p["compute_s"] / p["step_s"] if p["step_s"] else 0.0})
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def trust_section(calibrations: Sequence[Mapping[str, Any]], step_checks: Sequence[Mapping[str, Any]],
                  stragglers: Sequence[Mapping[str, Any]], *, findings: Sequence[str] = (),
                  assumptions: Sequence[str] = ASSUMPTIONS, heading: str = "## How far to trust these speedups") -> str:
    """The Markdown section: calibration error, predicted vs measured steps, straggler shares, assumptions.

    `calibrations` as :func:`load_calibration` gives each; `step_checks` rows with strategy, nodes,
    predicted_s, measured_s (and optionally where, load); `findings` sentences on why they differ;
    `stragglers` rows with strategy, nodes, factor, share (:func:`straggler_shares`).
    """
    lines = [heading, "", "**Network model.** `asrbench calibrate` (torch.distributed gloo over loopback): alpha "
             "and B fitted on half of the points, the other half predicted:", "",
             "| where | alpha | B | held-out median \\|error\\| | worst | each collective fitted alone |",
             "|" + "---|" * 6]
    for cal in calibrations:
        per = ", ".join(f"{op} {_pct(r['held_out_median_abs_error'])}"
                        for op, r in (cal.get("per_collective") or {}).items())
        lines.append(f"| {cal.get('where') or 'this machine'} | {cal['latency_s'] * 1e6:.0f} us | "
                     f"{cal['bandwidth_Bps'] / 1e9:.2f} GB/s | {_pct(cal.get('held_out_median_abs_error'))} | "
                     f"{_pct(cal.get('held_out_worst_abs_error'))} | {per or '-'} |")
    lines.append("")
    if step_checks:
        lines += ["**Step time, predicted vs measured** (real gloo processes beside the simulated run on the "
                  "calibrated network):", "",
                  "| where (load average) | strategy | workers | predicted (ms) | measured (ms) | error |",
                  "|" + "---|" * 6]
        errs: dict[str, list[float]] = {}
        for c in step_checks:
            err = (c["predicted_s"] - c["measured_s"]) / c["measured_s"]
            where = c.get("where") or "this machine"
            errs.setdefault(where, []).append(abs(err))
            load = f" ({c['load']:.1f})" if isinstance(c.get("load"), (int, float)) else ""
            lines.append(f"| {where}{load} | {c['strategy']} | {c['nodes']} | {c['predicted_s'] * 1e3:.1f} | "
                         f"{c['measured_s'] * 1e3:.1f} | {err:+.0%} |")
        lines += ["", "; ".join(f"{where}: median |error| {_pct(statistics.median(e))}, worst {_pct(max(e))}"
                                for where, e in errs.items()) + "."]
        fitted, held = fit_step_overhead(step_checks)
        if held:
            lines += ["", f"**With the per-step overhead term** (T_overhead per strategy and machine = measured - "
                      f"predicted with {FIT_MODEL} at N = 2, the single worker at N = 1; every row below is held "
                      f"out, predicted as the model's step plus that term):", "",
                      "| where (load average) | strategy | workers | model | overhead (ms) | predicted (ms) | "
                      "measured (ms) | error |", "|" + "---|" * 8]
            by_where: dict[str, list[float]] = {}
            for h in held:
                by_where.setdefault(h["where"], []).append(abs(h["error"]))
                load = f" ({h['load']:.1f})" if isinstance(h.get("load"), (int, float)) else ""
                lines.append(f"| {h['where']}{load} | {h['strategy']} | {h['nodes']} | {h['model']} | "
                             f"{h['overhead_s'] * 1e3:.1f} | "
                             f"{h['predicted_s'] * 1e3:.1f} | {h['measured_s'] * 1e3:.1f} | {h['error']:+.0%} |")
            lines += ["", "; ".join(f"{where}: held-out median |error| {_pct(statistics.median(e))}, worst "
                                    f"{_pct(max(e))}" for where, e in by_where.items()) + "."]
        for finding in findings:
            lines += ["", finding]
        lines.append("")
    if stragglers:
        nodes = sorted({s["nodes"] for s in stragglers})
        strategies = list(dict.fromkeys(s["strategy"] for s in stragglers))
        cell = {(s["strategy"], s["nodes"]): s for s in stragglers}
        lines += ["**Stragglers.** Share of each projected step spent waiting for the slowest worker "
                  "(straggler factor s in brackets: the slowest worker's, group's or block's compute over the "
                  "mean worker's):", "", "| strategy | " + " | ".join(f"{n} workers" for n in nodes) + " |",
                  "|" + "---|" * (len(nodes) + 1)]
        for st in strategies:
            row = [f"{_pct(cell[st, n]['share'])} (s {cell[st, n]['factor']:.2f})" if (st, n) in cell else "-"
                   for n in nodes]
            lines.append(f"| {st} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["**Still assumed** (no measurement here checks them):", ""]
    lines += [f"- {a}" for a in assumptions]
    return "\n".join(lines) + "\n"


def report_section(results: Sequence[Mapping[str, Any]], projection_rows: Sequence[Mapping[str, Any]], *,
                   network_files: Sequence[str | Path] = CALIBRATED_NETWORKS,
                   checks_file: str | Path = STEP_CHECKS) -> str:
    """:func:`trust_section` from this project's measured files and a reproduce run's rows and projection."""
    checks, findings = load_step_checks(checks_file)
    return trust_section([load_calibration(f) for f in network_files], checks,
                         straggler_shares(results, projection_rows), findings=findings)
