"""The run's logger (W&B, CSV or none) and what it is told: the resolved config with git commit and
versions at the start, the final scalars at the end."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from asrbench import runinfo
from asrbench.errors import ConfigError


def resolved_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def build_logger(cfg: DictConfig, out_dir: Path) -> Any:
    name = cfg.logger.name
    run_name = f"{cfg.strategy.name}-n{cfg.nodes}-s{cfg.seed}"
    if name == "none":
        return False
    if name == "csv":
        return CSVLogger(save_dir=str(out_dir), name="csv", version="")
    if name == "wandb":
        wandb_logger = WandbLogger(project=cfg.logger.project, mode=wandb_mode(), entity=cfg.logger.get("entity"),
                                   group=cfg.logger.get("group") or cfg.get("experiment"), name=run_name,
                                   job_type=cfg.logger.get("job_type"),
                                   save_dir=str(out_dir), tags=list(cfg.logger.get("tags") or []),
                                   config=resolved_config(cfg) | {"git_commit": runinfo.git_commit(),
                                                                  "versions": runinfo.versions()})
        # Lightning always passes wandb.init an `anonymous` setting, which wandb 0.31 answers with a
        # deprecation warning on every run's console; unset, it means the same (no anonymous logging).
        if wandb_logger._wandb_init.get("anonymous") is None:
            wandb_logger._wandb_init.pop("anonymous", None)
        return wandb_logger
    raise ConfigError(f"logger={name!r} is unknown; use wandb, csv or none")


def finish_wandb(logger: Any) -> None:
    """End this run's W&B run, so that the next run in the same process opens its own: a
    WandbLogger otherwise finds the run still open and logs into it (reproduce runs several jobs
    in one worker process)."""
    run = getattr(logger, "_experiment", None)
    if run is not None and hasattr(run, "finish"):
        run.finish()
        logger._experiment = None


def wandb_mode() -> str:
    """WANDB_MODE if set; else online when logged in (API key or ~/.netrc entry), offline otherwise.

    Offline runs stay on disk under the run dir; `wandb sync <dir>` uploads them later.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import netrc  # only when no W&B mode or key is set

    try:
        hosts = netrc.netrc().hosts
    except (OSError, netrc.NetrcParseError):
        hosts = {}
    return "online" if any("wandb" in h for h in hosts) else "offline"


def log_results(logger: Any, results: dict) -> None:
    if logger:
        flat = {f"final/{k}": v for k, v in results.items() if isinstance(v, (int, float)) and v is not None}
        logger.log_metrics(flat)

