"""Workers as rows: the model's parameters as views of one row of P, the optimizer over the rows, clipping.

The mechanics :class:`asrbench.cluster.simulated.SimulatedCluster` stands on (symbols in its module
docstring): binding worker i's row of P (and G) to the model without a copy, building the run's
optimizer and lr schedulers over the N rows, and Lightning's gradient clipping applied per worker.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch.core.optimizer import _configure_optimizers, _configure_schedulers_automatic_opt
from torch import Tensor, nn

from asrbench.errors import ConfigError
from asrbench.model.module import AcousticModule

class RowBinding:
    """The model's trainable parameters (and gradients) as views into one row of P (and G).

    Binding a row costs a few attribute writes per parameter tensor, no copy: the forward and
    backward of worker i read P[i] and accumulate into G[i] directly.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.numel = sum(self.sizes)

    def flat(self) -> Tensor:
        """The model's current parameters as one flat fp32 vector (n,)."""
        return torch.cat([p.detach().reshape(-1).float() for p in self.params])

    def views(self, row: Tensor) -> list[Tensor]:
        """`row` (n,) cut into tensors shaped like the parameters (views)."""
        return [v.view(s) for v, s in zip(row.split(self.sizes), self.shapes)]

    def cut(self, stacked: Tensor) -> list[list[Tensor]]:
        """Every row of `stacked` (N, n) cut into parameter-shaped views, once (for :meth:`bind_views`)."""
        return [self.views(row) for row in stacked.unbind(0)]

    @torch.no_grad()
    def bind(self, row: Tensor, grad_row: Tensor | None = None) -> None:
        """Make the model's parameters views of `row` and, if given, its gradients views of `grad_row`."""
        self.bind_views(self.views(row), self.views(grad_row) if grad_row is not None else None)

    @torch.no_grad()
    def bind_views(self, values: Sequence[Tensor], grads: Sequence[Tensor] | None = None) -> None:
        """:meth:`bind` with the views already cut (:meth:`cut`): the model's parameters become `values`."""
        for i, (p, value) in enumerate(zip(self.params, values)):
            p.data = value
            p.grad = grads[i] if grads is not None else None


class _WorkerRows:
    """What `AcousticModule.configure_optimizers` reads, with the rows of P as the parameters."""

    def __init__(self, module: Any, rows: Sequence[nn.Parameter]) -> None:
        self.optim_cfg, self.world_size, self._params = module.optim_cfg, module.world_size, list(rows)
        self._module = module

    @property
    def steps_per_epoch(self) -> int:  # read by a step-wise lr decay at each step, once the data is known
        return self._module.steps_per_epoch

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(self._params)


def row_parameters(stacked: Tensor) -> list[nn.Parameter]:
    """The rows of `stacked` (N, n) as N parameters that share its storage."""
    return [nn.Parameter(row, requires_grad=True) for row in stacked.unbind(0)]


def build_worker_optimizer(module: Any, rows: Sequence[nn.Parameter]) -> tuple[torch.optim.Optimizer, list[Any]]:
    """The optimizer and lr schedulers of `module.configure_optimizers()` over the N worker rows.

    Adam, AdamW and SGD (with momentum and weight decay) update each element from that element's
    gradient and state alone, so one optimizer over the rows of P equals N optimizers, one per
    worker: bit for bit, and with ``optim.fused`` but for a few elements at the ends of a worker's
    tensors (:func:`asrbench.model.optim.fused_option`). The return value is parsed by Lightning's
    own parser, so the schedulers come back as its ``LRSchedulerConfig`` (scheduler, interval,
    frequency), stepped by :func:`step_schedulers`.
    """
    conf = AcousticModule.configure_optimizers(_WorkerRows(module, rows))
    optimizers, schedulers, monitor = _configure_optimizers(conf)
    if len(optimizers) != 1:
        raise ConfigError(f"cluster=simulated trains with one optimizer; the module configured {len(optimizers)}")
    configs = _configure_schedulers_automatic_opt(schedulers, monitor)
    if any(c.reduce_on_plateau for c in configs):
        raise ConfigError("cluster=simulated does not step ReduceLROnPlateau schedulers (they need a monitored "
                          "metric); use a step- or epoch-wise schedule")
    return optimizers[0], configs


def step_schedulers(configs: Sequence[Any], interval: str, index: int) -> None:
    """Lightning's rule: a scheduler of `interval` steps when (index + 1) % frequency == 0, `index`
    being the batch index in the epoch (interval step) or the epoch (interval epoch)."""
    for config in configs:
        if config.interval == interval and (index + 1) % config.frequency == 0:
            config.scheduler.step()


@torch.no_grad()
def clip_rows(grads: Tensor, binding: RowBinding, max_norm: float, group_size: int = 1,
              algorithm: str = "norm", split: int | None = None) -> None:
    """Lightning's gradient clipping applied to each worker's row of `grads`.

    ``norm``: ``torch.nn.utils.clip_grad_norm_`` per worker: the L2 norm ‖g‖ over all of that
    worker's parameter tensors (computed per tensor, then over the tensor norms, as torch does),
    and g <- g min(1, max_norm / (‖g‖ + 1e-6)). ``value``: clamp to [-max_norm, max_norm]. Rows
    of one group are equal after the exchange, so the norm is computed once per group. With
    `split`, the parameters before and from that index are clipped each by their own norm
    (:meth:`AcousticModule.configure_gradient_clipping`: the phone probe's own).
    """
    if algorithm == "value":
        grads.clamp_(-max_norm, max_norm)
        return
    workers = grads.shape[0]
    offsets = [0]
    for size in binding.sizes:
        offsets.append(offsets[-1] + size)
    parts = [(0, len(binding.sizes))] if split is None else [(0, split), (split, len(binding.sizes))]
    for a, b in parts:
        lo, hi = offsets[a], offsets[b]
        if hi == lo:
            continue
        block = grads[:, lo:hi]
        sizes, shapes = binding.sizes[a:b], binding.shapes[a:b]
        # every group's tensors at once: the norms torch.nn.utils.get_total_norm takes of one worker's
        views = [v.view(sh) for i in range(0, workers, group_size) for v, sh in zip(block[i].split(sizes), shapes)]
        tensor_norms = torch.stack(torch._foreach_norm(views, 2.0)).view(-1, b - a)
        norms = torch.linalg.vector_norm(tensor_norms, 2.0, dim=1)
        coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
        block.view(-1, group_size, hi - lo).mul_(coef.view(-1, 1, 1))
