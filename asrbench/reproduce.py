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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asrbench import report
from asrbench.cluster import trust
from asrbench.paper import PAPER_TABLE, paper_rel_wer_text, paper_value

log = logging.getLogger(__name__)


def run_name(strategy: str, nodes: int) -> str:
    return f"{strategy}_n{nodes}"


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
                    "predicted_speedup": cost.speedup(r["nodes"], step["total_s"],
                                                      compute + cost.step_overhead(network, "single"))})
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


def paper_projection(cfg: Any, results: Sequence[Mapping], conf_dir: str | Path) -> dict | None:
    """The runs' speedups re-costed at the paper's model size (cfg.projection; null to skip)."""
    from omegaconf import OmegaConf

    from asrbench.cluster.cost import load_compute_profile, load_network
    from asrbench.data.features import FeatureConfig
    from asrbench.errors import ConfigError

    proj = cfg.get("projection")
    if not proj or not results:
        return None
    model_file = Path(conf_dir) / "model" / f"{proj.model}.yaml"
    if not model_file.is_file():
        raise ConfigError(f"projection.model={proj.model}: no {model_file}; name a preset of conf/model/")
    model_cfg = OmegaConf.to_container(OmegaConf.load(model_file), resolve=True)
    input_dim = FeatureConfig(**results[0]["config"]["features"]).dim
    parameters = model_parameters(model_cfg, input_dim)
    profile = load_compute_profile(proj.compute_profile)
    rows = project(results, load_network(cfg.network), profile, parameters, overlap=float(proj.get("overlap", 0.0)))
    return {"model": proj.model, "parameters": parameters, "profile": str(proj.compute_profile),
            "compute_profile": profile, "network": cfg.network, "rows": rows}


def search_table(search: Mapping) -> str:
    lines = ["| strategy | candidate overrides | dev WER | test WER | GTC density | steps | |", "|" + "---|" * 7]
    for s, v in (search.get("strategies") or {}).items():
        for i, c in enumerate(v["candidates"]):
            dens = "-" if c.get("density") is None else f"{c['density'] * 100:.1f}%"
            lines.append(f"| {s} | `{' '.join(c['overrides']) or '(defaults)'}` | {c['dev_wer'] * 100:.1f}% | "
                         f"{c['test_wer'] * 100:.1f}% | {dens} | {c['steps']:,} | "
                         f"{'**winner**' if i == v['winner'] else ''} |")
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


def write(out_dir: Path, result: Mapping, network: str, projection: Mapping | None, setup: str,
          others: Sequence[tuple[str, Mapping]] = (), name: str = "this run") -> Path:
    """report.md (headline table, claims, search, convergence, speed) and its plots; `others`
    (name, reproduce.json) of finished reproduce runs go beside this one's claims."""
    cells = result["cells"]
    projected = {(p["strategy"], p["nodes"]): p["predicted_speedup"] for p in (projection or {}).get("rows", [])}
    first = result["first_seed_rows"]  # already relative to their seed's baseline
    plots = [plot_tradeoff(cells, projected, out_dir), plot_learning_curves(result["histories"], out_dir),
             *plot_scaling([c for c in cells if c["strategy"] != "single"], out_dir)]
    errors, median = speedup_errors(first)
    search = result.get("search") or {}
    n_seeds = len(result["seeds"])
    parts = [
        "# asrbench reproduce", "", setup, "",
        f"## Accuracy: mean ± sd over {n_seeds} seed{'s' if n_seeds > 1 else ''} (seeds {result['seeds']})", "",
        "Relative change = (WER - baseline WER) / baseline WER, each seed against its own single-worker "
        "baseline (same warm start, same data). WER on the first test set (unseen voices); the search "
        "looked at dev only. The last column is the relative change of dev loss over the last 20% of "
        "each run's steps (flat is near 0)." + FER_NOTES.get(result.get("fer"), ""), "",
        accuracy_table(cells, projected), "",
        "## The paper's claims", "",
        "Each claim is an ordering of relative WERs. The margin is (higher side) - (lower side) in "
        "points of relative WER, so a positive margin is the paper's order. It counts only when it is "
        "larger than the larger seed spread of the two sides (sd over seeds); otherwise *within noise*.", "",
        claims_table(result["claims"]), "",
    ]
    if others:
        parts += ["## Beside other settings", "",
                  "Relative WER (mean ± sd over seeds) and each claim's verdict (margin in points) in this run and "
                  "in the other finished reproduce runs named by `reproduce.compare_with`.", "",
                  settings_table([(name, result), *others]), ""]
    if search:
        cost = (f"{search.get('runs', '?')} runs at {search.get('nodes')} workers, seed {search.get('seed')}, "
                f"{search['run_s'] / 60:.1f} min of run time" if "run_s" in search else "reused from an earlier run")
        parts += ["## The knob search", "",
                  f"One search at one worker count on dev WER ({cost}); each strategy's winner is kept for "
                  f"every worker count and seed.", "", search_table(search), ""]
    all_rows = [r for rows in result["rows_by_seed"].values() for r in rows]
    parts += ["## Every run: steps and convergence", "", runs_table(all_rows), "",
              f"## Speed (seed {result['seeds'][0]}'s runs on this machine's simulated cluster)", "",
              comparison_table(first), "",
              f"Median relative error of our predicted speedups against the paper's: {median * 100:.0f}% "
              f"over {len(errors)} figures.", ""]
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
            f"Median relative error of the projected speedups against the paper's: {proj_median * 100:.0f}% "
            f"over {len(proj_errors)} figures.", ""]
    parts += [trust.report_section(result["first_seed_rows"], (projection or {}).get("rows", [])), ""]
    parts += [f"![{p.stem}]({p.name})" for p in plots]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Convergence, seeds and the paper's claims
# ---------------------------------------------------------------------------------------------
def dev_curve(history: Sequence[Mapping], key: str = "val/loss") -> list[tuple[int, float]]:
    """(step, value) of every validation in a run's metrics history that logged `key`."""
    return [(int(h["step"]), float(h[key])) for h in history
            if h.get(key) is not None and math.isfinite(float(h[key]))]


def convergence(curve: Sequence[tuple[int, float]], total_steps: int | None = None, tail: float = 0.2) -> dict:
    """How flat a run's dev curve ends: the relative change over its last `tail` of training.

    ``rel_change = (v_end - v_ref) / v_ref`` where v_ref is the last validation at or before
    step (1 - tail) x total (the first validation if none is that early) and v_end the last one.
    A run whose dev loss still falls ends with a clearly negative change; a flat curve near 0.
    """
    if not 0 < tail < 1:
        raise ValueError(f"Arg `tail` must be a fraction in (0, 1), got {tail}")
    total = int(total_steps or (curve[-1][0] if curve else 0))
    if len(curve) < 2:
        return {"rel_change": math.nan, "from_step": None, "to_step": None, "steps": total, "points": len(curve)}
    cut = (1 - tail) * total
    early = [(s, v) for s, v in curve[:-1] if s <= cut] or [curve[0]]
    ref_step, ref = early[-1]
    end_step, end = curve[-1]
    return {"rel_change": (end - ref) / abs(ref) if ref else math.nan, "from_step": ref_step, "to_step": end_step,
            "steps": total, "points": len(curve)}


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation is NaN for fewer than 2 values."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


Cell = tuple[str, int]  # (strategy, workers); the baseline is the cell ("single", 1), relative change 0


@dataclass(frozen=True)
class Claim:
    """One of the paper's accuracy claims as an ordering: `lower` ends with a smaller relative WER
    than `higher` (with several cells in `higher`, than the best of them, seed by seed)."""

    text: str
    lower: Cell
    higher: tuple[Cell, ...]
    paper: str


BASELINE: Cell = ("single", 1)
CLAIMS: tuple[Claim, ...] = (
    Claim("32 workers: GTC-BMUF below the baseline", ("gtc_bmuf", 32), (BASELINE,), "below baseline"),
    Claim("32 workers: GTC-BMUF < GTC", ("gtc_bmuf", 32), (("gtc", 32),), "below baseline vs +1.4%"),
    Claim("32 workers: GTC < BMUF", ("gtc", 32), (("bmuf", 32),), "+1.4% vs +3.5%"),
    Claim("64 workers: GTC < GTC-BMUF", ("gtc", 64), (("gtc_bmuf", 64),), "+2.8% vs +3.1%"),
    Claim("64 workers: GTC-BMUF < BMUF", ("gtc_bmuf", 64), (("bmuf", 64),), "+3.1% vs +8.9%"),
    Claim("128 workers: GTC-BMUF < BMUF", ("gtc_bmuf", 128), (("bmuf", 128),), "+4.7% vs +9.6%"),
    Claim("128 workers: BMUF < GTC", ("bmuf", 128), (("gtc", 128),), "+9.6% vs +15.6%"),
    Claim("trend: BMUF's loss grows from 32 to 64 workers", ("bmuf", 32), (("bmuf", 64),), "+3.5% vs +8.9%"),
    Claim("trend: BMUF's loss grows from 64 to 128 workers", ("bmuf", 64), (("bmuf", 128),), "+8.9% vs +9.6%"),
    Claim("trend: GTC collapses at 128 (worse than at 64)", ("gtc", 64), (("gtc", 128),), "+2.8% vs +15.6%"),
    Claim("trend: the hybrid is the most accurate at 128", ("gtc_bmuf", 128), (("gtc", 128), ("bmuf", 128)),
          "+4.7% vs +9.6% / +15.6%"),
)


def verdict(lower: Sequence[float], higher: Sequence[float]) -> dict:
    """Does `lower` end below `higher` (values per seed)? agrees, disagrees, or within noise.

    The margin is mean(higher) - mean(lower); it counts only when it exceeds the larger of the
    two seed spreads (sample standard deviations). With one seed there is no spread: the verdict
    is the sign alone, marked as such.
    """
    lo, lo_sd = mean_sd(lower)
    hi, hi_sd = mean_sd(higher)
    margin = hi - lo
    noise = max(lo_sd, hi_sd) if not (math.isnan(lo_sd) and math.isnan(hi_sd)) else math.nan
    if math.isnan(margin):
        word = "not measured"
    elif not math.isnan(noise) and abs(margin) <= noise:
        word = "within noise"
    else:
        word = "agrees" if margin > 0 else "disagrees"
    if word in ("agrees", "disagrees") and math.isnan(noise):
        word += " (one seed)"
    return {"verdict": word, "margin": margin, "noise": noise, "lower": lo, "higher": hi}


def judge_claims(per_seed: Mapping[Cell, Mapping[int, float]], claims: Sequence[Claim] = CLAIMS) -> list[dict]:
    """Every claim with our values (relative WER per seed, from `per_seed[cell][seed]`) and a verdict."""
    out = []
    for c in claims:
        if c.lower not in per_seed or any(h not in per_seed and h != BASELINE for h in c.higher):
            out.append({"claim": c.text, "paper": c.paper, "verdict": "not measured"})
            continue
        seeds = sorted(set(per_seed[c.lower]).intersection(*[per_seed[h] for h in c.higher if h != BASELINE]))
        lower = [per_seed[c.lower][s] for s in seeds]
        higher = [min(0.0 if h == BASELINE else per_seed[h][s] for h in c.higher) for s in seeds]
        out.append({"claim": c.text, "paper": c.paper, "seeds": len(seeds)} | verdict(lower, higher))
    return out


def _pct_pm(mean: float, sd: float, signed: bool = True) -> str:
    if math.isnan(mean):
        return "-"
    text = f"{mean * 100:+.1f}" if signed else f"{mean * 100:.1f}"
    return text + ("" if math.isnan(sd) else f" ± {sd * 100:.1f}") + "%"


def claims_table(judged: Sequence[Mapping]) -> str:
    lines = ["| claim | paper | ours: lower side | ours: higher side | margin | seed spread | verdict |",
             "|" + "---|" * 7]
    for j in judged:
        if j["verdict"] == "not measured":
            lines.append(f"| {j['claim']} | {j['paper']} | - | - | - | - | not measured |")
            continue
        noise = "-" if math.isnan(j["noise"]) else f"{j['noise'] * 100:.1f} pts"
        lines.append(f"| {j['claim']} | {j['paper']} | {j['lower'] * 100:+.1f}% | {j['higher'] * 100:+.1f}% | "
                     f"{j['margin'] * 100:+.1f} pts | {noise} | **{j['verdict']}** |")
    return "\n".join(lines)


def load_reproduce(path: str | Path) -> dict:
    """A finished reproduce's reproduce.json (the file, or the directory holding it)."""
    import json

    p = Path(path)
    p = p / "reproduce.json" if p.is_dir() else p
    if not p.is_file():
        from asrbench.errors import ConfigError

        raise ConfigError(f"compare_with: {path} holds no reproduce.json; name the directory of a finished "
                          f"asrbench reproduce")
    return json.loads(p.read_text())


def settings_table(settings: Sequence[tuple[str, Mapping]]) -> str:
    """Relative WER of every cell and the verdict of every claim, one column per finished reproduce.

    `settings` = [(name, reproduce.json content)]; a cell or claim a setting lacks reads "-"."""
    from asrbench.paper import paper_rel_wer_text

    names = [n for n, _ in settings]
    cells = {n: {(c["strategy"], int(c["nodes"])): c for c in r["cells"]} for n, r in settings}
    keys = list(dict.fromkeys(k for n in names for k in cells[n] if k[0] != "single"))
    lines = ["| strategy | workers | paper | " + " | ".join(names) + " |", "|" + "---|" * (3 + len(names))]
    for st, n in keys:
        row = [_pct_pm(cells[m][st, n]["rel_wer"], cells[m][st, n].get("rel_wer_sd", math.nan))
               if (st, n) in cells[m] else "-" for m in names]
        lines.append(f"| {st} | {n} | {paper_rel_wer_text(st, n)} | " + " | ".join(row) + " |")
    claims = {n: {j["claim"]: j for j in r.get("claims", [])} for n, r in settings}
    order = list(dict.fromkeys(c for n in names for c in claims[n]))
    lines += ["", "| claim | paper | " + " | ".join(names) + " |", "|" + "---|" * (2 + len(names))]
    for c in order:
        paper = next(claims[n][c]["paper"] for n in names if c in claims[n])
        row = []
        for n in names:
            j = claims[n].get(c)
            if j is None or j["verdict"] == "not measured":
                row.append("-")
            else:
                row.append(f"**{j['verdict']}** ({j['margin'] * 100:+.1f} pts)")
        lines.append(f"| {c} | {paper} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def aggregate(rows_by_seed: Mapping[int, Sequence[Mapping]]) -> list[dict]:
    """Mean and sd over seeds per (strategy, workers): WER, FER, their relative changes, steps,
    predicted speedup and the convergence statistic. Rows carry `rel_wer`/`rel_fer` against their
    own seed's baseline."""
    cells: dict[Cell, list[Mapping]] = {}
    for rows in rows_by_seed.values():
        for r in rows:
            cells.setdefault((r["strategy"], int(r["nodes"])), []).append(r)
    out = []
    for (strategy, nodes), rs in cells.items():
        row: dict[str, Any] = {"strategy": strategy, "nodes": nodes, "seeds": sorted(int(r["seed"]) for r in rs)}
        for key in ("wer", "fer", "rel_wer", "rel_fer", "predicted_speedup", "steps", "dev_loss_rel_change",
                    "bytes_sent_per_worker_per_step", "dev_wer"):
            row[key], row[f"{key}_sd"] = mean_sd([r.get(key) for r in rs])
        out.append(row)
    order = {"single": 0, "sync": 1, "gtc": 2, "bmuf": 3, "gtc_bmuf": 4}
    return sorted(out, key=lambda r: (order.get(r["strategy"], 9), r["nodes"]))


def accuracy_table(cells: Sequence[Mapping], projected: Mapping[Cell, float] | None = None) -> str:
    """The headline table: mean ± sd over seeds, with the paper's figures beside ours."""
    lines = ["| strategy | workers | seeds | WER | rel. WER (ours) | rel. WER (paper) | FER | rel. FER | "
             "speedup (projected) | speedup (paper) | steps | dev-loss change, last 20% |", "|" + "---|" * 12]
    for c in cells:
        s, n = c["strategy"], c["nodes"]
        paper_s = paper_value(s, n, "speedup")
        proj = (projected or {}).get((s, n))
        lines.append(
            f"| {s} | {n} | {len(c['seeds'])} | {_pct_pm(c['wer'], c['wer_sd'], False)} | "
            f"{_pct_pm(c['rel_wer'], c['rel_wer_sd'])} | {paper_rel_wer_text(s, n) if s != 'single' else '-'} | "
            f"{_pct_pm(c['fer'], c['fer_sd'], False)} | {_pct_pm(c['rel_fer'], c['rel_fer_sd'])} | "
            f"{'-' if proj is None else f'{proj:.1f}x'} | {_num(paper_s)}{'x' if paper_s else ''} | "
            f"{c['steps']:,.0f} | {_pct_pm(c['dev_loss_rel_change'], c['dev_loss_rel_change_sd'])} |")
    return "\n".join(lines)


def runs_table(rows: Sequence[Mapping]) -> str:
    """Every run: seed, steps, WER and the convergence statistic (the last 20% of its dev-loss curve)."""
    lines = ["| run | seed | steps | dev WER | test WER | FER | dev loss: from (step) | to (step) | change |",
             "|" + "---|" * 9]
    for r in rows:
        cv = r.get("convergence") or {}
        lines.append(
            f"| {r['strategy']} x{r['nodes']} | {r['seed']} | {r['steps']:,} | {r.get('dev_wer', math.nan) * 100:.1f}% | "
            f"{r['wer'] * 100:.1f}% | {_pct_pm(r.get('fer') or math.nan, math.nan, False)} | "
            f"{_num(cv.get('from_value'))} ({cv.get('from_step')}) | {_num(cv.get('to_value'))} ({cv.get('to_step')}) | "
            f"{_pct_pm(cv.get('rel_change', math.nan), math.nan)} |")
    return "\n".join(lines)


def plot_tradeoff(cells: Sequence[Mapping], projected: Mapping[Cell, float], out_dir: Path) -> Path:
    """tradeoff.png: relative WER (mean ± sd over seeds) against speedup, ours and the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, s in enumerate(("gtc", "bmuf", "gtc_bmuf")):
        ours = sorted((projected.get((c["strategy"], c["nodes"]), c["predicted_speedup"]), c["rel_wer"] * 100,
                       0 if math.isnan(c["rel_wer_sd"]) else c["rel_wer_sd"] * 100, c["nodes"])
                      for c in cells if c["strategy"] == s and not math.isnan(c["rel_wer"]))
        if ours:
            ax.errorbar([o[0] for o in ours], [o[1] for o in ours], yerr=[o[2] for o in ours], fmt="o-",
                        color=f"C{i}", capsize=3, label=f"{s} (ours)")
            for x, y, _, n in ours:
                ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=f"C{i}")
        paper = [(v["speedup"], 0.0 if v.get("below_baseline") else v["rel_wer"] * 100, n)
                 for n, v in sorted(PAPER_TABLE.get(s, {}).items())]
        ax.plot([p[0] for p in paper], [p[1] for p in paper], "x--", color=f"C{i}", label=f"{s} (paper)")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("speedup over one worker (ours: projected to the paper's scale)")
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
    import matplotlib

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
# Running it: warm starts, the knob search, the grid over strategies x workers x seeds
# ---------------------------------------------------------------------------------------------
def _train_job(conf_dir: str, overrides: list[str], run_dir: str, threads: int | None) -> dict:
    """One `asrbench train` run in a fresh process, logging to <run_dir>/train.log."""
    import os

    import torch
    from hydra import compose, initialize_config_dir

    from asrbench import experiment

    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("WANDB_SILENT", "true")  # W&B's banner per run stays in the run's own files
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        return experiment.train(cfg, path)
    finally:
        root.removeHandler(handler)
        handler.close()


@dataclass
class Job:
    name: str  # what the log calls it
    overrides: list[str]  # asrbench train overrides
    path: Path  # its run directory


class Runner:
    """Runs `train` jobs `parallel` at a time, each in its own process with `threads` torch threads
    (one thread per run on a small CPU: two threads per process on two busy cores ran a small LSTM
    100x slower, from spinning OpenMP threads). A job whose directory holds results.json is reused."""

    def __init__(self, conf_dir: str | Path, parallel: int, threads: int | None = 1) -> None:
        if parallel < 1 or (threads is not None and threads < 1):
            raise ValueError("Args `parallel` and `threads` must be positive values")
        self.conf_dir, self.parallel, self.threads = str(conf_dir), parallel, threads

    def run(self, jobs: Sequence[Job]) -> dict[str, dict]:
        import multiprocessing
        import shutil
        import time
        from concurrent.futures import ProcessPoolExecutor, as_completed

        done: dict[str, dict] = {}
        todo = []
        for job in jobs:
            if (job.path / "results.json").is_file():
                log.info("%s: finished before, reused", job.name)
                done[job.name] = report.load_results(job.path)
            elif job.name not in {j.name for j in todo}:
                todo.append(job)
        if not todo:
            return done
        for job in todo:  # what a stopped attempt left (curves, checkpoints) would mix into the new run
            if job.path.exists():
                shutil.rmtree(job.path)
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=min(self.parallel, len(todo)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_train_job, self.conf_dir, job.overrides, str(job.path), self.threads): job
                       for job in todo}
            try:
                for future in as_completed(futures):
                    job = futures[future]
                    res = done[job.name] = future.result()
                    log.info("%s: %d steps, dev WER %.1f%%, test WER %.1f%% (%.0f s; %d of %d done, %.0f s in)",
                             job.name, res["steps"], res["eval"]["dev"]["wer"] * 100, res["wer"] * 100,
                             res["wall_s"], sum(f.done() for f in futures), len(futures), time.perf_counter() - t0)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return done


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def pick_winner(candidates: Sequence[Mapping]) -> int:
    """The candidate with the lowest dev WER (the first of equals); test sets are never looked at."""
    return min(range(len(candidates)), key=lambda i: (candidates[i]["dev_wer"], i))


def load_search(path: str | Path) -> dict:
    """A finished search (search.json, or the reproduce directory holding search/search.json)."""
    import json

    p = Path(path)
    p = p / "search" / "search.json" if (p / "search" / "search.json").is_file() else p
    if not p.is_file():
        from asrbench.errors import ConfigError

        raise ConfigError(f"reproduce.search.reuse={path}: no search.json there; point it at a finished "
                          f"reproduce directory or its search/search.json")
    return json.loads(p.read_text())


def run_reproduce(cfg: Any, out: Path, conf_dir: str | Path) -> dict:
    """The whole experiment; returns reproduce.json's content and writes report.md with its plots."""
    import json
    import os
    import subprocess
    import sys
    import time

    from hydra import compose

    from asrbench import experiment, runinfo
    from asrbench.errors import ConfigError

    t0 = time.perf_counter()
    rc = cfg.reproduce
    seeds = [int(s) for s in rc.get("seeds") or [0]]
    epochs, warm = int(rc.epochs), int(rc.get("warm_start_epochs") or 0)
    if not 0 <= warm < epochs:
        raise ConfigError(f"reproduce.warm_start_epochs={warm} must be in [0, reproduce.epochs={epochs})")
    common = [*rc.overrides, f"logger={cfg.run_logger}", "experiment=reproduce", "trainer.enable_progress_bar=false",
              "cluster=simulated", f"cluster.network={cfg.network}"]
    threads = rc.get("threads_per_run")
    runner = Runner(conf_dir, int(rc.get("parallel") or os.cpu_count() or 1), int(threads) if threads else None)
    experiment.load_features(compose("train", overrides=common))  # corpus and features once, before any run
    single = ["strategy=single", "nodes=1"]
    tail = float(rc.get("convergence_tail", 0.2))
    fer = "alignment" if rc.get("fer") is True else rc.get("fer")  # true: the older name of alignment
    if fer not in (None, False, "phones", "alignment"):
        raise ConfigError(f"reproduce.fer={fer} is unknown; use phones (a phone probe against the synthesiser's "
                          f"timings), alignment (forced alignment with each seed's warm start) or false")
    if fer == "phones":  # every run, the warm starts included, trains the probe beside its CTC model
        common.append("data.phone_labels=true")

    # 1. one single-worker warm start per seed; every run of that seed continues from it
    warm_dir = {s: out / f"seed{s}" / "warm_start" for s in seeds}
    warm_results: dict[str, dict] = {}
    if warm:
        warm_results = runner.run([Job(f"seed{s} warm start", [*common, *single, f"seed={s}", f"trainer.max_epochs={warm}"],
                        warm_dir[s]) for s in seeds])
    start = {s: [f"init_from={warm_dir[s]}"] if warm else [] for s in seeds}
    rest = [f"trainer.max_epochs={epochs - warm}"]

    # 2. fer=alignment: each seed's runs are scored against the forced alignment of that seed's own
    # warm start (one reference per seed: a run and its baseline share it)
    if fer == "alignment" and warm:
        for s in seeds:
            align_dir = out / "align" / f"seed{s}"
            if not (align_dir / "align.json").is_file():
                log.info("== frame labels: forced alignment with %s", warm_dir[s])
                env = os.environ | {"OMP_NUM_THREADS": str(runner.parallel)}
                subprocess.run([sys.executable, "-m", "asrbench.cli", "align", f"run={warm_dir[s]}",
                                f"hydra.run.dir={align_dir}"], check=True, env=env, stdout=subprocess.DEVNULL)
            start[s].append(f"data.alignments={align_dir}")

    fixed = {s: list(rc.strategy_overrides.get(s, []) or []) for s in rc.strategies}
    baselines = [Job(f"seed{s} single", [*common, *single, f"seed={s}", *rest, *start[s]], out / f"seed{s}" / "single")
                 for s in seeds]

    # 3. the knob search at one worker count and seed, on dev; winners kept for every N
    search_cfg = rc.get("search")
    winners: dict[str, list[str]] = {s: [] for s in rc.strategies}
    search: dict[str, Any] = {}
    reused_paths: dict[tuple[str, int, int], Path] = {}
    if search_cfg and search_cfg.get("reuse"):
        search = load_search(to_absolute(search_cfg.reuse))
        winners |= {s: list(v["winner_overrides"]) for s, v in search["strategies"].items() if s in winners}
        runner.run(baselines)
    elif search_cfg:
        n_s, seed_s = int(search_cfg.nodes), int(search_cfg.seed)
        if seed_s not in seeds:
            raise ConfigError(f"reproduce.search.seed={seed_s} must be one of reproduce.seeds={seeds}")
        grid = {s: [list(c) for c in search_cfg.grid.get(s, []) or []] for s in rc.strategies}
        inherit = {s: dict(v) for s, v in (search_cfg.get("inherit") or {}).items()}
        search = {"nodes": n_s, "seed": seed_s, "strategies": {}}
        t_search = time.perf_counter()
        phases = [[s for s in rc.strategies if s not in inherit], [s for s in rc.strategies if s in inherit]]
        for k, phase in enumerate(phases):
            jobs, cands, jobs_of = [], {}, {}
            for s in phase:
                inherited = [o for src, keys in inherit.get(s, {}).items() for o in winners.get(src, [])
                             if _key(o) in set(keys)]
                cands[s] = [inherited + c for c in grid[s]] or [inherited]
                for i, cand in enumerate(cands[s]):
                    jobs_of.setdefault(s, []).append(Job(f"search {s} x{n_s} #{i}: {' '.join(cand) or 'defaults'}",
                                    [*common, f"strategy={s}", f"nodes={n_s}", f"seed={seed_s}", *rest,
                                     *start[seed_s], *fixed[s], *cand], out / "search" / f"{s}_{i}"))
                jobs += jobs_of[s]
            done = runner.run(jobs + (baselines if k == 0 else []))
            for s in phase:
                rows = [{"overrides": cand, "dev_wer": done[j.name]["eval"]["dev"]["wer"],
                         "test_wer": done[j.name]["wer"], "steps": done[j.name]["steps"], "run": str(j.path),
                         "density": _density(done[j.name]), "wall_s": done[j.name].get("wall_s")}
                        for cand, j in zip(cands[s], jobs_of[s])]
                best = pick_winner(rows)
                winners[s] = rows[best]["overrides"]
                reused_paths[(s, n_s, seed_s)] = Path(rows[best]["run"])
                search["strategies"][s] = {"candidates": rows, "winner": best, "winner_overrides": winners[s]}
        search["wall_s"] = time.perf_counter() - t_search  # of this invocation: reused runs cost nothing
        search["runs"] = sum(len(v["candidates"]) for v in search["strategies"].values())
        search["run_s"] = sum(c.get("wall_s") or 0.0 for v in search["strategies"].values() for c in v["candidates"])
        runinfo.write_json_atomic(out / "search" / "search.json", search)
    else:
        runner.run(baselines)

    # 4. every strategy x workers x seed, continuing from its seed's warm start
    jobs = []
    for seed in seeds:
        for s in rc.strategies:
            for n in rc.nodes:
                path = reused_paths.get((s, int(n), seed), out / f"seed{seed}" / run_name(s, int(n)))
                jobs.append(Job(f"seed{seed} {s} x{n}", [*common, f"strategy={s}", f"nodes={n}", f"seed={seed}", *rest,
                                                         *start[seed], *fixed[s], *winners[s]], path))
    done = runner.run(jobs + baselines)

    # 5. relative changes against the same seed's baseline, convergence, aggregation, report
    rows_by_seed: dict[int, list[dict]] = {}
    histories = []
    for seed in seeds:
        base_job = next(j for j in baselines if j.name == f"seed{seed} single")
        base = done[base_job.name]
        rows = []
        for job in [base_job, *(j for j in jobs if j.name.startswith(f"seed{seed} "))]:
            res = report.with_relative(done[job.name], base)
            history = report.read_history(job.path)
            curve = dev_curve(history)
            conv = convergence(curve, int(res["steps"]), tail)
            ref = dict(curve).get(conv["from_step"]) if conv["from_step"] is not None else None
            conv |= {"from_value": ref, "to_value": curve[-1][1] if curve else None}
            res |= {"convergence": conv, "dev_loss_rel_change": conv["rel_change"],
                    "dev_wer": res["eval"]["dev"]["wer"], "run_dir": str(job.path)}
            rows.append(res)
            histories.append((res, history))
        rows_by_seed[seed] = rows
    cells = aggregate(rows_by_seed)
    per_seed = {(r["strategy"], int(r["nodes"])): {} for rows in rows_by_seed.values() for r in rows}
    for seed, rows in rows_by_seed.items():
        for r in rows:
            per_seed[(r["strategy"], int(r["nodes"]))][seed] = r["rel_wer"]
    judged = judge_claims(per_seed)
    first = [r for r in rows_by_seed[seeds[0]] if r["strategy"] != "single"]
    # what this experiment trained: the warm starts, the grid, and the search runs (when it searched
    # itself rather than reusing another's) that the grid did not take over
    grid_paths = {j.path for j in jobs}
    searched = [c for v in search.get("strategies", {}).values() for c in v["candidates"]
                if reused_paths and Path(c["run"]) not in grid_paths]
    every = [*warm_results.values(), *(done[j.name] for j in [*jobs, *baselines])]
    return {"runs": len(every) + len(searched),
            "run_s": sum(r.get("wall_s") or 0.0 for r in every) + sum(c.get("wall_s") or 0.0 for c in searched),
            "seeds": seeds, "rows_by_seed": rows_by_seed, "cells": cells, "claims": judged, "search": search,
            "winners": winners, "histories": histories, "first_seed_rows": first,
            "baseline": rows_by_seed[seeds[0]][0], "wall_s": time.perf_counter() - t0, "fer": fer}


def to_absolute(path: Any) -> Path:
    from hydra.utils import to_absolute_path

    return Path(to_absolute_path(str(path)))


def _density(res: Mapping) -> float | None:
    sent, total = res.get("elements_sent_per_step"), res.get("elements_total_per_step")
    return sent / total if sent is not None and total else None


def describe_setup(cfg: Any, result: Mapping) -> str:
    """The report's first paragraph: what every run trained on, for how long, and the wall time."""
    rc = cfg.reproduce
    base = result["baseline"]
    return (f"`reproduce={rc.name}`: baseline and {', '.join(rc.strategies)} at {', '.join(map(str, rc.nodes))} "
            f"workers on the simulated cluster, seeds {result['seeds']}. Every run sees {rc.epochs} epochs of "
            f"data, the first {rc.get('warm_start_epochs') or 0} as one single-worker warm start per seed from "
            f"which every run of that seed continues. Overrides for every run: `{' '.join(rc.overrides)}`. "
            f"Baseline (seed {result['seeds'][0]}): WER {base['wer'] * 100:.1f}%, {base['steps']:,} steps. "
            f"{result['runs']} runs whose own wall times add up to {result['run_s'] / 60:.1f} min "
            f"({rc.get('parallel') or 1} at a time); this invocation took {result['wall_s'] / 60:.1f} min "
            f"(finished runs are reused).")
