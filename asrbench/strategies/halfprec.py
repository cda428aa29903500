"""Dense half-precision baselines: torch's ``fp16_compress_hook`` and ``bf16_compress_hook``
(``torch.distributed.algorithms.ddp_comm_hooks.default_hooks``), wrapped, not rewritten.

Per DDP bucket and optimizer step: cast the gradient to half precision (fp16 or bf16), divide it
by N in that precision, all-reduce (sum) the half-precision tensor, cast the sum back to fp32.
Every element is sent, at 2 bytes instead of 4: half of sync SGD's bytes, no error feedback,
nothing kept between steps. The baselines any compressor should beat in bytes or accuracy.

Equivalence with real workers. The simulated cluster (:class:`Half`) casts and divides as torch's
hook does and sums the N half-precision rows in rank order, each addition rounded to half
precision; gloo's ring sums them in its own order, so the two differ by a rounding of the half
format per addition, not by a rule: on the 2157-parameter equivalence model over 26 steps the
parameters differed by 7.9e-5 (relative, worst step and rank) with fp16 and 6.9e-4 with bf16's
8-bit significand; each spec's ``equivalence_tolerance`` (2e-4, 2e-3) allows 2.5x that
(tests/strategies/test_halfprec.py).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from asrbench.strategies import hooked

HALF_BYTES = 2  # one fp16 or bf16 element on the wire


class Half(hooked.Compressor):
    """The cast of torch's hook on rows (W, E): encode x -> half(x) / N, the all-reduce sums them,
    decode casts the sum back into ``out``. A subclass names the format (``dtype``)."""

    communicator, error_feedback, element_bytes = hooked.ALL_REDUCE, False, HALF_BYTES
    dtype: torch.dtype

    def plan(self, shapes: Sequence[torch.Size]) -> int:
        return sum(math.prod(s) for s in shapes)

    def elements_sent(self, plan: int) -> int:
        return plan

    def encode(self, x: Tensor, memory: Sequence[Tensor] | None, plan: int, world: int) -> tuple[Tensor, Any]:
        return x.to(self.dtype).div_(world), None

    def decode(self, received: Tensor, plan: int, out: Tensor, world: int, step: int,
               own: tuple[int, Any] | None = None) -> Tensor:
        return out.copy_(received[0])


class FP16(Half):
    name, label, dtype = "fp16", "fp16", torch.float16


class BF16(Half):
    name, label, dtype = "bf16", "bf16", torch.bfloat16


def accounted(torch_hook: Callable[[Any, dist.GradBucket], torch.futures.Future[Tensor]]) -> Callable[..., Any]:
    """torch's `torch_hook` (state: the process group) on a bucket after counting its bytes with
    :meth:`~asrbench.strategies.hooked.HookState.record`; the warm-up all-reduces dense fp32."""
    @hooked.ddp_hook
    def hook(state: hooked.HookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        if state.sends_dense():
            return hooked.dense_mean(state, bucket)
        state.join(state.process_group)
        c, plan, numel = state.compressor, state.plan_of(bucket.parameters()), bucket.buffer().numel()
        state.record(c.communicator.op, c.message_bytes(plan), numel, c.elements_sent(plan), bucket.is_last())
        return torch_hook(state.process_group, bucket)

    hook.__name__ = hook.__qualname__ = f"accounted_{torch_hook.__name__}"
    return hook


class FP16Strategy(hooked.HookedStrategy):
    """DDP with torch's fp16_compress_hook on every bucket (fp16 all-reduce of gradient / N), on CPU as on GPU."""

    compressor, hook = FP16, staticmethod(accounted(default_hooks.fp16_compress_hook))


class BF16Strategy(hooked.HookedStrategy):
    """DDP with torch's bf16_compress_hook on every bucket (bf16 all-reduce of gradient / N), on CPU as on GPU."""

    compressor, hook = BF16, staticmethod(accounted(default_hooks.bf16_compress_hook))


class FP16Spec(hooked.HookSpec):
    summary = "fp16 gradients: torch's fp16_compress_hook (cast, all-reduce, cast back), 2 bytes per element"
    order = 8
    strategy_class = FP16Strategy
    equivalence_tolerance = 2e-4  # gloo's fp16 sums in its ring order: 7.9e-5 measured (test_halfprec.py)


class BF16Spec(hooked.HookSpec):
    summary = "bf16 gradients: torch's bf16_compress_hook (cast, all-reduce, cast back), 2 bytes per element"
    order = 9
    strategy_class = BF16Strategy
    equivalence_tolerance = 2e-3  # bf16 keeps 8 significant bits to fp16's 11: 6.9e-4 measured


SPECS = [FP16Spec(), BF16Spec()]
