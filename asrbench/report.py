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
    """Training loss and dev WER against step, one line per run; returns the PNG path."""
    if not any(histories.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, hist in histories.items():
        for ax, key in zip(axes, ("train/loss", "val/wer")):
            pts = [(h["step"], h[key]) for h in hist if key in h]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="." if key == "val/wer" else None)
    for ax, title in zip(axes, ("training loss", "dev WER")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_report(out_dir: Path, rows: Sequence[Mapping], histories: Mapping[str, list[dict]],
                 title: str = "asrbench report") -> Path:
    """report.md (+ curves.png) in `out_dir`; returns the Markdown path."""
    out_dir = Path(out_dir)
    png = plot_curves(histories, out_dir / "curves.png")
    parts = [f"# {title}", "", markdown_table(rows), ""]
    for r in rows:
        parts += [f"## {r.get('strategy')} x{r.get('nodes')}: per split", "", per_split_table(r), ""]
        speakers = per_speaker_table(r)
        if speakers:
            parts += [f"### {r.get('strategy')} x{r.get('nodes')}: per speaker", "", speakers, ""]
    if png:
        parts += ["![learning curves](curves.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts))
    return path
