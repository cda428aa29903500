"""Calibration of a network preset on this machine: time the collectives asrbench uses, fit the
preset's alpha and bandwidth on half of the points, predict the other half.

The cost model (:mod:`asrbench.cluster.cost`) prices every exchange with three collectives;
this module times exactly those with torch.distributed (gloo, or NCCL where CUDA is visible)
among n processes on this machine, one point per (collective, n, message size):

    ===========  ==============================================  ===============================
    collective   what asrbench sends                              model (cost.py)
    ===========  ==============================================  ===============================
    all_reduce   sync's gradient, BMUF's block-end model          ``ring_allreduce_time``
    all_gather   GTC: the 8-byte headers, then the messages      ``allgatherv_time`` (padded)
                 padded to the longest (here all of m bytes)
    broadcast    GTC-BMUF's block start within each group         ``broadcast_time``
    ===========  ==============================================  ===============================

Each point is timed the way nccl-tests times one: a few warm-up calls, then repetitions of a
loop of calls long enough to outlast the clock's noise (``min_time_s``); a repetition's time
per call is the slowest process's, and the point is the median repetition.

Fit. alpha (``latency_s``) and B (``bandwidth_Bps``) minimise the sum of squared log ratios
log(model / measured) over the fit points (relative error, so a 4 KB and a 32 MB point weigh
the same), by a grid over log alpha x log B refined around its best cell. The points alternate
by size within each (collective, n) curve: even-indexed sizes fit, odd-indexed ones are held out
and predicted. The written preset puts both levels (within and across machines) at the fitted
figures with one worker per machine, so every collective is charged them.
"""
from __future__ import annotations

import json
import math
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from asrbench.cluster import cost
from asrbench.errors import ConfigError

OPS = ("all_reduce", "all_gather", "broadcast")
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # as GTC calls it
HEADER_ELEMENTS = 2  # GTC's header: (message length, non-finite flag) as two int32
LATENCY_RANGE_S = (1e-8, 1.0)  # where the grid looks for alpha
BANDWIDTH_RANGE_BPS = (1e5, 1e13)  # and for B


# --- the model of one point -------------------------------------------------------------------

def model_time(op: str, nbytes: float, n: int, latency_s: float, bandwidth_Bps: float) -> float:
    """Seconds the cost model gives one collective of `nbytes` per worker among `n` workers."""
    if op == "all_reduce":
        return cost.ring_allreduce_time(nbytes, n, latency_s, bandwidth_Bps)
    if op == "all_gather":
        return cost.allgatherv_time(nbytes, nbytes, n, latency_s, bandwidth_Bps)
    if op == "broadcast":
        return cost.broadcast_time(nbytes, n, latency_s, bandwidth_Bps)
    raise ValueError(f"op={op!r} is unknown; use one of {', '.join(OPS)}")


def split(points: Sequence[Mapping[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(fit, held out): within each (op, n) curve sorted by size, even-indexed sizes fit, odd ones are held out."""
    fit_points, held_out = [], []
    curves: dict[tuple[str, int], list[dict]] = {}
    for p in points:
        curves.setdefault((p["op"], int(p["n"])), []).append(dict(p))
    for curve in curves.values():
        for i, p in enumerate(sorted(curve, key=lambda q: q["bytes"])):
            (fit_points if i % 2 == 0 else held_out).append(p)
    return fit_points, held_out


def _loss(points: Sequence[Mapping[str, Any]], latency_s: float, bandwidth_Bps: float) -> float:
    return sum(math.log(model_time(p["op"], p["bytes"], int(p["n"]), latency_s, bandwidth_Bps) / p["seconds"]) ** 2
               for p in points)


def fit(points: Sequence[Mapping[str, Any]], *, cells: int = 25, rounds: int = 8) -> tuple[float, float]:
    """(alpha s, B bytes/s) minimising the squared log ratios of model to measured times of `points`.

    A `cells` x `cells` grid over log alpha x log B, then `rounds` finer grids, each spanning
    two cells of the previous one around its best point.
    """
    if not points:
        raise ValueError("Arg `points` must hold at least one measured point")
    if any(not p["seconds"] > 0 for p in points):
        raise ValueError("every measured point needs seconds > 0")
    lo_a, hi_a = (math.log(v) for v in LATENCY_RANGE_S)
    lo_b, hi_b = (math.log(v) for v in BANDWIDTH_RANGE_BPS)
    best = (math.inf, 0.0, 0.0)
    for _ in range(rounds + 1):
        step_a, step_b = (hi_a - lo_a) / (cells - 1), (hi_b - lo_b) / (cells - 1)
        for i in range(cells):
            for j in range(cells):
                la, lb = lo_a + i * step_a, lo_b + j * step_b
                loss = _loss(points, math.exp(la), math.exp(lb))
                if loss < best[0]:
                    best = (loss, la, lb)
        _, la, lb = best
        lo_a, hi_a, lo_b, hi_b = la - step_a, la + step_a, lb - step_b, lb + step_b
    return math.exp(best[1]), math.exp(best[2])


def errors(points: Sequence[Mapping[str, Any]], latency_s: float, bandwidth_Bps: float) -> list[dict]:
    """Each point with the model's prediction and its relative error (predicted - measured) / measured."""
    out = []
    for p in points:
        predicted = model_time(p["op"], p["bytes"], int(p["n"]), latency_s, bandwidth_Bps)
        out.append(dict(p) | {"predicted": predicted, "rel_error": (predicted - p["seconds"]) / p["seconds"]})
    return out


def calibrate(points: Sequence[Mapping[str, Any]], *, per_collective: bool = False) -> dict[str, Any]:
    """Fit on half of `points`, predict the other half: the constants and the held-out errors.

    With several collectives, ``per_collective`` gives each its own fit as well (a diagnosis: a
    preset has one alpha and one B for all of them, so a spread here is error the preset keeps).
    """
    fit_points, held_out = split(points)
    latency, bandwidth = fit(fit_points)
    held = errors(held_out, latency, bandwidth)
    fitted = errors(fit_points, latency, bandwidth)
    abs_held = [abs(p["rel_error"]) for p in held]
    out = {"latency_s": latency, "bandwidth_Bps": bandwidth,
           "held_out_median_abs_error": statistics.median(abs_held) if abs_held else None,
           "held_out_worst_abs_error": max(abs_held) if abs_held else None,
           "fit_median_abs_error": statistics.median(abs(p["rel_error"]) for p in fitted),
           "fit_points": fitted, "held_out": held}
    ops = sorted({p["op"] for p in points})
    if len(ops) > 1 and not per_collective:
        out["per_collective"] = {op: {k: v for k, v in calibrate([p for p in points if p["op"] == op],
                                                                   per_collective=True).items()
                                      if k not in ("fit_points", "held_out")} for op in ops}
    return out


# --- measuring -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collective(op: str, numel: int, world: int, device: torch.device):
    """A no-argument callable running one `op` of `numel` fp32 elements per worker, as asrbench sends it."""
    x = torch.zeros(numel, device=device)
    if op == "all_reduce":
        return lambda: dist.all_reduce(x)
    if op == "broadcast":
        return lambda: dist.broadcast(x, src=0)
    header = torch.zeros(HEADER_ELEMENTS, dtype=torch.int32, device=device)
    headers = torch.empty(world * HEADER_ELEMENTS, dtype=torch.int32, device=device)
    gathered = torch.empty(world * numel, device=device)

    def gather() -> None:
        _all_gather_single(headers, header)
        _all_gather_single(gathered, x)

    return gather


def _slowest(seconds: float, device: torch.device) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _time_point(call, device: torch.device, repeats: int, min_time_s: float) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        call()
    sync()
    t0 = time.perf_counter()
    call()
    sync()
    once = _slowest(time.perf_counter() - t0, device)  # every process picks the same loop length
    iters = max(1, min(200, math.ceil(min_time_s / max(once, 1e-6))))
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        sync()
        times.append(_slowest((time.perf_counter() - t0) / iters, device))
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, backend: str, ops: Sequence[str], sizes: Sequence[int],
            repeats: int, min_time_s: float, out_path: str) -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        points = []
        for op in ops:
            for nbytes in sizes:
                call = _collective(op, max(1, nbytes // 4), world, device)
                seconds = _time_point(call, device, repeats, min_time_s)
                points.append({"op": op, "n": world, "bytes": max(1, nbytes // 4) * 4, "seconds": seconds})
        if rank == 0:
            Path(out_path).write_text(json.dumps(points))
    finally:
        dist.destroy_process_group()


def resolve_backend(backend: str) -> str:
    """gloo or nccl; auto picks nccl where CUDA is visible."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"calibrate.backend={backend!r} is unknown; use auto, gloo or nccl")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("calibrate.backend=nccl but no CUDA device is visible; use backend=gloo")
    return backend


def measure(world: int, *, ops: Sequence[str] = OPS, sizes: Sequence[int], repeats: int = 5,
            min_time_s: float = 0.02, backend: str = "gloo") -> list[dict]:
    """Time each op and size among `world` processes of this machine: [{op, n, bytes, seconds}]."""
    if backend == "nccl" and world > torch.cuda.device_count():
        raise ConfigError(f"calibrate.world_sizes: {world} NCCL processes need {world} GPUs, "
                          f"{torch.cuda.device_count()} are visible; lower world_sizes")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "points.json")
        mp.start_processes(_worker, args=(world, _free_port(), backend, list(ops), list(sizes), repeats, min_time_s,
                                          out), nprocs=world, join=True, start_method="spawn")
        return json.loads(Path(out).read_text())


def check_config(cfg: Mapping[str, Any]) -> None:
    """One clear error for each setting calibrate cannot run."""
    worlds, sizes, ops = list(cfg["world_sizes"]), list(cfg["sizes_bytes"]), list(cfg["ops"])
    if not worlds or any(int(w) < 2 for w in worlds):
        raise ConfigError(f"calibrate.world_sizes={worlds}: every collective needs at least 2 processes")
    if len(sizes) < 2 or any(int(s) < 4 for s in sizes):
        raise ConfigError(f"calibrate.sizes_bytes={sizes}: give at least 2 sizes (one to fit, one to predict) "
                          f"of 4 bytes or more")
    unknown = [op for op in ops if op not in OPS]
    if not ops or unknown:
        raise ConfigError(f"calibrate.ops={ops}: use some of {', '.join(OPS)}")
    if int(cfg["repeats"]) < 1:
        raise ConfigError(f"calibrate.repeats={cfg['repeats']} must be at least 1")


# --- the preset ------------------------------------------------------------------------------

def network_preset(name: str, result: Mapping[str, Any], *, backend: str, host: str = "") -> dict[str, Any]:
    """A conf/network preset from a calibration: both levels at the fitted figures, one worker per machine."""
    latency, bandwidth = float(result["latency_s"]), float(result["bandwidth_Bps"])
    worlds = sorted({int(p["n"]) for p in result["fit_points"]})
    sizes = sorted({int(p["bytes"]) for p in result["fit_points"] + result["held_out"]})
    median, worst = result["held_out_median_abs_error"], result["held_out_worst_abs_error"]
    return {
        "name": name,
        "latency_s": latency,
        "bandwidth_Bps": bandwidth,
        "gpus_per_machine": 1,
        "intra_latency_s": latency,
        "intra_bandwidth_Bps": bandwidth,
        "notes": (f"Measured by `asrbench calibrate` on {host or 'this machine'}: torch.distributed {backend}, "
                  f"{'/'.join(map(str, worlds))} processes on one machine, messages of {sizes[0]:,}-{sizes[-1]:,} "
                  f"bytes; alpha and B fitted on half of the points, the other half predicted with median "
                  f"|error| {median:.1%}, worst {worst:.1%}. One level: every process is its own 'machine'."),
        "calibration": {"backend": backend, "host": host,
                        "held_out_median_abs_error": median, "held_out_worst_abs_error": worst,
                        "fit_median_abs_error": result["fit_median_abs_error"],
                        "per_collective": dict(result.get("per_collective") or {}),
                        "points": [{k: p[k] for k in ("op", "n", "bytes", "seconds", "predicted", "rel_error")}
                                   | {"held_out": held} for held, group in ((False, result["fit_points"]),
                                                                            (True, result["held_out"]))
                                   for p in group]},
    }


def write_network(path: str | Path, preset: Mapping[str, Any]) -> Path:
    """Write `preset` as yaml (loadable by `cluster.network=PATH`); checks that it loads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(dict(preset))))
    cost.load_network(str(path))
    return path


def markdown(result: Mapping[str, Any], preset: Mapping[str, Any]) -> str:
    """The fitted constants and every point, fit and held out, as a Markdown report."""
    lines = [f"# Network calibration: {preset['name']}", "",
             f"alpha (latency_s) = {result['latency_s'] * 1e6:.1f} us, "
             f"B (bandwidth_Bps) = {result['bandwidth_Bps'] / 1e9:.3g} GB/s", "",
             f"Held-out predictions: median |error| {result['held_out_median_abs_error']:.1%}, "
             f"worst {result['held_out_worst_abs_error']:.1%} (fit points: median "
             f"{result['fit_median_abs_error']:.1%})", "",
             "| collective | n | bytes | measured | predicted | error | |", "|" + "---|" * 7]
    rows = [(p, "fit") for p in result["fit_points"]] + [(p, "held out") for p in result["held_out"]]
    for p, kind in sorted(rows, key=lambda r: (r[0]["op"], r[0]["n"], r[0]["bytes"])):
        lines.append(f"| {p['op']} | {p['n']} | {p['bytes']:,} | {p['seconds'] * 1e3:.3f} ms | "
                     f"{p['predicted'] * 1e3:.3f} ms | {p['rel_error']:+.1%} | {kind} |")
    if result.get("per_collective"):
        lines += ["", "Each collective fitted alone (a preset has one alpha and one B for all of them):", "",
                  "| collective | alpha | B | held-out median | held-out worst |", "|" + "---|" * 5]
        for op, r in result["per_collective"].items():
            lines.append(f"| {op} | {r['latency_s'] * 1e6:.1f} us | {r['bandwidth_Bps'] / 1e9:.3g} GB/s | "
                         f"{r['held_out_median_abs_error']:.1%} | {r['held_out_worst_abs_error']:.1%} |")
    return "\n".join(lines) + "\n"


def run(cfg: Mapping[str, Any], out_dir: Path, *, host: str = "") -> dict[str, Any]:
    """`asrbench calibrate`: measure, fit, predict; write network.yaml, calibrate.json and calibrate.md."""
    check_config(cfg)
    backend = resolve_backend(str(cfg.get("backend", "auto")))
    points: list[dict] = []
    for world in cfg["world_sizes"]:
        points += measure(int(world), ops=list(cfg["ops"]), sizes=[int(s) for s in cfg["sizes_bytes"]],
                          repeats=int(cfg["repeats"]), min_time_s=float(cfg["min_time_s"]), backend=backend)
    result = calibrate(points)
    preset = network_preset(str(cfg["name"]), result, backend=backend, host=host)
    preset["calibration"]["load_average"] = [round(v, 2) for v in os.getloadavg()]  # 1, 5, 15 min, at the end
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [write_network(out_dir / "network.yaml", preset)]
    if cfg.get("save_as"):
        paths.append(write_network(cfg["save_as"], preset))
    (out_dir / "calibrate.json").write_text(json.dumps(result | {"backend": backend, "load_average": os.getloadavg()},
                                                       indent=1))
    (out_dir / "calibrate.md").write_text(markdown(result, preset))
    return result | {"backend": backend, "network_files": [str(p) for p in paths]}
