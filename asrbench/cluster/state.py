"""Checkpoint state of a simulated cluster's parts: a strategy's simulation objects and the RNGs.

:func:`object_state` reads the attributes of the strategies' exchange and averager objects as
tensors and numbers (loadable with ``torch.load(weights_only=True)``) and :func:`load_object_state`
writes them back, so the strategy modules stay unaware of checkpoints; :func:`rng_state` and
:func:`set_rng_state` do the same for this process's random generators.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

_OBJECT, _OPTIMIZER, _NUMPY_RNG = "__object__", "__optimizer__", "__numpy_rng__"
# Classes whose objects' attributes are state: the strategies' own, and torch's hook states (PowerSGDState).
_STATE_MODULES = ("asrbench.", "torch.distributed.algorithms.")
_PLAIN = (bool, int, float, str, type(None))


def _attribute_names(obj: Any) -> list[str]:
    names = list(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else [n for n in slots if n not in ("__dict__", "__weakref__")]
    return list(dict.fromkeys(names))


class _Unsaved(Exception):
    """A value that is not state (a callable, a process group, a view of P): its attribute is left as it is."""


def _encode(value: Any, skip: Callable[[Any], bool], depth: int, attribute: bool = True) -> Any:
    """`value` as checkpoint state; objects (nested, optimizers, RNGs) only as attributes, not in containers."""
    if skip(value):
        raise _Unsaved
    if isinstance(value, _PLAIN):
        return value
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    if isinstance(value, (list, tuple)):
        items = [_encode(v, skip, depth, attribute=False) for v in value]
        return items if isinstance(value, list) else tuple(items)  # torch.Size as a plain tuple
    if isinstance(value, dict):
        if not all(isinstance(k, (*_PLAIN, tuple)) for k in value):
            raise _Unsaved
        return {k: _encode(v, skip, depth, attribute=False) for k, v in value.items()}
    if not attribute:
        raise _Unsaved
    if isinstance(value, torch.optim.Optimizer):
        return {_OPTIMIZER: value.state_dict()}
    if isinstance(value, np.random.RandomState):
        kind, keys, pos, has_gauss, gauss = value.get_state()
        return {_NUMPY_RNG: [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if depth > 0 and not callable(value) and type(value).__module__.startswith(_STATE_MODULES):
        return {_OBJECT: object_state(value, skip, depth - 1)}
    raise _Unsaved


def object_state(obj: Any, skip: Callable[[Any], bool], depth: int = 4) -> dict[str, Any]:
    """Every attribute of `obj` that is state, as tensors, numbers, strings and containers of them
    (loadable with ``torch.load(weights_only=True)``): tensors, counters, dicts and lists of them,
    torch optimizers (their state_dict), numpy RNGs, and the attributes of nested objects of
    asrbench's and torch's hook classes. Callables, process groups, hook handles and whatever
    `skip` names (the cluster's P, G, rows and optimizer, saved once by the cluster) are left out.
    """
    out: dict[str, Any] = {}
    for name in _attribute_names(obj):
        try:
            out[name] = _encode(getattr(obj, name), skip, depth)
        except (_Unsaved, AttributeError):
            pass
    return out


def _decode(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device, copy=True)
    if isinstance(value, (list, tuple)):
        return type(value)(_decode(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _decode(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def load_object_state(obj: Any, state: Mapping[str, Any], device: torch.device) -> None:
    """Write :func:`object_state`'s `state` back into `obj`: tensors in place where the shape
    matches (whatever shares them keeps sharing), nested objects attribute by attribute."""
    for name, value in state.items():
        current = getattr(obj, name, None)
        if isinstance(value, dict) and _OBJECT in value:
            assert current is not None, f"{type(obj).__name__}.{name} holds no object to load state into"
            load_object_state(current, value[_OBJECT], device)
        elif isinstance(value, dict) and _OPTIMIZER in value:
            current.load_state_dict(value[_OPTIMIZER])
        elif isinstance(value, dict) and _NUMPY_RNG in value:
            kind, keys, pos, has_gauss, gauss = value[_NUMPY_RNG]
            current.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        elif _copy_in_place(current, value):
            pass
        elif not _same(current, value):
            setattr(obj, name, _decode(value, current.device if torch.is_tensor(current) else device))


def _copy_in_place(current: Any, value: Any) -> bool:
    """Copy saved tensors into `current`'s own (a tensor, or a list, tuple or dict of them of the same
    layout), so views of one another (e.g. per-tensor views of a residual) keep sharing; False otherwise."""
    if torch.is_tensor(current) and torch.is_tensor(value):
        if current.shape != value.shape or current.dtype != value.dtype:
            return False
        current.copy_(value)
        return True
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)) and len(current) == len(value) \
            and len(value) and all(torch.is_tensor(v) for v in value):
        if not all(torch.is_tensor(c) and c.shape == v.shape and c.dtype == v.dtype for c, v in zip(current, value)):
            return False
        for c, v in zip(current, value):
            c.copy_(v)
        return True
    return False


def _same(current: Any, value: Any) -> bool:
    """Whether a setting already holds the saved value (a shape, a hyper-parameter): left untouched."""
    if torch.is_tensor(current) or torch.is_tensor(value):
        return False
    try:
        return bool(current == value)
    except (RuntimeError, TypeError, ValueError):  # containers of tensors
        return False


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random states (torch, CUDA, NumPy, Python), as tensors and numbers."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": [version, torch.tensor(internal, dtype=torch.int64), gauss_next]}


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss_next))

