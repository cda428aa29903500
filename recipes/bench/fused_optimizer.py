"""The simulated cluster's optimizer step with torch's fused Adam (``optim.fused``), against the default, in one run.

Three measurements, each side alternating with the others (``asrbench.bench_measure.alternate``):

* ``parts``: CPU seconds (``time.process_time``) of the optimizer step of the N rows of P, as
  :class:`asrbench.cluster.simulated.SimulatedCluster` takes it (every row for bmuf, each group's
  first row and a copy for sync/gtc), with three optimizers over the same rows: the default
  (``torch.optim.Adam``, a loop of whole-tensor operations per row on the CPU), ``foreach=True``
  and ``fused=True``. Medians over `--repetitions`.
* ``numerics``: after `--numeric-steps` steps on the same random gradients, fused over the (N, n)
  rows against fused per worker (one optimizer over each worker's own parameter tensors, as a gloo
  rank holds them: bitwise?) and against the default (largest absolute and relative difference).
* ``epochs``: an epoch of the simulated cluster with the default and with the fused optimizer,
  against the single-worker plain loop of ``asrbench bench``'s simulated_epoch figure
  (``bench_cases._single_worker_epoch``: loader, forward, CTC, backward, clip, default Adam) over
  the same utterances at the same per-worker batch; ratio = simulated epoch / plain epoch. CPU
  seconds too (one thread, the loader in process), as a loaded machine stretches wall time; the
  plain side's include building its module (about 15 ms of lstm_small's epoch of seconds).

    nice -n 19 python recipes/bench/fused_optimizer.py --nodes 16 --model lstm_small --out fused.json
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from asrbench.bench_cases import _single_worker_epoch
from asrbench.bench_inputs import GRADIENT_CLIP_VAL, acoustic_module, strategy_config, synthetic_features
from asrbench.bench_measure import alternate, quiet_lightning, set_threads
from asrbench.cluster.rows import RowBinding, build_worker_optimizer, row_parameters
from asrbench.cluster.simulated import LoopConfig, SimulatedCluster, fit
from asrbench.data.dataset import SpeechDataset
from asrbench.strategies import build_strategy

OPTIMIZERS = ("default", "foreach", "fused")


def cluster_of(model: str, strategy: str, nodes: int, batch_size: int, seed: int, fused: bool) -> SimulatedCluster:
    """The cluster of bench_cases._simulated_epoch, its optimizer fused or not."""
    module = acoustic_module(model, world_size=nodes, seed=seed)
    module.optim_cfg = module.optim_cfg | {"fused": fused}
    cfg = strategy_config(strategy, batch_size)
    if "max_density" in cfg:
        cfg["max_density"] = None  # speed is measured here, not τ: no density warnings
    if "gtc" in strategy:
        cfg["tau"] = 0.01
    return SimulatedCluster(module, build_strategy(cfg, nodes=nodes, timeout_s=300), nodes,
                            gradient_clip_val=GRADIENT_CLIP_VAL)


def parts(model: str, strategy: str, nodes: int, repetitions: int) -> dict[str, float]:
    """Median CPU seconds of the optimizer step of the N rows, per optimizer (one cluster, three
    optimizers over its rows, each swapped in for its own steps)."""
    cluster = cluster_of(model, strategy, nodes, 1, 0, fused=False)
    torch.manual_seed(0)
    cluster.G.copy_(torch.randn(1, cluster.numel).expand_as(cluster.G) * 1e-2)
    lr = cluster.optimizer.param_groups[0]["lr"]
    optimizers = {"default": cluster.optimizer, "foreach": torch.optim.Adam(cluster.rows, lr=lr, foreach=True),
                  "fused": torch.optim.Adam(cluster.rows, lr=lr, fused=True)}
    step = cluster._step_representatives if cluster.step_representatives else None

    def timed(optimizer: torch.optim.Optimizer) -> float:
        cluster.optimizer = optimizer
        t0 = time.process_time()
        step() if step is not None else optimizer.step()
        return time.process_time() - t0

    for optimizer in optimizers.values():  # warm-up: the state's first allocation
        timed(optimizer)
    samples = alternate({name: partial(timed, opt) for name, opt in optimizers.items()}, repetitions)
    out = {name: statistics.median(v) for name, v in samples.items()}
    out |= {f"default/{name}": statistics.median(d / s for d, s in zip(samples["default"], samples[name]))
            for name in ("foreach", "fused")}
    print(f"{strategy} x{nodes} {model} optimizer step: " + ", ".join(f"{k} {out[k] * 1e3:.1f} ms" for k in OPTIMIZERS)
          + f"; default/fused {out['default/fused']:.2f}x, default/foreach {out['default/foreach']:.2f}x (CPU)",
          flush=True)
    return out


def numerics(model: str, nodes: int, steps: int, seed: int = 0) -> dict[str, Any]:
    """Fused over the rows vs fused per worker, and fused vs the default, after `steps` Adam steps."""
    module = acoustic_module(model, world_size=nodes, seed=seed)
    binding = RowBinding(module.model)
    start = binding.flat()
    gen = torch.Generator().manual_seed(seed + 1)
    grads = [torch.randn(nodes, binding.numel, generator=gen) * 1e-2 for _ in range(steps)]

    def rows(fused: bool) -> torch.Tensor:
        P = start.expand(nodes, -1).clone()
        G = torch.zeros_like(P)
        params = row_parameters(P)
        for row, grad in zip(params, G.unbind(0)):
            row.grad = grad
        module.optim_cfg = module.optim_cfg | {"fused": fused}
        optimizer, _ = build_worker_optimizer(module, params)
        for g in grads:
            G.copy_(g)
            optimizer.step()
        return P

    def workers() -> torch.Tensor:
        out = []
        for i in range(nodes):
            params = [torch.nn.Parameter(v.clone()) for v in binding.views(start)]
            module.optim_cfg = module.optim_cfg | {"fused": True}
            optimizer, _ = build_worker_optimizer(module, params)  # as a rank's configure_optimizers builds it
            for g in grads:
                for p, v in zip(params, binding.views(g[i])):
                    p.grad = v.clone()
                optimizer.step()
            out.append(torch.cat([p.detach().reshape(-1) for p in params]))
        return torch.stack(out)

    fused, default, per_worker = rows(True), rows(False), workers()
    diff = (fused - default).abs()
    out = {"steps": steps, "nodes": nodes, "numel": binding.numel,
           "fused_rows_equal_per_worker": bool(torch.equal(fused, per_worker)),
           "fused_rows_vs_per_worker_max_abs": float((fused - per_worker).abs().max()),
           "fused_vs_default_max_abs": float(diff.max()),
           "fused_vs_default_rel_norm": float(diff.norm() / default.norm()),
           "fused_vs_default_fraction_differing": float((diff > 0).float().mean()),
           "moved_max_abs": float((default - start).abs().max())}
    print(f"numerics after {steps} steps: fused rows == fused per worker {out['fused_rows_equal_per_worker']}; "
          f"fused vs default max abs {out['fused_vs_default_max_abs']:.2e}, relative norm "
          f"{out['fused_vs_default_rel_norm']:.2e}, {out['fused_vs_default_fraction_differing']:.2%} of elements "
          f"differ (parameters moved up to {out['moved_max_abs']:.2e})", flush=True)
    return out


def simulated_epoch(dataset: Any, model: str, strategy: str, nodes: int, batch_size: int, seed: int,
                    fused: bool) -> float:
    """CPU seconds of one epoch of the cluster (bench_cases._simulated_epoch), its optimizer fused or not."""
    cluster = cluster_of(model, strategy, nodes, batch_size, seed, fused)
    loop = LoopConfig(max_epochs=1, enable_progress_bar=False, gradient_clip_val=GRADIENT_CLIP_VAL)
    t0 = time.process_time()
    out = fit(cluster, dataset, batch_size=batch_size, seed=seed, loop=loop)
    seconds = time.process_time() - t0
    assert out.steps * nodes * batch_size == len(dataset)
    return seconds


def cpu_seconds(fn: Any) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def epochs(args: argparse.Namespace, strategy: str, dataset: Any, plain: Any) -> dict[str, Any]:
    sides = {name: partial(simulated_epoch, dataset, args.model, strategy, args.nodes, args.batch_size, 0, fused)
             for name, fused in (("default", False), ("fused", True))}
    with quiet_lightning("asrbench.strategies", "asrbench.cluster"):
        sides["default"]()  # warm-up: the (N, n) arrays' first touch
        samples = alternate(sides | {"plain": plain}, args.repetitions)
    fig: dict[str, Any] = {side: statistics.median(v) for side, v in samples.items()}
    for side in ("default", "fused"):
        fig[f"{side}/plain"] = statistics.median(s / p for s, p in zip(samples[side], samples["plain"]))
    fig["default/fused"] = statistics.median(d / f for d, f in zip(samples["default"], samples["fused"]))
    fig["samples"] = samples
    print(f"{strategy} epoch (CPU): default {fig['default']:.2f} s, fused {fig['fused']:.2f} s, "
          f"plain {fig['plain']:.2f} s; "
          f"default/plain {fig['default/plain']:.3f}, fused/plain {fig['fused/plain']:.3f}, "
          f"default/fused {fig['default/fused']:.3f}", flush=True)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", nargs="+", default=["parts", "numerics", "epochs"],
                        choices=["parts", "numerics", "epochs"])
    parser.add_argument("--strategies", nargs="+", default=["bmuf", "sync"])
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--model", default="lstm_small")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per epoch (epochs)")
    parser.add_argument("--batch-size", type=int, default=1, help="per worker (epochs)")
    parser.add_argument("--frames", type=int, nargs=2, default=[60, 140], help="utterance lengths (epochs)")
    parser.add_argument("--numeric-steps", type=int, default=100)
    parser.add_argument("--numeric-nodes", type=int, default=4)
    parser.add_argument("--repetitions", type=int, default=15, help="parts; epochs take --epoch-repetitions")
    parser.add_argument("--epoch-repetitions", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    args = parser.parse_args()
    set_threads(1)
    logging.disable(logging.WARNING)
    results: dict[str, Any] = {"nodes": args.nodes, "model": args.model, "machine": platform.node(),
                               "torch": torch.__version__, "threads": 1}
    if "parts" in args.what:
        results["parts"] = {s: parts(args.model, s, args.nodes, args.repetitions) for s in args.strategies}
    if "numerics" in args.what:
        results["numerics"] = numerics(args.model, args.numeric_nodes, args.numeric_steps)
    if "epochs" in args.what:
        results |= {"steps": args.steps, "batch_size": args.batch_size, "frames": args.frames,
                    "repetitions": args.epoch_repetitions}
        with tempfile.TemporaryDirectory() as tmp:
            dataset = SpeechDataset(synthetic_features(Path(tmp), args.nodes * args.batch_size * args.steps,
                                                       args.frames, seed=0))
            plain = partial(cpu_seconds, partial(_single_worker_epoch, dataset, args.model, args.batch_size, 0))
            plain()  # warm-up
            args.repetitions = args.epoch_repetitions
            results["epochs"] = {s: epochs(args, s, dataset, plain) for s in args.strategies}
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
