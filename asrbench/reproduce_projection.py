"""The reproduce runs re-costed at the paper's scale: each run's measured communication pattern for a
model of the paper's size, with a compute profile's seconds per worker step, on a network preset."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from asrbench import strategies
from asrbench.cluster import cost
from asrbench.cluster.cost import load_compute_profile, load_network
from asrbench.data import text
from asrbench.data.features import FeatureConfig
from asrbench.errors import ConfigError
from asrbench.model.lstm import LSTMAcousticModel


FP32_BYTES = 4


def size_keys() -> tuple[str, ...]:
    """Cost-model statistics that grow with the number of parameters (every strategy's ``size_keys``;
    densities are kept)."""
    keys = ["dense_bytes_per_worker_per_step"]
    for entry in strategies.registry().values():
        keys += [k for k in entry.size_keys if k not in keys]
    return tuple(keys)


def model_parameters(model_cfg: Mapping, input_dim: int) -> int:
    """Parameters of the acoustic model `model_cfg` (a conf/model entry), counted without memory."""

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

    compute = float(profile["compute_s_per_worker_step"])
    out = []
    for r in rows:
        model = r.get("cost_model")
        if not model:
            continue
        stats = dict(model["stats"])
        scale = parameters / (stats["dense_bytes_per_worker_per_step"] / FP32_BYTES)
        for key in size_keys():
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
                                                      compute + cost.step_overhead(network, strategies.BASELINE))})
    return out


def paper_projection(cfg: Any, results: Sequence[Mapping], conf_dir: str | Path) -> dict | None:
    """The runs' speedups re-costed at the paper's model size (cfg.projection; null to skip)."""

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
