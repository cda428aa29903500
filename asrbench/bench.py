"""`asrbench bench`: the speed of asrbench's paths, measured against plain PyTorch and Lightning peers.

Every figure is a ratio of two sides timed in one run on one machine. The sides alternate
(A B B A A B ...), so that whatever else loads the machine hits both alike; each repetition gives
one ratio of neighbouring samples and the figure is the median of those ratios. Torch's
intra-op threads are set explicitly (``threads`` for the figures run in this process,
``threads_per_process`` for each gloo worker) and recorded with the host, the package versions
and the git commit.

    ================  =========================================  ==================================  =======
    figure            ours                                       peer                                goal
    ================  =========================================  ==================================  =======
    sync_step         SyncStrategy, time per optimizer step,     Lightning's DDPStrategy             <= 1.02
                      2 gloo workers
    gtc_step          GTCStrategy, 4 gloo workers                SyncStrategy, 4 gloo workers        <= 1.3
    gtc_step_gpu      the same on NCCL (needs >= 2 GPUs)         SyncStrategy on NCCL                <= 1.3
    codec_<strategy>  a strategy's per-step codec (GTC's encode  one torch.add pass over them        <= 4
    _<setting>        + decode, ...) on 10M fp32 elements
    simulated_epoch_  an epoch of 128 simulated workers of one   one worker's epoch, same data and   <= 1.3
    <strategy>        strategy                                   per-worker batch
    data_wait         time waiting for batches (warm cache)      the epoch's time                    <= 0.05
    model_cpu         LSTMAcousticModel training, frames/s       bare nn.LSTM + nn.Linear loop       >= 0.95
    model_gpu         lstm_paper training on the GPU, frames/s   bare cuDNN nn.LSTM + nn.Linear      >= 0.8
    ================  =========================================  ==================================  =======

A figure the machine cannot run (the GPU ones without CUDA) is kept in the table as skipped,
with the reason.

The multi-process figures start their workers once (from a fork server, like the tests) and
run every repetition of both sides inside them: each side is a fresh ``Trainer.fit`` on a fresh
strategy in the same process group, on fixed synthetic batches, timed from the end of the
warm-up steps to the last step on rank 0. The single-process figures build their data from
synthetic features written in the feature cache's own format (fp16 shards read through mmap).

Modules: :mod:`asrbench.bench_measure` (a figure, the alternation of sides, the worker
processes), :mod:`asrbench.bench_inputs` (configs, synthetic batches and features, the module
under test), :mod:`asrbench.bench_cases` (how each figure is measured) and this one (the run over
a preset, bench.json and bench.md). Every name they define that callers use is importable from
here.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from asrbench import runinfo
# Re-exported: the names callers and tests have always imported from here.
from asrbench.bench_cases import (EPOCH_ACTION, FETCH_ACTION, ActionClock, _ctc, _fit_steps,  # noqa: F401
                                  _make_strategy, _simulated_epoch, _single_worker_epoch, _strategy_worker,
                                  _train_steps, bench_codec, bench_data_pipeline, bench_model, bench_simulated,
                                  bench_strategy_steps, model_steps)
from asrbench.bench_inputs import (CONF, GRADIENT_CLIP_VAL, INPUT_DIM, OPTIM, FixedBatches,  # noqa: F401
                                   acoustic_module, model_config, strategy_config, synthetic_batch,
                                   synthetic_features)
from asrbench.bench_measure import (PRELOAD, BenchError, Figure, _process_main, alternate,  # noqa: F401
                                    free_port, quiet_lightning, run_processes, set_threads, summarize)
from asrbench.errors import ConfigError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The whole bench
# ---------------------------------------------------------------------------------------------
FIGURES = ("sync_step", "gtc_step", "gtc_step_gpu", "codec", "simulated_epoch", "data_wait", "model_cpu", "model_gpu")


def _section(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A figure's own keys over the preset's shared ones (repetitions, seed, threads...)."""
    shared = {k: v for k, v in cfg.items() if not isinstance(v, Mapping)}
    return shared | dict(cfg[name])


def run(cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Measure every figure the preset `cfg` enables; write `<out_dir>/bench.json` and `bench.md`."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = list(cfg.get("figures") or FIGURES)
    unknown = sorted(set(wanted) - set(FIGURES))
    if unknown:
        raise ConfigError(f"bench.figures has unknown names {unknown}; pick from {', '.join(FIGURES)}")
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]  # other work on the machine shows up here and in every figure
    threads_before = torch.get_num_threads()
    threads = set_threads(int(cfg["threads"]))
    figures: list[Figure] = []
    scratch = tempfile.TemporaryDirectory(dir=out_dir, prefix=".bench-data-")  # synthetic shards, removed after
    workdir = Path(scratch.name)
    try:
        for name in wanted:
            log.info("bench: %s", name)
            t_fig = time.perf_counter()
            if name == "sync_step":
                section = _section(cfg, "strategy_step")
                new = [bench_strategy_steps("sync_step", section["dense"], "ddp", int(section["sync_workers"]),
                                            section, goal=1.02, diagnostic="ddp_again")]
            elif name in ("gtc_step", "gtc_step_gpu"):
                gpu = name == "gtc_step_gpu"
                section = _section(cfg, "strategy_step_gpu" if gpu and "strategy_step_gpu" in cfg else "strategy_step")
                workers = int(section["gtc_workers"])
                if gpu and torch.cuda.is_available():
                    workers = max(2, min(workers, torch.cuda.device_count()))
                new = [bench_strategy_steps(name, section["compressed"], section["dense"], workers, section, goal=1.3,
                                            accelerator="gpu" if gpu else "cpu")]
            elif name == "codec":
                new = bench_codec(_section(cfg, "codec"), threads)
            elif name == "simulated_epoch":
                new = bench_simulated(_section(cfg, "simulated"), workdir, threads)
            elif name == "data_wait":
                new = [bench_data_pipeline(_section(cfg, "data_pipeline"), workdir, threads)]
            else:
                new = [bench_model(_section(cfg, "model_throughput"), threads,
                                   device="cuda" if name == "model_gpu" else "cpu")]
            for figure in new:
                figure.detail["wall_s"] = time.perf_counter() - t_fig
                log.info("bench: %s", row_text(figure))
            figures += new
            torch.set_num_threads(threads)
    finally:
        torch.set_num_threads(threads_before)
        scratch.cleanup()
    results = {"preset": cfg.get("name"), "figures": [f.as_dict() for f in figures],
               "passed": all(f.passed is not False for f in figures),
               "threads": {"in_process": threads, "per_worker_process": int(cfg["strategy_step"]["threads_per_process"])
                           if "strategy_step" in cfg else None},
               "host": runinfo.host() | {"load_avg_1m": {"start": load_start, "end": os.getloadavg()[0]}},
               "versions": runinfo.versions(), "git_commit": runinfo.git_commit(),
               "wall_s": time.perf_counter() - t0, "config": cfg}
    runinfo.write_json_atomic(out_dir / "bench.json", results)
    (out_dir / "bench.md").write_text(markdown(results))
    return results


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit.startswith("s"):
        scaled, prefix = (value * 1e3, "ms") if value < 1 else (value, "s")
        return f"{scaled:.3g} {prefix}{unit[1:]}"
    return f"{value:,.0f} {unit}" if abs(value) >= 100 else f"{value:.3g} {unit}"


def row_text(figure: Figure) -> str:
    if figure.skipped or figure.error:
        return f"{figure.name}: {'skipped' if figure.skipped else 'FAILED'} ({figure.skipped or figure.error})"
    return (f"{figure.name}: ours {_number(figure.ours, figure.unit)}, peer {_number(figure.peer, figure.unit)}, "
            f"ratio {figure.ratio:.3f} (goal {figure.goal_text}) {'pass' if figure.passed else 'FAIL'}")


def markdown(results: Mapping[str, Any]) -> str:
    """bench.md: the table of figures, then the machine, threads, versions and commit."""
    rows = ["| figure | what | ours | peer | ratio | goal | result |", "|---|---|---|---|---|---|---|"]
    for f in results["figures"]:
        if f["skipped"] or f["error"]:
            result = f"skipped: {f['skipped']}" if f["skipped"] else f"FAIL: {f['error']}"
            rows.append(f"| {f['name']} | {f['what']} | - | - | - | {f['goal_text']} | {result} |")
            continue
        threads = f"{f['processes']} x {f['threads']} thread(s)" if f["processes"] > 1 else f"{f['threads']} thread(s)"
        rows.append(f"| {f['name']} | {f['what']}; {threads}, median of {f['repetitions']} | "
                    f"{_number(f['ours'], f['unit'])} | {_number(f['peer'], f['unit'])} | {f['ratio']:.3f} | "
                    f"{f['goal_text']} | {'pass' if f['passed'] else 'FAIL'} |")
    notes = []
    for f in results["figures"]:
        shown = {k: v for k, v in f["detail"].items() if k not in ("wall_s", "sides")}
        if shown:
            notes.append(f"- {f['name']}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in shown.items()))
    host = results["host"]
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    threads = results["threads"]
    return "\n".join([
        f"# asrbench bench ({results['preset']})", "",
        *rows, "", *notes, *([""] if notes else []),
        f"- machine: {host.get('node')} ({host.get('machine')}, {host.get('cpus')} CPUs"
        f"{', ' + host['gpu'] if host.get('gpu') else ''}); 1-minute load average {host['load_avg_1m']['start']:.2f} "
        f"at the start, {host['load_avg_1m']['end']:.2f} at the end",
        f"- torch threads: {threads['in_process']} in this process; {threads['per_worker_process']} per worker "
        f"process in the multi-process figures",
        f"- versions: {versions}",
        f"- git commit: {results['git_commit']}",
        f"- wall time: {results['wall_s']:.0f} s", ""])
