"""Reports: a Markdown table of runs against the single-worker baseline, and learning curves."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from asrbench import strategies
from asrbench.errors import ConfigError
from asrbench.metrics import relative_change
from asrbench.paper import PAPER_NODES, PAPER_TABLE, paper_rel_wer_text, paper_value


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


def _fmt(v, pct: bool = False, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if pct:
        return f"{v * 100:+.1f}%" if signed else f"{v * 100:.1f}%"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


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


def plot_pareto(points: Sequence[Mapping], path: Path, title: str = "") -> Path | None:
    """pareto.png: relative WER (with its CI when given: rel_wer_low/high) against bytes sent per worker
    per step and against the projected training time (the cost model's step time x steps), one point
    per strategy and worker count; the points on each panel's Pareto front joined by a line."""
    pts = [p for p in points if p.get("rel_wer") is not None and math.isfinite(p["rel_wer"])]
    if len(pts) < 2:
        return None
    import matplotlib  # heavy: loaded only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (("bytes_sent_per_worker_per_step", "bytes sent per worker per step (log; one worker sends none: 1)"),
              ("projected_train_s", "projected training time on the network preset (s, log)"))
    for ax, (key, label) in zip(axes, panels):
        xy = []
        for i, p in enumerate(pts):
            x = max(float(p.get(key) or 0.0), 1.0) if key.startswith("bytes") else p.get(key)
            if x is None or not math.isfinite(x):
                continue
            y = p["rel_wer"] * 100
            err = None
            if p.get("rel_wer_low") is not None and math.isfinite(p["rel_wer_low"]):
                err = [[y - p["rel_wer_low"] * 100], [p["rel_wer_high"] * 100 - y]]
            ax.errorbar([x], [y], yerr=err, fmt="o", color=f"C{i % 10}", capsize=3, ms=5)
            ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=f"C{i % 10}")
            xy.append((x, y))
        front = sorted((xy[i] for i in pareto_front(xy)), key=lambda t: t[0])
        if len(front) > 1:
            ax.plot(*zip(*front), "--", color="0.4", lw=1, label="Pareto front")
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("relative WER change vs the baseline (%)")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


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


def plot_curves(histories: Mapping[str, list[dict]], path: Path) -> Path | None:
    """Training loss against step and against wall time, and dev WER at every validation, one
    line per run; returns the PNG path."""
    if not any(histories.values()):
        return None
    import matplotlib  # heavy: loaded only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("step", "train/loss", "training loss", "step"),
              ("time_s", "train/loss", "training loss", "wall time since training started (s)"),
              ("step", "val/wer", "dev WER", "step"))
    for i, (label, hist) in enumerate(histories.items()):
        for ax, (x, key, _, _) in zip(axes, panels):
            pts = [(h[x], h[key]) for h in hist if key in h and x in h]
            if pts:
                ax.plot(*zip(*pts), label=label, color=f"C{i % 10}", lw=1,
                        marker="o" if key == "val/wer" else None, ms=3)
    for ax, (_, _, title, xlabel) in zip(axes, panels):
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_tradeoff(rows: Sequence[Mapping], path: Path) -> Path | None:
    """Relative WER against bytes sent per worker per step and against measured time per step, one
    point per run (the baseline at 0)."""
    pts = [r for r in rows if r.get("rel_wer") is not None and r.get("steps")]
    if not pts:
        return None
    import matplotlib  # heavy: loaded only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    projected = False
    for i, r in enumerate(pts):
        label = f"{r['strategy']} x{r['nodes']}"
        step_s = r.get("train_time_s", 0.0) / max(int(r["steps"]), 1)
        for ax, x in zip(axes, (max(float(r.get("bytes_sent_per_worker_per_step") or 0), 1.0), step_s)):
            ax.scatter([x], [r["rel_wer"] * 100], color=f"C{i % 10}", label=label, s=40)
            ax.annotate(label, (x, r["rel_wer"] * 100), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if r.get("predicted_step_s"):  # the cost model's step on the run's network (cluster=simulated)
            projected = True
            axes[1].scatter([r["predicted_step_s"]], [r["rel_wer"] * 100], facecolors="none",
                            edgecolors=f"C{i % 10}", marker="s", s=50)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("bytes sent per worker per step (log; the baseline sends none)")
    axes[1].set_xlabel("wall time per step measured on this machine (s): filled, every worker a process "
                       "sharing its cores" + ("; hollow squares: the cost model's projection" if projected else ""),
                       fontsize=7)
    for ax in axes:
        ax.set_ylabel("relative WER change vs the baseline (%)")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


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


def _num(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def plot_scaling(rows: Sequence[Mapping], out_dir: Path) -> list[Path]:
    """speedup.png, rel_wer.png and bytes.png: ours (solid) and the paper's (dashed) per strategy."""
    import matplotlib  # heavy: loaded only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = sorted({r["strategy"] for r in rows})
    paths = []
    for key, fname, ylabel in (("predicted_speedup", "speedup.png", "speedup over one worker"),
                               ("rel_wer", "rel_wer.png", "relative WER change vs single worker (%), scored split"),
                               ("bytes_sent_per_worker_per_step", "bytes.png", "bytes sent / worker / step")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, s in enumerate(strategies):
            pts = sorted((r["nodes"], r.get(key)) for r in rows if r["strategy"] == s and r.get(key) is not None)
            scale = 100 if key == "rel_wer" else 1
            if pts:
                ax.plot([p[0] for p in pts], [p[1] * scale for p in pts], marker="o", color=f"C{i}", label=f"{s} (ours)")
            paper_key = {"predicted_speedup": "speedup", "rel_wer": "rel_wer"}.get(key)
            if paper_key and s in PAPER_TABLE:
                ppts = [(n, v[paper_key] * scale) for n, v in sorted(PAPER_TABLE[s].items())
                        if not math.isnan(v[paper_key])]
                ax.plot([p[0] for p in ppts], [p[1] for p in ppts], "--", marker="x", color=f"C{i}",
                        label=f"{s} (paper)")
        if key == "bytes_sent_per_worker_per_step":
            ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("workers")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        paths.append(out_dir / fname)
    return paths


def search_table(search: Mapping) -> str:
    lines = ["| strategy | candidate overrides | dev WER | test WER | density | steps | |", "|" + "---|" * 7]
    for s, v in (search.get("strategies") or {}).items():
        for i, c in enumerate(v["candidates"]):
            dens = "-" if c.get("density") is None else f"{c['density'] * 100:.1f}%"
            if c.get("over_density_cap"):
                dens += f" (over the cap of {v['max_density'] * 100:g}%)"
            lines.append(f"| {s} | `{' '.join(c['overrides']) or '(defaults)'}` | {_candidate(c, i == v['winner'], dens)} |")
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


def _pct_pm(mean: float, sd: float, signed: bool = True) -> str:
    if math.isnan(mean):
        return "-"
    text = f"{mean * 100:+.1f}" if signed else f"{mean * 100:.1f}"
    return text + ("" if math.isnan(sd) else f" ± {sd * 100:.1f}") + "%"


def plot_reproduce_tradeoff(cells: Sequence[Mapping], projected: Mapping[tuple[str, int], float],
                            out_dir: Path) -> Path:
    """tradeoff.png: relative WER (mean over seeds with its paired 95% CI when the cells carry
    `rel_wer_low`/`rel_wer_high`, else ± the seed sd) against speedup, ours and the paper's."""
    import matplotlib  # heavy: loaded only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    order = strategies.names()
    present = sorted({c["strategy"] for c in cells} - {strategies.BASELINE},
                     key=lambda s: order.index(s) if s in order else len(order))
    for i, s in enumerate(present):
        def spread(c):
            if c.get("rel_wer_low") is not None and not math.isnan(c["rel_wer_low"]):
                return ((c["rel_wer"] - c["rel_wer_low"]) * 100, (c["rel_wer_high"] - c["rel_wer"]) * 100)
            sd = 0 if math.isnan(c.get("rel_wer_sd", math.nan)) else c["rel_wer_sd"] * 100
            return (sd, sd)

        ours = sorted((projected.get((c["strategy"], c["nodes"]), c["predicted_speedup"]), c["rel_wer"] * 100,
                       spread(c), c["nodes"])
                      for c in cells if c["strategy"] == s and not math.isnan(c["rel_wer"]))
        if ours:
            ax.errorbar([o[0] for o in ours], [o[1] for o in ours], yerr=[[o[2][0] for o in ours],
                                                                        [o[2][1] for o in ours]],
                        fmt="o-", color=f"C{i}", capsize=3, label=f"{s} (ours)")
            for x, y, _, n in ours:
                ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=f"C{i}")
        paper = [(v["speedup"], 0.0 if v.get("below_baseline") else v["rel_wer"] * 100, n)
                 for n, v in sorted(PAPER_TABLE.get(s, {}).items())]
        ax.plot([p[0] for p in paper], [p[1] for p in paper], "x--", color=f"C{i}", label=f"{s} (paper)")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("speedup over one worker (ours: projected to the paper's scale; ours at our own worker counts)")
    ax.set_ylabel("relative WER change vs single worker (%)")
    ax.set_title("accuracy against speed; paper's GTC-BMUF x32 'below baseline' drawn at 0", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "tradeoff.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning_curves(runs: Sequence[tuple[Mapping, Sequence[Mapping]]], out_dir: Path) -> Path:
    """learning_curves.png: dev loss and dev WER of every run against epochs of data seen."""
    import matplotlib  # heavy: loaded only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels: dict[str, int] = {}
    labelled_seed = min((int(r.get("seed", 0)) for r, _ in runs), default=0)  # one legend entry per cell
    for res, history in runs:
        label = f"{res['strategy']} x{res['nodes']}"
        color = f"C{labels.setdefault(label, len(labels)) % 10}"
        steps, epochs = max(int(res.get("steps") or 0), 1), float(res.get("epochs") or 1)
        for ax, key in zip(axes, ("val/loss", "val/wer")):
            pts = dev_curve(history, key)
            if pts:
                ax.plot([s / steps * epochs for s, _ in pts], [v for _, v in pts], color=color, lw=1, alpha=0.8,
                        label=label if int(res.get("seed", 0)) == labelled_seed else None)
    for ax, name in zip(axes, ("dev loss", "dev WER")):
        ax.set_xlabel("epochs of training data (after the shared warm start)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = out_dir / "learning_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

# ---------------------------------------------------------------------------------------------
# asrbench reproduce: its report.md, tables and figures
# ---------------------------------------------------------------------------------------------
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


NOT_TESTABLE = "not testable by this design"


def lr_search_table(lr_search: Mapping) -> str:
    """The control's learning-rate candidates at each worker count: dev WER, the peak lr, the winner."""
    lines = ["| workers | candidate overrides | peak lr | dev WER | test WER | steps | |", "|" + "---|" * 7]
    for n, v in (lr_search.get("nodes") or {}).items():
        for i, c in enumerate(v["candidates"]):
            lr = "-" if c.get("lr") is None else f"{c['lr']:.2g}"
            lines.append(f"| {n} | `{' '.join(c['overrides'])}` | {lr} | {_candidate(c, i == v['winner'])} |")
    return "\n".join(lines)


def _candidate(c: Mapping, winner: bool, density: str | None = None) -> str:
    """A search candidate's cells: dev WER, test WER, its density (when given), steps and whether it won;
    a diverged one (no dev WER) reads 'diverged' and 'not eligible'."""
    dens = "" if density is None else f" {density} |"
    if c.get("dev_wer") is None:
        return f"diverged | - |{dens} - | not eligible (diverged)"
    return f"{c['dev_wer'] * 100:.1f}% | {c['test_wer'] * 100:.1f}% |{dens} {c['steps']:,} | {'**winner**' if winner else ''}"


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


def write_reproduce(out_dir: Path, result: Mapping, network: str, projection: Mapping | None, setup: str,
                    others: Sequence[tuple[str, Mapping]] = (), name: str = "this run") -> Path:
    """report.md (setup, claims with their statistics, effects per cell and per pair of strategies on
    every scored split, search, runs with their plateau tests, speed) and its plots."""
    from asrbench.cluster import trust  # imports omegaconf, which report's other users need not load

    out_dir = Path(out_dir)
    cells = result["cells"]
    nodes = result["nodes"]
    split = result["split"]
    ev = result["evidence"]
    projected = {(p["strategy"], p["nodes"]): p["predicted_speedup"] for p in (projection or {}).get("rows", [])}
    first = result["first_seed_rows"]
    # the figures show the split the claims are decided on: its relative WER and paired CI per cell
    effect = {(c["strategy"], int(c["nodes"])): c["wer"] for c in ev[split]["cells"]}
    scored = [c | {"rel_wer": effect[k]["mean"], "rel_wer_low": effect[k]["low"], "rel_wer_high": effect[k]["high"]}
              for c in cells if (k := (c["strategy"], int(c["nodes"]))) in effect]
    pareto = plot_pareto([c | {"label": f"{c['strategy']} x{c['nodes']}"} for c in scored], out_dir / "pareto.png",
                         f"{split}: mean over seeds, paired 95% CI; projected on the {network} network")
    plots = [plot_reproduce_tradeoff(scored, projected, out_dir), plot_learning_curves(result["histories"], out_dir),
             *plot_scaling(scored, out_dir)]
    errors, median = speedup_errors(first)
    search = result.get("search") or {}
    main = ev[split]
    parts = [
        "# asrbench reproduce", "", setup, "",
        f"## The paper's claims ({split}, {main['utterances']:,} utterances, {main['words']:,} words; "
        f"{len(main['seeds'])} seed{'s' if len(main['seeds']) != 1 else ''})", "",
        claims_table(main["claims"]), "",
    ]
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
    parts += [statistics_note(main, tested, nodes), ""]
    within = float(result.get("target_within", 0.05))
    parts += [f"## Every strategy: accuracy, bytes and time ({split})", "",
              f"Relative WER against the same seed's baseline with its paired 95% CI; bytes each worker sends per "
              f"step; the cost model's speedup and training time (steps x its step time) on the `{network}` network; "
              f"**time to target**: the projected time until the run's dev WER first comes within {within:.0%} of "
              f"its baseline's final dev WER (MLPerf's time-to-train on the cost model; mean over the runs that "
              f"reached it).", "", strategies_table(cells, effect), ""]
    if pareto:
        parts += [f"![accuracy against bytes and projected time]({pareto.name})", ""]
    for sp, e in ev.items():
        role = "the split the claims are decided on" if sp == split else "scored beside it"
        parts += [f"## Each cell against the baseline: {sp} ({role}; {e['utterances']:,} utterances, "
                  f"{e['words']:,} words)", "",
                  "Mean over seeds of each rate, and the relative change against the same seed's baseline with "
                  "its paired 95% CI." + FER_NOTES.get(result.get("fer"), ""), "",
                  evidence_cells_table(e, nodes), "",
                  f"### Strategies against each other: {sp}", "",
                  "rel(b) - rel(a) in points: positive when a is more accurate; p adjusted by Holm over every "
                  "pair of one metric.", "",
                  pairs_table(e), ""]
    parts += errors_section(result, split, nodes)
    if others:
        parts += ["## Beside other settings", "",
                  "Each claim's verdict in this run and in the other finished reproduce runs named by "
                  "`reproduce.compare_with`.", "", settings_table([(name, result), *others]), ""]
    lr_search = result.get("lr_search") or {}
    if lr_search.get("nodes"):
        cost = (f"{lr_search.get('runs', '?')} runs, seed {lr_search.get('seed')}, "
                f"{lr_search['run_s'] / 60:.1f} min of run time" if "run_s" in lr_search else "reused from an earlier run")
        inherit = ", ".join(lr_search.get("inherit") or []) or "no other strategy"
        parts += [f"## The learning-rate search ({lr_search.get('strategy')})", "",
                  f"{lr_search.get('strategy')}'s learning rate at each worker count on dev WER ({cost}); the winner "
                  f"at each N is {lr_search.get('strategy')}'s there and is inherited by {inherit}.", "",
                  lr_search_table(lr_search), ""]
    if search:
        cost = (f"{search.get('runs', '?')} runs at {search.get('nodes')} workers, seed {search.get('seed')}, "
                f"{search['run_s'] / 60:.1f} min of run time" if "run_s" in search else "reused from an earlier run")
        parts += ["## The knob search", "",
                  f"One search at one worker count on dev WER ({cost}); each strategy's winner is kept for "
                  f"every worker count and seed.", "", search_table(search), ""]
    all_rows = [r for rows in result["rows_by_seed"].values() for r in rows]
    splits = list(ev)
    plateaus = sum(bool((r.get("plateau") or {}).get("plateau")) for r in all_rows)
    parts += ["## Every run: steps and plateau", "",
              f"{plateaus} of {len(all_rows)} runs end on a plateau: a least-squares line through the last dev-loss "
              f"points predicts a change over them whose 95% CI excludes a fall of the tolerance or more, so the run "
              f"is shown not to be still improving (asrbench.stats.plateau; trend: flat, rising = past its best, "
              f"falling = still improving or too noisy to tell). BMUF and GTC-BMUF are validated on the global "
              f"model W_g at block ends.", "",
              runs_table(all_rows, splits), "",
              f"## Speed (seed {result['seeds'][0]}'s runs on this machine's simulated cluster)", "",
              comparison_table(first), "",
              (f"Median relative error of our predicted speedups against the paper's: {median * 100:.0f}% "
               f"over {len(errors)} figures." if errors else
               "No run is at one of the paper's worker counts; the projection below compares with its speedups."),
              ""]
    if projection and projection["rows"]:
        proj_errors, proj_median = speedup_errors(projection["rows"])
        parts += [
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
    parts += [trust.report_section(first, (projection or {}).get("rows", [])), ""]
    parts += [f"![{p.stem}]({p.name})" for p in plots]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# asrbench reproduce: where the errors are (per speaker, and by kind of word edit)
# ---------------------------------------------------------------------------------------------
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
