"""GTC's per-rank state (Strom 2015; see :mod:`asrbench.strategies.gtc` for the symbols): the
hyper-parameters, the residual r of every DDP bucket, kept in a canonical parameter order across
DDP's rebuilds of its buckets and checkpoints, the step counter and the statistics."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from asrbench.strategies.accounting import CommStats
from asrbench.strategies.comm import is_rank_zero
from asrbench.strategies.gtc_codec import DEFAULT_TAU, TAU_UNITS

log = logging.getLogger("asrbench.strategies.gtc")  # GTC's messages under the strategy's one logger name


class GTCState:
    r"""Hyper-parameters, per-bucket residuals and the step counter of :func:`gtc_hook`.

    ``tau`` (τ) is the threshold in gradient units. ``max_density`` (0 < d <= 1, or None): warn,
    at most once every ``density_warn_interval`` steps, when a step sends more than this fraction
    of the elements (τ is too small for the gradients). ``pass_through`` sends the gradient dense
    with an all-reduce instead (plain DDP; for equivalence tests). ``dense_warmup_steps``: the
    first that many steps (counted by ``iter``, which a checkpoint keeps) are sent dense the same
    way and leave r at 0; GTC starts after them. ``tau_units="rms"`` gives element i the threshold
    τ d_i with d = ``scale_of(p)`` per parameter p, Adam's sqrt(v̂) + ε once frozen at the end of
    the warm-up (:mod:`asrbench.model.optim`). ``parameters`` fixes the canonical order in which residuals are checkpointed (the model's parameters; without it, the
    order in which buckets first show them).

    Residuals are rank-local. DDP rebuilds its buckets after the first step (a new order and
    split), so each residual is stored with its bucket's parameter layout and moved, once, when a
    layout changes; :meth:`state_dict` holds them in the canonical order.
    """

    __slots__ = [
        "process_group",
        # Hyper-parameters.
        "tau",
        "max_density",
        "density_warn_interval",
        "pass_through",
        "dense_warmup_steps",
        "tau_units",
        "scale_of",
        # Per-bucket memory (rank-local): residual r, a bool work mask, the parameter layout.
        "residuals",
        "masks",
        "layouts",
        "_slots",
        "_owner",
        "_pending",
        # Iteration counter.
        "iter",
        # Statistics.
        "comm_stats",
        "hook_calls",
        "_step_sent",
        "_step_total",
        "_last_warn_iter",
    ]

    def __init__(self, process_group: dist.ProcessGroup | None = None, tau: float = DEFAULT_TAU,
                 max_density: float | None = None, pass_through: bool = False,
                 parameters: Iterable[Tensor] | None = None, density_warn_interval: int = 100,
                 dense_warmup_steps: int = 0, tau_units: str = "gradient",
                 scale_of: Callable[[Tensor], Tensor | None] | None = None) -> None:
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= torch.finfo(torch.float32).tiny):
            raise ValueError(f"Arg `tau` (Strom's threshold τ, gradient units) must be a positive value "
                             f"(a normal fp32 number), got {tau}")
        if max_density is not None and not 0 < max_density <= 1:
            raise ValueError(f"Arg `max_density` must be in (0, 1] (a fraction of the elements) or None, "
                             f"got {max_density}")
        if density_warn_interval < 1:
            raise ValueError(f"Arg `density_warn_interval` must be a positive value, got {density_warn_interval}")
        if not (isinstance(dense_warmup_steps, int) and dense_warmup_steps >= 0):
            raise ValueError(f"Arg `dense_warmup_steps` (steps sent dense before GTC starts) must be a non-negative "
                             f"integer, got {dense_warmup_steps!r}")
        if tau_units not in TAU_UNITS:
            raise ValueError(f"Arg `tau_units` must be one of {TAU_UNITS}, got {tau_units!r}")
        self.process_group = process_group
        self.tau = float(tau)
        self.max_density = max_density
        self.density_warn_interval = int(density_warn_interval)
        self.pass_through = bool(pass_through)
        self.dense_warmup_steps = int(dense_warmup_steps)
        self.tau_units = tau_units
        self.scale_of = scale_of
        self.residuals: dict[int, Tensor] = {}
        self.masks: dict[int, Tensor] = {}
        self.layouts: dict[int, tuple[int, ...]] = {}
        self._slots: dict[int, tuple[int, int]] = {}  # id(param) -> (offset, numel) in the canonical order
        self._owner: dict[int, int] = {}  # id(param) -> index of the bucket whose residual holds it
        self._pending: Tensor | None = None  # canonical residual not yet moved into buckets
        self.iter = 0
        self.comm_stats = CommStats(world_size=1)
        self.hook_calls = 0
        self._step_sent = 0
        self._step_total = 0
        self._last_warn_iter: int | None = None
        if parameters is not None:
            self.bind_parameters(parameters)

    # -- canonical layout -------------------------------------------------------------------
    def bind_parameters(self, parameters: Iterable[Tensor]) -> None:
        """Fix the canonical order (and size) of the checkpointed residual: these parameters in order."""
        params = [p for p in parameters if p.requires_grad]
        if self.residuals:
            self._pending = self.canonical_residual()
            self._clear_buckets()
        offset, slots = 0, {}
        for p in params:
            slots[id(p)] = (offset, p.numel())
            offset += p.numel()
        self._slots = slots
        if self._pending is not None and self._pending.numel() != offset:
            raise ValueError(f"the GTC residual to restore has {self._pending.numel()} elements but the model's "
                             f"trainable parameters have {offset}: the checkpoint is of another model")

    @property
    def canonical_numel(self) -> int:
        return sum(n for _, n in self._slots.values())

    def canonical_residual(self) -> Tensor:
        """This rank's residual over all bound parameters in the canonical order (fp32, on its device)."""
        device = next(iter(self.residuals.values())).device if self.residuals else torch.device("cpu")
        out = torch.zeros(self.canonical_numel, dtype=torch.float32, device=device)
        if self._pending is not None:  # parameters first seen after it was made are missing from its end
            out[: self._pending.numel()].copy_(self._pending)
        for b, layout in self.layouts.items():
            start = 0
            for pid in layout:
                offset, n = self._slots[pid]
                out[offset:offset + n] = self.residuals[b][start:start + n]
                start += n
        return out

    def _clear_buckets(self) -> None:
        self.residuals.clear()
        self.masks.clear()
        self.layouts.clear()
        self._owner.clear()

    def memory(self, bucket: dist.GradBucket) -> tuple[Tensor, Tensor]:
        """The bucket's residual r and work mask, allocated on first sight and moved if DDP rebuilt buckets."""
        b = bucket.index()
        params = bucket.parameters()
        layout = tuple(id(p) for p in params)
        if self.layouts.get(b) == layout:
            return self.residuals[b], self.masks[b]
        if b in self.layouts or any(self._owner.get(pid, b) != b for pid in layout):
            # DDP rebuilt its buckets: gather every residual in the canonical order, then re-split.
            self._pending = self.canonical_residual()
            self._clear_buckets()
        for p in params:  # parameters first seen here (no bound order) go to the end
            if id(p) not in self._slots:
                self._slots[id(p)] = (self.canonical_numel, p.numel())
        buffer = bucket.buffer()
        assert sum(p.numel() for p in params) == buffer.numel(), "GTC expects dense, unpadded buckets"
        if self._pending is not None:
            pending = self._pending.to(buffer.device)
            pieces = [pending[o:o + n] if o + n <= pending.numel() else torch.zeros(n, device=buffer.device)
                      for o, n in (self._slots[pid] for pid in layout)]
            residual = torch.cat(pieces) if pieces else torch.zeros(0, device=buffer.device)
        else:
            residual = torch.zeros(buffer.numel(), dtype=torch.float32, device=buffer.device)
        self.residuals[b] = residual
        self.masks[b] = torch.empty(buffer.numel(), dtype=torch.bool, device=buffer.device)
        self.layouts[b] = layout
        self._owner.update(dict.fromkeys(layout, b))
        if self._pending is not None and len(self._owner) == len(self._slots):
            self._pending = None  # every parameter's residual lives in a bucket again
        return residual, self.masks[b]

    # -- step counter and statistics ----------------------------------------------------------
    def element_scale(self, params: Sequence[Tensor]) -> Tensor | None:
        """With ``tau_units="rms"``: the flat per-element scale d of these parameters (τ_i = τ d_i), else None.

        d is ``scale_of(p)`` (asrbench.model.optim.FrozenVarianceAdam.denominator: Adam's frozen
        sqrt(v̂) + ε), the same on every rank because v was learnt from all-reduced gradients.
        """
        if self.tau_units != "rms":
            return None
        pieces = [self.scale_of(p) for p in params] if self.scale_of is not None else [None]
        if any(piece is None for piece in pieces):
            raise RuntimeError(f"GTC step {self.iter}: tau_units=rms scales τ by Adam's frozen second moment, which "
                               f"is not frozen yet: set optim.freeze_variance_after <= strategy.dense_warmup_steps")
        return torch.cat([piece.reshape(-1) for piece in pieces])  # type: ignore[union-attr]

    def sends_dense(self) -> bool:
        """Whether this step all-reduces the dense gradient: ``pass_through``, or still in the dense warm-up."""
        return self.pass_through or self.iter < self.dense_warmup_steps

    def record_bucket(self, elements_sent: int, elements_total: int, is_last: bool) -> None:
        """Count a bucket's elements; on the step's last bucket close the step (and maybe warn)."""
        self._step_sent += elements_sent
        self._step_total += elements_total
        if not is_last:
            return
        self.comm_stats.record_elements(self._step_sent, self._step_total)
        self.comm_stats.step()
        density = self._step_sent / max(self._step_total, 1)
        if (not self.sends_dense() and self.max_density is not None and density > self.max_density
                and (self._last_warn_iter is None or self.iter - self._last_warn_iter >= self.density_warn_interval)
                and is_rank_zero()):
            log.warning("GTC step %d sent %.2f%% of the gradient elements (max_density %.2f%%): tau = %g is small "
                        "for these gradients; raise it (warned at most every %d steps)", self.iter, 100 * density,
                        100 * self.max_density, self.tau, self.density_warn_interval)
            self._last_warn_iter = self.iter
        self._step_sent = self._step_total = 0
        self.iter += 1

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Rank-local state as tensors and plain numbers (loads with ``weights_only=True``)."""
        return {"iter": self.iter, "tau": self.tau, "residual": self.canonical_residual().cpu(),
                "comm_stats": self.comm_stats.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        residual = state["residual"]
        if self._slots and residual.numel() != self.canonical_numel:
            raise ValueError(f"the GTC residual to restore has {residual.numel()} elements but the model's "
                             f"trainable parameters have {self.canonical_numel}: the checkpoint is of another model")
        if float(state.get("tau", self.tau)) != self.tau and is_rank_zero():
            log.warning("GTC residuals were saved with tau = %s and resume with tau = %s", state["tau"], self.tau)
        self._clear_buckets()
        self._pending = residual.detach().to(torch.float32).clone()
        self.iter = int(state["iter"])
        self.comm_stats.load_state_dict(state["comm_stats"])

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the process group; residuals travel in the canonical order."""
        state = {slot: getattr(self, slot) for slot in self.__slots__
                 if slot not in ("process_group", "scale_of", "residuals", "masks", "layouts", "_owner", "_slots",
                                 "_pending")}
        state["_pending"] = self.canonical_residual().cpu() if (self.residuals or self._pending is not None) else None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """The process group becomes the default one (None) and ``scale_of`` None; call
        :meth:`bind_parameters` again (and set ``scale_of`` for ``tau_units="rms"``)."""
        self.process_group = None
        self.scale_of = None
        self.residuals, self.masks, self.layouts, self._owner, self._slots = {}, {}, {}, {}, {}
        for slot, value in state.items():
            setattr(self, slot, value)
