"""`asrbench reproduce`: the paper's table on a simulated cluster, next to the paper's figures.

Runs the single-worker baseline and every (strategy, workers) pair of the chosen scale, each
as an ordinary `train` run in its own directory (finished runs are reused, so an interrupted
reproduce picks up where it stopped), then writes report.md with PNG plots and logs both to
W&B.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from asrbench import report
from asrbench.paper import PAPER_TABLE, paper_rel_wer_text, paper_value

log = logging.getLogger(__name__)


def run_name(strategy: str, nodes: int) -> str:
    return f"{strategy}_n{nodes}"


def rows_with_baseline(results: Sequence[Mapping], baseline: Mapping) -> list[dict]:
    return [report.with_relative(r, baseline) for r in results]


def comparison_table(rows: Sequence[Mapping]) -> str:
    """Ours (predicted speedup under the network preset, measured relative WER) beside the paper."""
    head = ("| strategy | workers | speedup (ours) | speedup (paper) | rel. WER (ours) | rel. WER (paper) "
            "| WER | steps | bytes sent/worker/step | compression |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        s, n = r["strategy"], r["nodes"]
        paper_s = paper_value(s, n, "speedup")
        rel = r.get("rel_wer")
        lines.append(
            f"| {s} | {n} | {_num(r.get('predicted_speedup'))}x | {_num(paper_s)}{'x' if paper_s else ''} | "
            f"{'-' if rel is None or math.isnan(rel) else f'{rel * 100:+.1f}%'} | {paper_rel_wer_text(s, n)} | "
            f"{r['wer'] * 100:.1f}% | {r.get('steps')} | {_num(r.get('bytes_sent_per_worker_per_step'))} | "
            f"{_num(r.get('compression_ratio'))} |")
    return "\n".join(lines)


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


# Cost-model statistics that grow with the number of parameters (GTC densities are kept).
SIZE_KEYS = ("dense_bytes_per_worker_per_step", "gtc_msg_bytes_mean", "gtc_msg_bytes_max",
             "elements_sent_per_step", "model_bytes")
FP32_BYTES = 4


def model_parameters(model_cfg: Mapping, input_dim: int) -> int:
    """Parameters of the acoustic model `model_cfg` (a conf/model entry), counted without memory."""
    import torch

    from asrbench.data import text
    from asrbench.model.lstm import LSTMAcousticModel

    with torch.device("meta"):
        model = LSTMAcousticModel(input_dim, text.vocab_size(), **{k: v for k, v in model_cfg.items() if k != "name"})
    return sum(p.numel() for p in model.parameters())


def project(rows: Sequence[Mapping], network: Mapping, profile: Mapping, parameters: int,
            overlap: float = 0.0) -> list[dict]:
    """Each run's speedup re-predicted for a model of `parameters` on the profile's device.

    What a run measured that does not depend on the model size is kept: the strategy, N, K,
    the group size and the fraction of gradient elements GTC sent. Byte and element counts scale
    with the parameter count; compute, GTC encode and decode rate come from `profile` (seconds
    per worker step on the target GPU). The step time is then the same cost model as a run's own
    prediction (asrbench.cluster.cost.step_time).
    """
    from asrbench.cluster import cost

    compute = float(profile["compute_s_per_worker_step"])
    out = []
    for r in rows:
        model = r.get("cost_model")
        if not model:
            continue
        stats = dict(model["stats"])
        scale = parameters / (stats["dense_bytes_per_worker_per_step"] / FP32_BYTES)
        for key in SIZE_KEYS:
            if key in stats:
                stats[key] *= scale
        gtc = "gtc_msg_bytes_mean" in stats
        if gtc and profile.get("decode_rate"):
            stats["decode_rate"] = float(profile["decode_rate"])
        encode = float(profile.get("gtc_encode_s_per_worker_step", 0.0)) if gtc else 0.0
        step = cost.step_time(r["strategy"], compute + encode, stats, r["nodes"], network, overlap=overlap)
        out.append({"strategy": r["strategy"], "nodes": r["nodes"], "parameters": parameters,
                    "compute_s": compute, "comm_s": step["comm_s"], "step_s": step["total_s"],
                    "comm_parts": cost.comm_parts(r["strategy"], stats, r["nodes"], network),
                    "predicted_speedup": cost.speedup(r["nodes"], step["total_s"], compute)})
    return out


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = sorted({r["strategy"] for r in rows})
    paths = []
    for key, fname, ylabel in (("predicted_speedup", "speedup.png", "speedup over one worker"),
                               ("rel_wer", "rel_wer.png", "relative WER change vs single worker (%)"),
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


def plot_wall_curves(runs: Mapping[str, tuple[Path, Mapping]], out_dir: Path) -> Path:
    """Dev WER against predicted wall time (step x predicted step time) for every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (run_dir, res) in runs.items():
        step_s = res.get("predicted_step_s") or res.get("train_time_s", 0) / max(res.get("steps", 1), 1)
        pts = [(h["step"] * step_s, h["val/wer"]) for h in report.read_history(run_dir) if "val/wer" in h]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("predicted wall time (s)")
    ax.set_ylabel("dev WER")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = out_dir / "wall_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(out_dir: Path, baseline: Mapping, results: Sequence[Mapping], run_dirs: Mapping[str, Path],
          network: str, wall_s: float, projection: Mapping | None = None
          ) -> tuple[Path, list[dict], float, list[dict], float]:
    """report.md + plots. `projection` (optional): {"rows": project(...), "model": name,
    "profile": path, "notes": text}: the same runs' speedups at the paper's model scale."""
    rows = rows_with_baseline(results, baseline)
    plots = plot_scaling(rows, out_dir)
    runs = {"single x1": (run_dirs["single"], baseline)}
    runs |= {f"{r['strategy']} x{r['nodes']}": (run_dirs[run_name(r['strategy'], r['nodes'])], r) for r in rows}
    plots.append(plot_wall_curves(runs, out_dir))
    errors, median = speedup_errors(rows)
    parts = [
        "# asrbench reproduce", "",
        f"Baseline: one worker, WER {baseline['wer'] * 100:.1f}% (CER {baseline['cer'] * 100:.1f}%). "
        f"Speedups are predicted by the cost model under the `{network}` network preset from the bytes "
        f"each run actually sent and its measured compute time per worker step. Relative WER is "
        f"measured: (WER - baseline WER) / baseline WER. Total wall time {wall_s / 60:.1f} min.", "",
        comparison_table(rows), "",
        f"Median relative error of our predicted speedups against the paper's: {median * 100:.0f}% "
        f"over {len(errors)} figures.", "",
    ]
    proj_errors, proj_median = [], math.nan
    if projection and projection["rows"]:
        proj_errors, proj_median = speedup_errors(projection["rows"])
        parts += [
            f"## Projected to the paper's scale ({projection['model']}, {projection['parameters'] / 1e6:.1f}M parameters)",
            "",
            f"The runs above train a small model on CPU, where compute dwarfs communication. Here each "
            f"run's measured communication pattern (strategy, N, K, group size, the fraction of elements "
            f"GTC sent) is re-costed for `{projection['model']}` with the compute profile "
            f"`{projection['profile']}` on the `{network}` network: bytes scale with the parameter count, "
            f"compute is the profile's seconds per worker step.", "",
            projection_table(projection["rows"]), "",
            f"Median relative error of the projected speedups against the paper's: {proj_median * 100:.0f}% "
            f"over {len(proj_errors)} figures.", "",
        ]
    parts += ["## All runs", "", report.markdown_table([report.with_relative(baseline, baseline), *rows]), ""]
    parts += [f"![{p.stem}]({p.name})" for p in plots]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path, rows, median, proj_errors, proj_median
