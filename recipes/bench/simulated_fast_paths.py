"""Simulated-cluster epochs before and after a change, against the bench's plain PyTorch epoch, in one run.

The three sides run alternately (``asrbench.bench_measure.alternate``): the simulated cluster of
revision `--before` (its ``asrbench/cluster/simulated.py``, loaded beside the current one), the
current cluster, and the single-worker plain loop of ``asrbench bench``'s simulated_epoch figure
(``bench_cases._single_worker_epoch``: loader, forward, CTC, backward, clip, Adam) over the same
utterances at the same per-worker batch. Each side's epoch covers the same forward/backward passes,
so each ratio to the plain loop is the cluster's own cost. The before side reads only the files of
that revision's simulated.py; the strategies and the model are the working tree's on both sides.

    nice -n 19 python recipes/bench/simulated_fast_paths.py --before 428b409 --nodes 16 --steps 100
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from asrbench.bench_cases import _single_worker_epoch
from asrbench.bench_inputs import GRADIENT_CLIP_VAL, acoustic_module, strategy_config, synthetic_features
from asrbench.bench_measure import alternate, quiet_lightning, set_threads
from asrbench.cluster import simulated as current
from asrbench.data.dataset import SpeechDataset
from asrbench.strategies import build_strategy

ROOT = Path(__file__).resolve().parents[2]


def module_at(revision: str, workdir: Path) -> ModuleType:
    """asrbench/cluster/simulated.py of `revision`, imported under its own name."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:asrbench/cluster/simulated.py"],
                            check=True, capture_output=True, text=True).stdout
    path = workdir / "simulated_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("simulated_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["simulated_before"] = module
    spec.loader.exec_module(module)
    return module


def simulated_epoch(sim: ModuleType, dataset: Any, model: str, strategy: str, nodes: int, batch_size: int,
                    seed: int, overrides: dict[str, Any]) -> float:
    """bench_cases._simulated_epoch with the cluster and loop of `sim`."""
    module = acoustic_module(model, world_size=nodes, seed=seed)
    cfg = strategy_config(strategy, batch_size) | overrides
    if "max_density" in cfg:
        cfg["max_density"] = None
    cluster = sim.SimulatedCluster(module, build_strategy(cfg, nodes=nodes, timeout_s=300), nodes,
                                   gradient_clip_val=GRADIENT_CLIP_VAL)
    loop = sim.LoopConfig(max_epochs=1, enable_progress_bar=False, gradient_clip_val=GRADIENT_CLIP_VAL)
    t0 = time.perf_counter()
    out = sim.fit(cluster, dataset, batch_size=batch_size, seed=seed, loop=loop)
    seconds = time.perf_counter() - t0
    assert out.steps * nodes * batch_size == len(dataset)
    return seconds


def parts(before: ModuleType, model: str, strategy: str, nodes: int, repetitions: int) -> dict[str, Any]:
    """CPU seconds (time.process_time: less sensitive to a loaded machine than wall time) of each
    changed part of one step, before and after, alternately: binding every worker's row, clipping
    the N rows, the optimizer step of the N rows. Medians over `repetitions`."""
    module = acoustic_module(model, world_size=nodes, seed=0)
    cfg = strategy_config(strategy, 1) | ({"max_density": None} if strategy == "gtc" else {})
    cluster = current.SimulatedCluster(module, build_strategy(cfg, nodes=nodes, timeout_s=300), nodes,
                                       gradient_clip_val=GRADIENT_CLIP_VAL)
    torch.manual_seed(0)
    cluster.G.copy_(torch.randn(1, cluster.numel).expand_as(cluster.G))
    binding = cluster.binding

    def timed(fn: Any) -> float:
        t0 = time.process_time()
        fn()
        return time.process_time() - t0

    def bind_before() -> None:
        for i in range(nodes):
            binding.bind(cluster.P[i], cluster.G[i])

    def bind_after() -> None:
        for i in range(nodes):
            binding.bind_views(cluster._P_views[i], cluster._G_views[i])

    g = cluster.group_size
    sides = {"bind": (bind_before, bind_after),
             "clip": (lambda: before.clip_rows(cluster.G, binding, 1e9, g), lambda: current.clip_rows(cluster.G, binding, 1e9, g)),
             "optimizer": (cluster.optimizer.step, cluster._step_representatives if cluster.step_representatives
                           else cluster.optimizer.step)}
    out = {}
    for name, (old, new) in sides.items():
        samples = alternate({"before": partial(timed, old), "after": partial(timed, new)}, repetitions)
        out[name] = {side: statistics.median(v) for side, v in samples.items()}
        print(f"{strategy} x{nodes} {model} {name}: before {out[name]['before'] * 1e3:.2f} ms, "
              f"after {out[name]['after'] * 1e3:.2f} ms (CPU)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision whose simulated.py is the before side")
    parser.add_argument("--strategies", nargs="+", default=["sync", "gtc", "bmuf"])
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per epoch")
    parser.add_argument("--batch-size", type=int, default=1, help="per worker")
    parser.add_argument("--model", default="lstm_tiny")
    parser.add_argument("--frames", type=int, nargs=2, default=[60, 140])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    parser.add_argument("--parts", action="store_true", help="time the changed parts of a step instead")
    args = parser.parse_args()
    set_threads(1)
    logging.disable(logging.WARNING)
    seed = 0
    if args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            before = module_at(args.before, Path(tmp))
            results = {s: parts(before, args.model, s, args.nodes, args.repetitions) for s in args.strategies}
        if args.out is not None:
            args.out.write_text(json.dumps(results, indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        before = module_at(args.before, Path(tmp))
        dataset = SpeechDataset(synthetic_features(Path(tmp), args.nodes * args.batch_size * args.steps,
                                                   args.frames, seed=seed))
        peer = partial(_single_worker_epoch, dataset, args.model, args.batch_size, seed)
        peer()  # warm-up
        results: dict[str, Any] = {"before": args.before, "nodes": args.nodes, "steps": args.steps,
                                   "batch_size": args.batch_size, "model": args.model, "machine": platform.node(),
                                   "torch": torch.__version__, "figures": {}}
        for strategy in args.strategies:
            overrides = {"tau": 0.01} if "gtc" in strategy else {}
            sides = {name: partial(simulated_epoch, sim, dataset, args.model, strategy, args.nodes,
                                   args.batch_size, seed, overrides)
                     for name, sim in (("before", before), ("after", current))}
            with quiet_lightning("asrbench.strategies", "asrbench.cluster"):
                sides["before"]()
                sides["after"]()  # warm-up: the (N, n) arrays' first touch
                samples = alternate(sides | {"plain": peer}, args.repetitions)
            fig = {side: statistics.median(v) for side, v in samples.items()}
            fig |= {"plain/before": statistics.median(p / b for p, b in zip(samples["plain"], samples["before"])),
                    "plain/after": statistics.median(p / a for p, a in zip(samples["plain"], samples["after"])),
                    "after/before": statistics.median(a / b for a, b in zip(samples["after"], samples["before"])),
                    "samples": samples}
            results["figures"][strategy] = fig
            print(f"{strategy}: before {fig['before']:.2f} s, after {fig['after']:.2f} s, plain {fig['plain']:.2f} s; "
                  f"plain/before {fig['plain/before']:.3f}, plain/after {fig['plain/after']:.3f}, "
                  f"after/before {fig['after/before']:.3f}", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
