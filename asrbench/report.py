"""Reports: a Markdown table of runs against the single-worker baseline, and learning curves."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from asrbench.metrics import relative_change


def load_results(run_dir: Path) -> dict:
    from asrbench.errors import ConfigError

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
           ("compression_ratio", "compression", {}), ("wall_s", "wall s", {}))


def markdown_table(rows: Sequence[Mapping]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), **kw) for k, _, kw in COLUMNS) + " |")
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


def plot_curves(histories: Mapping[str, list[dict]], path: Path) -> Path | None:
    """Training loss against step and against wall time, and dev WER at every validation, one
    line per run; returns the PNG path."""
    if not any(histories.values()):
        return None
    import matplotlib

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(pts):
        label = f"{r['strategy']} x{r['nodes']}"
        step_s = r.get("train_time_s", 0.0) / max(int(r["steps"]), 1)
        for ax, x in zip(axes, (max(float(r.get("bytes_sent_per_worker_per_step") or 0), 1.0), step_s)):
            ax.scatter([x], [r["rel_wer"] * 100], color=f"C{i % 10}", label=label, s=40)
            ax.annotate(label, (x, r["rel_wer"] * 100), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("bytes sent per worker per step (log; the baseline sends none)")
    axes[1].set_xlabel("measured wall time per step (s)")
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
    parts = [f"# {title}", ""] + ([intro, ""] if intro else []) + [markdown_table(rows), ""]
    if curves:
        parts += ["![learning curves](curves.png)", ""]
    if tradeoff:
        parts += ["![accuracy against communication and time per step](tradeoff.png)", ""]
    for r in rows:
        parts += [f"## {r.get('strategy')} x{r.get('nodes')}: per split", "", per_split_table(r), ""]
    for r in rows:
        speakers = per_speaker_table(r)
        if speakers:
            parts += [f"### {r.get('strategy')} x{r.get('nodes')}: per speaker", "", speakers, ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts))
    return path
