"""The Hydra apps behind `asrbench <command>`; each has its own primary config in conf/<command>.yaml."""
from __future__ import annotations

import errno
import logging
import os
import pickle
import sys
import time
from functools import wraps
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from asrbench import bench as benchmarks
from asrbench import experiment, report, runinfo
from asrbench import reproduce as rep
from asrbench.checkpoint import Interrupted
from asrbench.cluster import calibrate as cal
from asrbench.data.corpus import scan_split
from asrbench.data.features import FeatureConfig
from asrbench.data.librispeech import load_word_timings
from asrbench.errors import AsrbenchError, CheckpointError, ConfigError
from asrbench.model.align import align_split, boundary_accuracy, write_alignments
from asrbench.model.module import AcousticModule

log = logging.getLogger("asrbench")
CONF = str(Path(__file__).resolve().parents[1] / "conf")


def user_errors(fn):
    """Report an AsrbenchError as one line on stderr and exit 2, with no traceback."""

    @wraps(fn)
    def wrapper(cfg: DictConfig):
        try:
            return fn(cfg)
        except AsrbenchError as err:
            code = getattr(err, "exit_code", 2)
            if not (isinstance(err, Interrupted) and _rank() > 0):  # rank 0 speaks for an agreed stop
                print(f"error: {err}", file=sys.stderr)
            sys.exit(code)
        except KeyboardInterrupt:
            print("error: interrupted (Ctrl-C) before a checkpoint could be saved", file=sys.stderr)
            sys.exit(130)
        except OSError as err:
            message = output_error(err)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper


_OUTPUT_ERRNOS = {errno.ENOSPC: "free space on that disk", errno.EDQUOT: "free space within your quota",
                  errno.EROFS: "make it writable", errno.EACCES: "make it writable",
                  errno.EPERM: "make it writable", errno.ENOTDIR: "remove the file in the way"}


def output_error(err: OSError) -> str | None:
    """One line for a disk fault (full, read-only, no permission), or None for other OS errors."""
    advice = _OUTPUT_ERRNOS.get(err.errno)
    if advice is None:
        return None
    where = err.filename or "the output directory"
    return (f"{where}: {err.strerror or os.strerror(err.errno)}; {advice} or write elsewhere with "
            f"hydra.run.dir=DIR (checkpoints already written stay valid for resume=)")


def _rank() -> int:
    """0 in global rank 0's process (under torchrun, srun or Lightning's launcher), 1 in any other."""
    from asrbench.checkpoint import launching_process

    return 0 if launching_process() else 1


def run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


# Loggers of other packages whose lines belong in a run's log file, not on its console: Lightning's
# banners, tips and per-rank "Initializing distributed", torch's notices (cpp_extension's "No CUDA
# runtime is found"), and Python warnings (py.warnings).
THIRD_PARTY_LOGGERS = ("lightning", "torch", "py.warnings")
PACKAGE_DIR = str(Path(__file__).resolve().parent)


def on_console(record: logging.LogRecord) -> bool:
    """A record for the console: any error, asrbench's own lines, and warnings raised at a line of
    asrbench; other packages' lines below ERROR and warnings raised in their code go to the log file."""
    if record.levelno >= logging.ERROR:
        return True
    if record.name == "py.warnings":
        return record.getMessage().startswith(PACKAGE_DIR)  # "<file>:<line>: ..." (warnings.formatwarning)
    return not _third_party(record.name)


def _third_party(name: str) -> bool:
    return any(name == party or name.startswith(f"{party}.") for party in THIRD_PARTY_LOGGERS)


def third_party_to_log_file() -> None:
    """Send other packages' log lines and warnings to the run's log file (Hydra's `<run dir>/<app>.log`,
    each rank its own) and keep them off the console (:func:`on_console`). A run without a log file
    (hydra/job_logging=disabled) is left as it is."""
    root = logging.getLogger()
    if not any(isinstance(h, logging.FileHandler) for h in root.handlers):
        return
    for name in [n for n in [*THIRD_PARTY_LOGGERS, *logging.root.manager.loggerDict] if _third_party(n)]:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]:
            logger.removeHandler(handler)  # Lightning's and torch's own stderr handlers
        logger.propagate = True
    for handler in root.handlers:
        if not isinstance(handler, logging.FileHandler) and isinstance(handler, logging.StreamHandler):
            handler.addFilter(on_console)
    logging.captureWarnings(True)


# ---------------------------------------------------------------- prepare
@hydra.main(config_path=CONF, config_name="prepare", version_base="1.3")
@user_errors
def prepare(cfg: DictConfig) -> None:
    t0 = time.perf_counter()
    feats = experiment.load_features(cfg, progress=True)
    for name, split in feats.items():
        log.info("%-10s %6d utterances %9d stacked frames", name, len(split), int(split.lengths.sum()))
    log.info("corpus and features ready in %.1f s", time.perf_counter() - t0)


# ---------------------------------------------------------------- train
def close_process_group() -> None:
    """Each rank's own teardown of torch.distributed once its part of the run is over (a local call, no
    collective: a rank other than 0 returns from training while rank 0 still evaluates). Left to the
    interpreter's exit, Gloo's worker threads were destroyed still joinable now and then: "terminate called
    without an active exception", SIGABRT (exit 134) after results.json was written, which SLURM counts as
    the job failing (recipes/slurm/check.sh, 2026-12-07)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@hydra.main(config_path=CONF, config_name="train", version_base="1.3")
@user_errors
def train(cfg: DictConfig) -> None:
    third_party_to_log_file()
    try:
        results = experiment.train(cfg, run_dir())
    finally:
        close_process_group()
    if results:
        rows = [results]
        baseline = cfg.get("baseline")
        if baseline:
            rows = [report.with_relative(results, report.load_results(Path(to_absolute_path(baseline))))]
        print(report.markdown_table(rows))
        print(f"results: {run_dir() / 'results.json'}")


# ---------------------------------------------------------------- eval
def load_run(run: str) -> tuple[Path, DictConfig, dict]:
    """A finished run's directory, resolved config and results."""
    path = Path(to_absolute_path(run))
    results = report.load_results(path)
    return path, OmegaConf.create(results["config"]), results


def checkpoint_of(run_path: Path, results: dict) -> Path:
    """The checkpoint to load for a finished run: its own checkpoints/last.ckpt when there, else the
    path results.json names. A named path outside the run dir that does not exist is refused: the
    run was moved or its results.json came from elsewhere, and no other run's model is guessed at."""
    own = run_path / "checkpoints" / "last.ckpt"
    if own.is_file() or not results.get("checkpoint"):
        return own
    named = Path(str(results["checkpoint"]))
    if not named.exists() and not named.resolve().is_relative_to(run_path.resolve()):
        raise CheckpointError(f"{run_path / 'results.json'}: names checkpoint {named}, outside the run dir and "
                              f"missing; put the run's checkpoint at {own} or re-run training")
    return named


def load_model(run_path: Path, results: dict) -> torch.nn.Module:
    ckpt_path = checkpoint_of(run_path, results)
    if not ckpt_path.is_file():
        raise CheckpointError(f"{ckpt_path}: checkpoint missing; re-run training or pass a run dir with checkpoints/")
    try:
        # a damaged file's bytes raise whatever the unpickler meets (UnpicklingError, EOFError, IndexError ...)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        module = AcousticModule(**ckpt["hyper_parameters"])
        module.load_state_dict(ckpt["state_dict"])
    except (pickle.UnpicklingError, RuntimeError, KeyError, IndexError, EOFError, OSError, TypeError,
            ValueError, AttributeError) as err:
        raise CheckpointError(f"{ckpt_path}: not a loadable asrbench checkpoint ({type(err).__name__}); "
                              f"re-run training to write it again") from None
    return module.model


@hydra.main(config_path=CONF, config_name="eval", version_base="1.3")
@user_errors
def evaluate(cfg: DictConfig) -> None:
    if not cfg.run:
        raise ConfigError("eval needs run=DIR (a finished `asrbench train` run dir)")
    run_path, run_cfg, old = load_run(cfg.run)
    overrides = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if v is not None}
    if overrides:  # evaluate on other data / with alignments
        run_cfg.data = OmegaConf.merge(run_cfg.data, overrides)
    run_cfg.eval_batch_size = cfg.eval_batch_size
    model = load_model(run_path, old)
    feats = experiment.load_features(run_cfg)
    frame_labels = experiment.load_frame_labels(run_cfg, feats)
    out = run_dir()
    res = old | experiment.evaluate_all(model, feats, frame_labels, run_cfg, out)
    res["evaluated_by"] = {"git_commit": runinfo.git_commit(), "versions": runinfo.versions()}
    baseline = load_run(cfg.baseline)[::2] if cfg.baseline else None  # (dir, results)
    rows, histories = report.rows_and_histories([(run_path, res)], baseline, show_baseline=True)
    runinfo.write_json_atomic(out / "results.json", rows[-1])
    show(report.write_report(out, rows, histories))


def show(md: Path) -> None:
    """Print a written report and where it is."""
    print(md.read_text())
    print(f"report: {md}")


# ---------------------------------------------------------------- report
@hydra.main(config_path=CONF, config_name="report", version_base="1.3")
@user_errors
def report_runs(cfg: DictConfig) -> None:
    if not cfg.runs:
        raise ConfigError("report needs runs=[DIR,...] (finished `asrbench train` run dirs)")
    paths = [Path(to_absolute_path(str(run))) for run in cfg.runs]
    base_path = Path(to_absolute_path(cfg.baseline)) if cfg.baseline else None
    rows, histories = report.rows_and_histories([(p, report.load_results(p)) for p in paths],
                                                (base_path, report.load_results(base_path)) if base_path else None)
    out = run_dir()
    md = report.write_report(out, rows, histories, title=cfg.title, intro=cfg.get("intro") or "")
    runinfo.write_json_atomic(out / "report.json", {"rows": rows, "baseline": cfg.baseline,
                                                    "git_commit": runinfo.git_commit()})
    show(md)


# ---------------------------------------------------------------- align
@hydra.main(config_path=CONF, config_name="align", version_base="1.3")
@user_errors
def align(cfg: DictConfig) -> None:
    if not cfg.run:
        raise ConfigError("align needs run=DIR (a finished `asrbench train` run dir with a CTC model)")
    run_path, run_cfg, old = load_run(cfg.run)
    if run_cfg.criterion != "ctc":
        raise ConfigError(f"{run_path}: align needs a CTC model but this run trained criterion={run_cfg.criterion}")
    model = load_model(run_path, old)
    feats = experiment.load_features(run_cfg)
    fcfg = FeatureConfig(**OmegaConf.to_container(run_cfg.features, resolve=True))
    frame_s = fcfg.skip * fcfg.frame_shift_ms / 1000.0
    root = experiment.data_root(run_cfg.data)
    out = run_dir()
    summary = {"frame_s": frame_s, "tolerance_s": cfg.tolerance_s, "subsets": {}}
    for name, subsets in experiment.split_names(run_cfg.data).items():
        ali, skipped = align_split(model, feats[name], batch_size=cfg.batch_size)
        utts = []
        for subset in subsets:
            subset_utts = scan_split(run_cfg.data, root, [subset])
            utts += subset_utts
            write_alignments(out / f"{subset}.ali", {u.utt_id: ali[u.utt_id] for u in subset_utts if u.utt_id in ali})
        timings = load_word_timings(utts)
        acc, words = boundary_accuracy(ali, timings, frame_s, cfg.tolerance_s) if timings else (None, 0)
        summary["subsets"][name] = {"aligned": len(ali), "too_short": skipped,
                                    "word_start_accuracy": acc, "words_checked": words}
        log.info("%s: %d aligned, %d too short%s", name, len(ali), skipped,
                 f", word starts within {cfg.tolerance_s * 1000:.0f} ms: {acc:.1%} of {words}" if words else "")
    runinfo.write_json_atomic(out / "align.json", summary)
    print(f"alignments: {out} (use data.alignments={out})")


# ---------------------------------------------------------------- reproduce
@hydra.main(config_path=CONF, config_name="reproduce", version_base="1.3")
@user_errors
def reproduce(cfg: DictConfig) -> None:
    out = run_dir()
    # the runs to compare with are read first: a wrong path fails now, not after the experiment
    compare = cfg.get("compare_with") or []
    compare = [compare] if isinstance(compare, str) else list(compare)  # compare_with=DIR names one
    others = [(str(r["config"]["reproduce"]["name"]), r) for r in (rep.load_reproduce(rep.to_absolute(p))
                                                                    for p in compare)]
    result = rep.run_reproduce(cfg, out, CONF)
    projection = rep.paper_projection(cfg, result["first_seed_rows"], CONF)
    md = report.write_reproduce(out, result, cfg.network, projection, rep.describe_setup(cfg, result),
                                others=others, name=str(cfg.reproduce.name))
    runinfo.write_json_atomic(out / "reproduce.json", {k: v for k, v in result.items() if k != "histories"}
                              | {"projection": projection, "git_commit": runinfo.git_commit(),
                                 "versions": runinfo.versions(), "host": runinfo.host(),
                                 "config": OmegaConf.to_container(cfg, resolve=True)})
    if cfg.run_logger == "wandb":
        log_report_to_wandb(out, result, cfg)
    print(md.read_text())
    print(f"report: {md}")


def log_report_to_wandb(out: Path, result: dict, cfg: DictConfig) -> None:
    """The report's tables and figures as one W&B run in the invocation's group."""
    import wandb  # heavy: only when the report is logged to W&B

    keys = ["strategy", "nodes", "wer", "wer_sd", "rel_wer", "rel_wer_sd", "cer", "rel_cer", "fer", "fer_sd", "rel_fer",
            "rel_fer_sd", "predicted_speedup", "steps", "plateaus"]
    claim_keys = ["claim", "paper", "metric", "mean", "low", "high", "p_holm", "paper_margin", "p_ref_holm", "mde",
                  "mde_holm", "seeds_for_mde", "seeds_for_mde_holm", "verdict"]
    with wandb.init(project="asrbench", group=f"reproduce-{out.name}", job_type="report", mode=experiment.wandb_mode(),
                    name=f"reproduce-{cfg.reproduce.name}", dir=str(out),
                    config=OmegaConf.to_container(cfg, resolve=True)) as run:
        run.log({"reproduce/table": wandb.Table(columns=keys, data=[[c.get(k) for k in keys] for c in result["cells"]]),
                 "reproduce/claims": wandb.Table(columns=claim_keys,
                                                 data=[[j.get(k) for k in claim_keys] for j in result["claims"]])}
                | {f"reproduce/{p.stem}": wandb.Image(str(p)) for p in out.glob("*.png")})


# ---------------------------------------------------------------- bench
@hydra.main(config_path=CONF, config_name="bench", version_base="1.3")
@user_errors
def bench(cfg: DictConfig) -> None:
    out = run_dir()
    results = benchmarks.run(cfg.bench, out)
    print(benchmarks.markdown(results))
    print(f"bench: {out / 'bench.json'}")


# ---------------------------------------------------------------- calibrate
@hydra.main(config_path=CONF, config_name="calibrate", version_base="1.3")
@user_errors
def calibrate(cfg: DictConfig) -> None:
    out = run_dir()
    result = cal.run(OmegaConf.to_container(cfg, resolve=True), out, host=runinfo.host().get("node", ""))
    print((out / "calibrate.md").read_text())
    print(f"network: {' and '.join(result['network_files'])} (use cluster.network=FILE)")
