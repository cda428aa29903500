"""Top-k sparsification with error feedback (Aji & Heafield, "Sparse Communication for Distributed
Gradient Descent", EMNLP 2017; Lin et al., "Deep Gradient Compression", ICLR 2018) as a DDP
communication hook: a fixed density d instead of GTC's fixed threshold τ.

Per worker and optimizer step:

1. Accumulate: r <- r + g (error feedback: what was not sent waits in r).
2. Select, per parameter tensor t of m_t elements (per layer, as DGC does, so DDP's split of
   the gradient into buckets changes nothing), the k_t = max(1, ceil(d m_t)) elements of largest
   |r| (``torch.topk``).
3. Send their values (fp32) and indices (int32); set r to 0 at the sent indices.
4. Every worker decodes every worker's message (a scatter-add of the values into zeros, in rank
   order), divides the sum by N and applies it as the gradient.

Every worker's message has the same length K = sum_t k_t, so step 3 is one all_gather with no
padding and no length header. During the first ``warmup_steps`` steps the gradient is all-reduced
dense instead and r stays 0.

Symbols (config key in brackets)

    =====  ====================  ========================================================
    g      local gradient        this worker's gradient of one minibatch
    r      residual              gradient not yet sent; fp32, per parameter, starts at 0
    d      ``density``           fraction of each tensor's elements sent per step, (0, 1]
    m_t                          elements of parameter tensor t
    k_t                          elements of tensor t sent per step: max(1, ceil(d m_t))
    K                            elements per message: sum of k_t over the tensors
    N                            workers in the process group
    M_w                          worker w's message: K fp32 values, then K int32 indices
    =====  ====================  ========================================================

The core (:func:`compress` = steps 1-3, :func:`decode` = step 4, :func:`pack`, :func:`unpack`)
works on plain (W, m_t) tensors, one row per worker; :class:`TopK` is it as a compressor of
:mod:`asrbench.strategies.hooked`, which runs it in the DDP hook (W = 1) and on the simulated
cluster (W = N) and counts its bytes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from asrbench.knobs import Knob
from asrbench.strategies import hooked
from asrbench.strategies.contract import FP32_BYTES

DEFAULT_DENSITY = 0.01  # keep in step with conf/strategy/topk.yaml
INDEX_BYTES = 4  # int32 index on the wire
ELEMENT_BYTES = FP32_BYTES + INDEX_BYTES  # one sent element: fp32 value + int32 index
MAX_BUCKET_NUMEL = 2**31 - 1  # int32 indices


def k_of(numel: int, density: float) -> int:
    """k_t = max(1, ceil(d m_t)), at most m_t; d m_t is rounded to 1e-6 first so 0.07 x 100 is 7, not 8."""
    return min(int(numel), max(1, math.ceil(round(density * numel, 6))))


def accumulate(residual: Tensor, grad: Tensor) -> None:
    """Step 1: r <- r + g."""
    residual.add_(grad)


def select(residual: Tensor, k: int) -> Tensor:
    """Step 2: the (W, k) indices of the k elements of largest |r| in each row of `residual` (W, m)."""
    return torch.topk(residual.abs(), k, dim=1, sorted=False).indices


def take_sent(residual: Tensor, index: Tensor) -> Tensor:
    """Step 3: the values of r at `index` (W, k), which are then set to 0 in r."""
    values = residual.gather(1, index)
    residual.scatter_(1, index, 0.0)
    return values


def compress(residuals: Sequence[Tensor], grads: Sequence[Tensor], ks: Sequence[int],
             offsets: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Steps 1-3 for W workers and the tensors t of one message: update each residual (W, m_t) in
    place and return the (W, K) fp32 values and int64 indices, tensor t's at ``offsets[t] + i``."""
    values, indices = [], []
    for residual, grad, k, offset in zip(residuals, grads, ks, offsets, strict=True):
        accumulate(residual, grad)
        index = select(residual, k)
        values.append(take_sent(residual, index))
        indices.append(index.add_(offset))
    return torch.cat(values, 1), torch.cat(indices, 1)


def decode(values: Tensor, index: Tensor, out: Tensor, workers: int) -> Tensor:
    """Step 4: ``out`` <- (sum of the messages (W, K), row w worker w's, scattered into zeros) / N,
    the rows added in rank order (one scatter-add over the rank-major flattening)."""
    out.zero_().scatter_add_(0, index.reshape(-1), values.reshape(-1).to(out.dtype))
    return out.div_(workers)


def pack(values: Tensor, index: Tensor) -> Tensor:
    """Step 3's wire format, a row per worker: one int32 buffer, the K fp32 values (their bits) then the K indices."""
    return torch.cat([values.view(torch.int32), index.to(torch.int32)], -1)


def unpack(gathered: Tensor, workers: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack` for `workers` messages end to end: (W, K) fp32 values, (W, K) int64 indices."""
    rows = gathered.reshape(workers, 2, -1)
    return rows[:, 0].view(torch.float32), rows[:, 1].long()


class Plan(NamedTuple):
    sizes: list[int]  # m_t
    offsets: list[int]
    ks: list[int]  # k_t


class TopK(hooked.Compressor):
    """Steps 1-4 as a compressor: ``density`` is d, the fraction of each tensor's elements sent."""

    name, label, memory_what, rate_key = "topk", "top-k", "top-k residuals", "decode_rate"
    element_bytes, knobs = ELEMENT_BYTES, {"density": Knob(float, 0, 1, low_open=True)}

    def __init__(self, density: float = DEFAULT_DENSITY) -> None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"Arg `density` (fraction of each tensor's elements sent per step) must be in (0, 1], "
                             f"got {density!r}")
        self.density = float(density)

    def plan(self, shapes: Sequence[torch.Size]) -> Plan:
        sizes = [math.prod(s) for s in shapes]
        if sum(sizes) > MAX_BUCKET_NUMEL:
            raise ValueError(f"A top-k bucket holds {sum(sizes)} elements but indices are int32; lower `bucket_cap_mb`")
        return Plan(sizes, [sum(sizes[:t]) for t in range(len(sizes))], [k_of(m, self.density) for m in sizes])

    def elements_sent(self, plan: Plan) -> int:
        return sum(plan.ks)

    def encode(self, x: Tensor, memory: Sequence[Tensor] | None, plan: Plan, world: int) -> tuple[Tensor, Any]:
        columns = hooked.split_columns(x, plan.sizes)
        return pack(*compress(memory, columns, plan.ks, plan.offsets)), None  # type: ignore[arg-type]

    def decode(self, received: Tensor, plan: Plan, out: Tensor, world: int, step: int,
               own: tuple[int, Any] | None = None) -> Tensor:
        return decode(*unpack(received, received.shape[0]), out, world)


class TopKState(hooked.CompressorState):
    """:class:`~asrbench.strategies.hooked.HookState` of :class:`TopK`: ``density``, ``warmup_steps``,
    the residual r per parameter (rank-local; ``memory(param)``, a (1, m) view), ``iter``."""

    __slots__ = ()
    compressor_class = TopK


class TopKStrategy(hooked.HookedStrategy):
    """DDP with top-k sparsification with error feedback on every bucket (keywords: ``density`` and
    :class:`~asrbench.strategies.hooked.HookedStrategy`'s); checkpoints hold every rank's residual;
    ``topk_state`` is its :class:`TopKState`."""

    compressor, state_class = TopK, TopKState


StackedTopK = hooked.SimulatedHook  # top-k on the simulated cluster: the rows of G, one message each


def benchmark_codec(numel: int, repeats: int = 10, seed: int = 0, density: float = DEFAULT_DENSITY) -> dict[str, float]:
    """Best-of-`repeats` seconds of steps 1-4 for one worker's `numel`-element gradient (one tensor)."""
    return hooked.benchmark_codec(TopK(density), numel, repeats, seed)


class TopKSpec(hooked.HookSpec):
    summary = "top-k sparsification with error feedback (Aji & Heafield 2017; DGC) as a DDP hook"
    order = 20
    strategy_class = TopKStrategy
    compresses = True
    codec_settings = ({"density": 0.001}, {"density": 0.01})


SPECS = [TopKSpec()]
