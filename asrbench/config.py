"""The train config's schema and the one validation pass every run goes through first.

Every knob a user sets on the command line is described here once (type, range, choices), and
:func:`validate` checks a composed config against it, plus the rules that tie knobs together,
before any data is read, any process starts or any logger opens. A bad value is one
:class:`~asrbench.errors.ConfigError` naming the key, the value and what is allowed, which the
command line prints as one line with exit status 2. Knobs are checked where the value is read;
the tests walk :data:`SCHEMA` with a wrong type and an out-of-range value for every entry, so a
knob added here cannot skip validation.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from asrbench import strategies
from asrbench.errors import ConfigError
from asrbench.knobs import Knob, _num


# Every key of `asrbench train` a user sets, by its dotted name; a key a config lacks is skipped. The
# strategy's knobs are its spec's (asrbench/strategies/<module>.py, `knobs`); the data group's are
# checked by the corpus readers that read them.
SCHEMA: dict[str, Knob] = {
    "seed": Knob(int, 0),
    "nodes": Knob(int, 1),
    "num_machines": Knob(int, 1),
    "accelerator": Knob(str, choices=("cpu", "gpu", "auto")),
    "criterion": Knob(str, choices=("ctc", "ce")),
    "batch_size": Knob(int, 1),
    "eval_batch_size": Knob(int, 1),
    "num_workers": Knob(int, 0),
    "bucket_by_length": Knob(bool),
    "deterministic": Knob(bool),
    "collective_timeout_s": Knob(float, 0, low_open=True),
    "checkpoint_every_n_steps": Knob(int, 0),
    "stop_check_every_n_steps": Knob(int, 1),
    "optim.name": Knob(str, choices=("sgd", "adam", "adamw")),
    "optim.lr": Knob(float, 0, low_open=True),
    "optim.momentum": Knob(float, 0, 1, high_open=True),
    "optim.weight_decay": Knob(float, 0),
    "optim.lr_scaling": Knob(str, choices=("none", "linear", "sqrt", "linear_group", "sqrt_group")),
    "optim.warmup_steps": Knob(int, 0),
    "optim.lr_decay_per_epoch": Knob(float, 0, 1, low_open=True),
    "optim.lr_decay_interval": Knob(str, choices=("epoch", "step")),
    "optim.freeze_variance_after": Knob(int, 0, nullable=True),
    "optim.fused": Knob(bool),
    "model.hidden_size": Knob(int, 1),
    "model.num_layers": Knob(int, 1),
    "model.proj_size": Knob(int, 0),
    "model.dropout": Knob(float, 0, 1, high_open=True),
    "trainer.max_epochs": Knob(int, -1, nullable=True),
    "trainer.max_steps": Knob(int, -1),
    "trainer.val_check_interval": Knob(float, steps_or_fraction=True),
    "trainer.check_val_every_n_epoch": Knob(int, 1, nullable=True),
    "trainer.log_every_n_steps": Knob(int, 1),
    "trainer.gradient_clip_val": Knob(float, 0, low_open=True, nullable=True),
    "trainer.enable_progress_bar": Knob(bool),
    "features.sample_rate": Knob(int, 1000),
    "features.num_mel_bins": Knob(int, 1),
    "features.frame_length_ms": Knob(float, 0, low_open=True),
    "features.frame_shift_ms": Knob(float, 0, low_open=True),
    "features.stack": Knob(int, 1),
    "features.skip": Knob(int, 1),
    "features.min_frames": Knob(int, 0),
    # the simulated cluster's
    "cluster.overlap": Knob(float, 0, 1),
    "cluster.batched_sync": Knob(bool),
    "cluster.threads": Knob(int, 1, nullable=True),
    "cluster.memory_fraction": Knob(float, 0, 1, low_open=True),
}


def lookup(cfg: Mapping, key: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, (Mapping, DictConfig)) or part not in node:
            return False, None
        node = node[part]
    return True, node


def validate(cfg: DictConfig | Mapping) -> None:
    """Check every knob of :data:`SCHEMA` present in `cfg` and the rules between knobs; the first
    problem is raised as one ConfigError naming the key, the value and what is allowed."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    for key, knob in schema(plain).items():
        present, value = lookup(plain, key)
        if present and knob.problem(value):
            raise ConfigError(f"{key}={_show(value)} is not allowed; use {knob.allowed()}")
    _cross_field(plain)


def schema(cfg: Mapping) -> dict[str, Knob]:
    """:data:`SCHEMA` plus the knobs of the config's strategy (its spec's ``knobs``, as strategy.<key>)."""
    name = lookup(cfg, "strategy.name")[1]
    if name is None:
        return SCHEMA
    return SCHEMA | {f"strategy.{k}": v for k, v in strategies.spec(name).knobs.items()}


def _show(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _cross_field(cfg: Mapping) -> None:
    nodes, machines = lookup(cfg, "nodes")[1], lookup(cfg, "num_machines")[1]
    if nodes is not None and machines is not None and nodes % machines:
        raise ConfigError(f"nodes={nodes} must be a multiple of num_machines={machines} (workers per machine)")
    name = lookup(cfg, "strategy.name")[1]
    if name is not None and nodes is not None and nodes > 1:
        strategies.spec(name).check(cfg["strategy"], nodes)
    model = cfg.get("model") or {}
    proj, hidden = model.get("proj_size"), model.get("hidden_size")
    if proj and hidden and proj >= hidden:
        raise ConfigError(f"model.proj_size={proj} must be smaller than model.hidden_size={hidden} (0: no projection)")
    features = cfg.get("features") or {}
    length, shift = features.get("frame_length_ms"), features.get("frame_shift_ms")
    if length and shift and shift > length:
        raise ConfigError(f"features.frame_shift_ms={_num(shift)} must not exceed features.frame_length_ms="
                          f"{_num(length)}: frames would skip samples")
    trainer = cfg.get("trainer") or {}
    if trainer.get("max_epochs") == 0 or trainer.get("max_steps") == 0:
        key = "trainer.max_epochs" if trainer.get("max_epochs") == 0 else "trainer.max_steps"
        raise ConfigError(f"{key}=0 trains 0 steps; raise it")
