"""The train config's validation: every knob of the schema refuses a wrong type and an
out-of-range value in one line naming the key, generated from asrbench.config.SCHEMA, so a new
knob cannot skip it; and the command line exits 2 before reading data for the values users tried."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from asrbench import config, strategies
from asrbench.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def composed(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", list(overrides))


def test_the_default_configs_are_valid():
    config.validate(composed())
    assert set(strategies.names()) == {p.stem for p in (ROOT / "conf" / "strategy").glob("*.yaml")}
    for strategy in strategies.names():
        config.validate(composed(f"strategy={strategy}", "nodes=4" if strategy != strategies.BASELINE else "nodes=1"))


def wrong_type(knob: config.Knob):
    return "abc" if knob.kind is not str else 7


def out_of_range(knob: config.Knob):
    if knob.choices:
        return "nonsense"
    if knob.steps_or_fraction:
        return 1.5
    if knob.kind is bool:
        return None if not knob.nullable else "yes"
    if knob.low is not None:
        return knob.low if knob.low_open else knob.low - 1
    return knob.high + 1 if not knob.high_open else knob.high


# every knob of the schema, and every strategy's own knobs with that strategy
KNOBS = [("sync", key, knob) for key, knob in sorted(config.SCHEMA.items())] + [
    (name, f"strategy.{key}", knob) for name, entry in strategies.registry().items()
    for key, knob in sorted(entry.knobs.items())]


@pytest.mark.parametrize("strategy,key,knob", KNOBS, ids=[f"{s}:{k}" for s, k, _ in KNOBS])
def test_every_knob_refuses_a_wrong_type_and_an_out_of_range_value(strategy, key, knob):
    base = composed(f"strategy={strategy}", "nodes=4", "cluster=simulated")
    present, _ = config.lookup(OmegaConf.to_container(base, resolve=True), key)
    assert present or key.startswith("strategy."), f"{key} is in the schema but not in conf/"  # a strategy's
    # knob may be left out of its yaml (the strategy's default), and is still checked when set
    for bad in (wrong_type(knob), out_of_range(knob)):
        cfg = OmegaConf.to_container(base, resolve=True)
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = bad
        with pytest.raises(ConfigError) as err:
            config.validate(cfg)
        message = str(err.value)
        assert message.startswith(f"{key}=") and "\n" not in message and "use " in message, message


def test_every_key_of_a_strategy_yaml_is_one_of_its_knobs():
    passed_on = {"name", "registry_name", "inner_optimizer", "batch_size", "outer_optimizer_kwargs"}
    for name, entry in strategies.registry().items():
        keys = OmegaConf.to_container(composed(f"strategy={name}", "nodes=4"), resolve=True)["strategy"]
        missing = sorted(k for k in keys if k not in entry.knobs and k not in passed_on)
        assert missing == [], f"conf/strategy/{name}.yaml: keys without a knob in its spec: {missing}"


def test_every_user_knob_of_the_defaults_is_in_the_schema():
    """Leaves of the top level and of optim, model, trainer, features that a user sets: each has a schema
    entry or is named here as checked elsewhere (by the reader, strategy or Lightning that reads it)."""
    checked_elsewhere = {"resume", "init_from", "baseline", "experiment", "trainer.max_time",
                         "trainer.num_sanity_val_steps", "trainer.enable_model_summary",
                         "trainer.gradient_clip_algorithm"}
    cfg = OmegaConf.to_container(composed(), resolve=True)
    leaves = [k for k, v in cfg.items() if not isinstance(v, dict)]
    for group in ("optim", "model", "trainer"):
        leaves += [f"{group}.{k}" for k, v in cfg[group].items() if not isinstance(v, dict) and k != "name"]
    missing = [k for k in leaves if k not in config.SCHEMA and k not in checked_elsewhere]
    assert missing == [], f"knobs without validation: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("override,key", [
    ("batch_size=0", "batch_size"), ("nodes=abc", "nodes"), ("model.hidden_size=abc", "model.hidden_size"),
    ("model.num_layers=0", "model.num_layers"), ("optim.lr=-1", "optim.lr"), ("optim.name=adamw2", "optim.name"),
])
def test_the_command_line_refuses_in_one_line_before_reading_data(tmp_path, override, key):
    env = os.environ | {"WANDB_MODE": "offline"}
    env.pop("ASRBENCH_COMMAND", None)
    proc = subprocess.run([sys.executable, "-m", "asrbench.cli", "train", override, "data=synth_tiny",
                           f"data.root={tmp_path / 'corpus'}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {key}=") and "Traceback" not in proc.stderr
    assert not (tmp_path / "corpus").exists() and not (tmp_path / "run" / "wandb").exists()


@pytest.mark.parametrize("override,line", [
    ("strategy=gtcc", f"error: strategy=gtcc does not exist; use one of {', '.join(sorted(strategies.names()))} "
                      f"(conf/strategy/)"),
    ("foo=bar", "error: foo=bar: train's config has no key foo; `asrbench train --help` lists the keys (+foo=... "
                "adds a new one)"),
])
def test_hydra_refusals_are_one_line_with_exit_2(tmp_path, override, line):
    env = os.environ | {"WANDB_MODE": "offline"}
    env.pop("ASRBENCH_COMMAND", None)
    proc = subprocess.run([sys.executable, "-m", "asrbench.cli", "train", override, f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == line


@pytest.mark.slow
def test_a_validation_interval_longer_than_an_epoch_is_refused_before_any_logger(tmp_path):
    env = os.environ | {"WANDB_MODE": "offline"}
    env.pop("ASRBENCH_COMMAND", None)
    proc = subprocess.run([sys.executable, "-m", "asrbench.cli", "train", "data=synth_tiny", "model=lstm_tiny",
                           f"data.root={tmp_path / 'corpus'}", "trainer.val_check_interval=7", "batch_size=4",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: trainer.val_check_interval=7 steps exceeds the 6 steps of an epoch (24 training"), last
    assert not (tmp_path / "run" / "wandb").exists()
