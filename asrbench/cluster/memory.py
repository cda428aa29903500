"""Resources of a simulated cluster: the memory its (N, n) arrays need, refused before starting, and its device."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from asrbench.errors import ConfigError
from asrbench.strategies import spec
from asrbench.strategies.contract import FP32_BYTES

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Memory: refuse what cannot fit before starting
# ---------------------------------------------------------------------------------------------
def stacked_arrays(strategy_cfg: Mapping[str, Any], optim: Mapping[str, Any], nodes: int) -> dict[str, int]:
    """How many (N, n) fp32 arrays a run holds: name -> count (the strategy's own from its spec)."""
    name = optim.get("name", "adam")
    arrays = {"parameters": 1, "gradients": 1}
    if name in ("adam", "adamw"):
        arrays["optimizer state"] = 2  # exp_avg, exp_avg_sq
    elif name == "sgd" and float(optim.get("momentum", 0.0) or 0.0) > 0:
        arrays["optimizer state"] = 1  # momentum buffer
    return arrays | spec(strategy_cfg["name"]).stacked_arrays(strategy_cfg, nodes)


def activation_bytes(model_cfg: Mapping[str, Any], input_dim: int, num_classes: int, batch_size: int,
                     max_frames: int) -> int:
    """Rough upper bound of one worker's forward + backward memory: per frame, the input, each
    LSTM layer's gates and states (kept for backward, plus their gradients), the logits."""
    hidden = int(model_cfg.get("hidden_size", 320))
    layers = int(model_cfg.get("num_layers", 3))
    per_frame = 2 * input_dim + layers * 16 * hidden + 4 * num_classes
    return int(FP32_BYTES * batch_size * max_frames * per_frame)


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes free, what) on the device: GPU memory, or the RAM the kernel reports available."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), "GPU memory"
    try:
        import psutil  # optional: not a declared dependency

        return int(psutil.virtual_memory().available), "RAM"
    except ImportError:
        pass
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "RAM"
    raise RuntimeError("cannot read the available memory (no psutil, no MemAvailable in /proc/meminfo)")


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_memory(nodes: int, numel: int, arrays: Mapping[str, int], device: torch.device, *,
                 activations: int = 0, fraction: float = 0.9, report: bool = True) -> int:
    """Bytes the run needs (logged when `report`); a one-line ConfigError when more than `fraction`
    of the free memory."""
    per_array = nodes * numel * FP32_BYTES
    need = sum(arrays.values()) * per_array + activations + 8 * numel * FP32_BYTES  # + n-sized buffers
    free, what = available_memory(device)
    parts = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in arrays.items())
    if report:
        log.info("cluster=simulated: %s for %d workers x %d parameters (%s: %d arrays of N x n x 4 bytes = %s each; "
                 "activations %s); %s free", _gib(need), nodes, numel, parts, sum(arrays.values()),
                 _gib(per_array), _gib(activations), _gib(free))
    if need > fraction * free:
        raise ConfigError(f"cluster=simulated with nodes={nodes} needs {_gib(need)} ({sum(arrays.values())} arrays "
                          f"of nodes x {numel} parameters x 4 bytes: {parts}; activations {_gib(activations)}) but "
                          f"{_gib(free)} of {what} is free; lower nodes or batch_size, or pick a smaller model")
    return need


# ---------------------------------------------------------------------------------------------
# The device the workers live on
# ---------------------------------------------------------------------------------------------
def resolve_device(accelerator: str) -> torch.device:
    """cpu, or the first GPU for accelerator=gpu (auto: gpu when CUDA is visible)."""
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("accelerator=gpu but no CUDA device is visible; use accelerator=cpu")
        return torch.device("cuda", 0)
    if accelerator != "cpu":
        raise ConfigError(f"accelerator={accelerator!r} is unknown to cluster=simulated; use cpu, gpu or auto")
    return torch.device("cpu")
