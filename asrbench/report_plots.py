"""The figures of asrbench's reports (PNG, matplotlib loaded only when one is drawn): learning curves,
accuracy against bytes, time and speedup, the Pareto front, and scaling against the paper's."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from asrbench import strategies
from asrbench.paper import PAPER_TABLE
from asrbench.report_history import dev_curve, pareto_front


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
