"""Adam with a frozen second moment, for training on compressed gradients.

Adam divides each element's step by the running RMS of that element's gradient, so its step is
a nonlinear function of the gradient. Error feedback (GTC's residual) makes the *sum* of the sent
gradients track the sum of the true ones, which carries over to the parameters only when the
optimizer is linear in the gradient. Under GTC, Adam sees sparse ±τ/N messages instead: its
second moment v estimates the messages' energy, not the gradient's, and an element sent once
steps by about 3 lr in the sign of one message. 1-bit Adam (Tang et al., "1-bit Adam:
Communication Efficient Large-Scale Training with Adam's Convergence Speed", ICML 2021, Alg. 1)
observes that v settles early in training: it runs plain Adam on dense gradients for a warm-up,
then freezes v. From then on the step is momentum SGD with a fixed elementwise preconditioner,

    m_t = β1 m_{t-1} + (1 - β1) g_t
    θ_t = θ_{t-1} - lr · (m_t / (1 - β1^t)) / (sqrt(v_T / (1 - β2^T)) + ε)

with T = ``freeze_after``, which is linear in g, so compressed gradients with error feedback
reach the parameters as the dense ones would. asrbench pairs it with GTC's dense warm-up
(``strategy.dense_warmup_steps``) and ``strategy.tau_units=rms``: v is learnt from the
all-reduced mean gradient, frozen when compression starts, and each element's GTC threshold is
τ sqrt(v̂_i), so τ counts Adam steps whatever the element's gradient scale.

Measured (README, "GTC's accuracy cost"): freezing v costs sync training nothing, but it does not
recover GTC's accuracy gap, which GTC shows with momentum SGD (linear already) as well.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from asrbench.errors import ConfigError


def fused_option(optim: Mapping[str, Any]) -> bool | None:
    """``optim.fused`` as the ``fused`` keyword of torch's SGD, Adam and AdamW: True, or None (torch's default).

    The fused step updates every element in one pass of one kernel instead of a loop of whole-tensor
    operations: on the CPU, 3.2x faster over the simulated cluster's 16 rows of lstm_small when every
    row steps (bmuf), 1.1x where one row per group steps and is copied (sync, gtc), docs/performance.md
    ("fused Adam"). It equals the default only to float rounding, so it is off unless asked and
    committed results keep reproducing bit for bit. Over the N rows of P it gives the bits of N
    per-worker optimizers but for the few elements the kernel's scalar remainder steps at the end of
    a worker's tensor, which round apart by an ulp at times (tests/model/test_fused_optim.py).
    :class:`FrozenVarianceAdam` steps its frozen phase itself, so the two are refused together.
    """
    fused = optim.get("fused", False)
    if not isinstance(fused, bool):
        raise ConfigError(f"optim.fused={fused!r} is not allowed; use true or false")
    if fused and optim.get("name", "adam") in ("adam", "adamw") and optim.get("freeze_variance_after"):
        raise ConfigError(f"optim.fused=true does not apply to Adam with a frozen second moment (optim."
                          f"freeze_variance_after={optim['freeze_variance_after']}, also set by strategy.tau_units="
                          f"rms); set optim.fused=false")
    return True if fused else None


class FrozenVarianceAdam(torch.optim.Adam):
    """``torch.optim.Adam`` for ``freeze_after`` steps, then Adam with its second moment v frozen.

    Up to step T = ``freeze_after`` every step is ``torch.optim.Adam.step`` itself (bit for bit).
    After it, v (``exp_avg_sq``) and its bias correction stay those of step T while the first
    moment, its bias correction and the learning rate go on as in Adam. Weight decay is coupled (L2,
    added to the gradient) or, with ``decoupled_weight_decay``, AdamW's. The state is Adam's, so a
    checkpoint from either optimizer loads into the other.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, freeze_after: int,
                 decoupled_weight_decay: bool = False) -> None:
        if not (isinstance(freeze_after, int) and freeze_after >= 1):
            raise ValueError(f"Arg `freeze_after` (Adam steps before v is frozen) must be a positive integer, "
                             f"got {freeze_after!r}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         decoupled_weight_decay=decoupled_weight_decay, foreach=False)
        for group in self.param_groups:
            group["freeze_after"] = freeze_after

    def denominator(self, p: Tensor) -> Tensor | None:
        """sqrt(v_T / (1 - β2^T)) + ε for parameter `p` (the divisor of its steps) once v is frozen, else None."""
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                state = self.state.get(p)
                if not state or int(state["step"]) < group["freeze_after"]:
                    return None
                frozen = group["freeze_after"]
                return (state["exp_avg_sq"].sqrt() / (1 - group["betas"][1] ** frozen) ** 0.5).add_(group["eps"])
        raise KeyError("FrozenVarianceAdam.denominator: the tensor is not one of the optimizer's parameters")

    def _steps_done(self, group: dict[str, Any]) -> int:
        for p in group["params"]:
            state = self.state.get(p)
            if state and "step" in state:
                return int(state["step"])
        return 0

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if all(self._steps_done(g) < g["freeze_after"] for g in self.param_groups):
            super().step()
            return loss
        for group in self.param_groups:
            if self._steps_done(group) < group["freeze_after"]:
                raise RuntimeError("FrozenVarianceAdam: parameter groups froze at different steps")
            self._frozen_step(group)
        return loss

    def _frozen_step(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd, frozen = group["lr"], group["eps"], group["weight_decay"], group["freeze_after"]
        bias_correction2 = 1 - beta2 ** frozen
        params: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "exp_avg_sq" not in state:
                raise RuntimeError("FrozenVarianceAdam: a parameter without Adam state after the freeze")
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
        if not params:
            return
        step = int(self.state[params[0]]["step"])
        if wd != 0:
            if group["decoupled_weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * wd)
            else:
                grads = torch._foreach_add(grads, params, alpha=wd)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2 ** 0.5)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr / (1 - beta1 ** step))
