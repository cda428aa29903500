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
works on plain (W, m_t) tensors, one row per worker, with no process group: the DDP hook
(:func:`topk_hook`) calls it with W = 1 on its bucket, the simulated cluster (:class:`StackedTopK`)
with W = N on the rows of G.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.strategies import StrategyRegistry
from torch import Tensor

from asrbench.knobs import Knob
from asrbench.strategies.accounting import CommStats
from asrbench.strategies.base import AccountedDDPStrategy, refuse_hook_keywords
from asrbench.strategies.comm import collective_error, is_rank_zero
from asrbench.strategies.contract import synchronize as _synchronize
from asrbench.strategies.contract import (FP32_BYTES, Collective, SimContext, Simulation, StrategySpec, read_stats,
                                          time_codec)

log = logging.getLogger(__name__)

DEFAULT_DENSITY = 0.01  # keep in step with conf/strategy/topk.yaml
INDEX_BYTES = 4  # int32 index on the wire
ELEMENT_BYTES = FP32_BYTES + INDEX_BYTES  # one sent element: fp32 value + int32 index
MAX_BUCKET_NUMEL = 2**31 - 1  # int32 indices
CHECKPOINT_KEY = "asrbench_topk"  # checkpoint entry with every rank's residual


# ---------------------------------------------------------------------------------------------
# Core: steps 1-4 on (W, m) tensors, no process group
# ---------------------------------------------------------------------------------------------
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
    """Steps 1-3 for W workers and the tensors t of one message: update each residual in place and
    return the (W, K) fp32 values and (W, K) int64 indices, tensor t's at ``offsets[t] + i``.

    ``residuals[t]`` (fp32) and ``grads[t]`` are (W, m_t) views (the columns of tensor t); a row is
    one worker. ``ks[t]`` is k_t (:func:`k_of`).
    """
    values, indices = [], []
    for residual, grad, k, offset in zip(residuals, grads, ks, offsets, strict=True):
        accumulate(residual, grad)
        index = select(residual, k)
        values.append(take_sent(residual, index))
        indices.append(index.add_(offset))
    return torch.cat(values, 1), torch.cat(indices, 1)


def decode(values: Tensor, index: Tensor, out: Tensor, workers: int) -> Tensor:
    """Step 4: ``out`` <- (sum of every worker's message scattered into zeros) / N.

    `values` and `index` are (W, K), row w worker w's message; the rows are added in rank order
    (one scatter-add over the rank-major flattening), so every worker computes the same bits.
    """
    out.zero_().scatter_add_(0, index.reshape(-1), values.reshape(-1).to(out.dtype))
    return out.div_(workers)


def pack(values: Tensor, index: Tensor) -> Tensor:
    """Step 3's wire format: one int32 buffer, the K fp32 values (their bits) then the K int32 indices."""
    return torch.cat([values.reshape(-1).view(torch.int32), index.reshape(-1).to(torch.int32)])


def unpack(gathered: Tensor, workers: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack` for `workers` messages gathered end to end: (W, K) fp32 values, (W, K) int64 indices."""
    rows = gathered.view(workers, 2, -1)
    return rows[:, 0].view(torch.float32), rows[:, 1].long()


# ---------------------------------------------------------------------------------------------
# DDP communication hook
# ---------------------------------------------------------------------------------------------
class TopKState:
    """Hyper-parameters, per-parameter residuals and the step counter of :func:`topk_hook`.

    ``density`` (d, (0, 1]) is the fraction of each parameter tensor sent per step;
    ``warmup_steps`` the first steps (counted by ``iter``, which a checkpoint keeps) all-reduced
    dense, leaving r at 0. The residual is rank-local and kept per parameter (one flat fp32 tensor
    in the order of :meth:`bind_parameters`, a view per parameter), so DDP's rebuild of its buckets
    after the first step moves nothing.
    """

    __slots__ = [
        "process_group",
        # Hyper-parameters.
        "density",
        "warmup_steps",
        # Per-parameter memory (rank-local): r, and each parameter's (offset, numel) in it.
        "residual",
        "_slots",
        # Iteration counter.
        "iter",
        # Statistics.
        "comm_stats",
        "_step_sent",
        "_step_total",
    ]

    def __init__(self, process_group: dist.ProcessGroup | None = None, density: float = DEFAULT_DENSITY,
                 warmup_steps: int = 0, parameters: Iterable[Tensor] | None = None) -> None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"Arg `density` (fraction of each tensor's elements sent per step) must be in (0, 1], "
                             f"got {density!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Arg `warmup_steps` (steps all-reduced dense first) must be a non-negative integer, "
                             f"got {warmup_steps!r}")
        self.process_group = process_group
        self.density = float(density)
        self.warmup_steps = int(warmup_steps)
        self.residual: Tensor | None = None
        self._slots: dict[int, tuple[int, int]] = {}
        self.iter = 0
        self.comm_stats = CommStats(world_size=1)
        self._step_sent = 0
        self._step_total = 0
        if parameters is not None:
            self.bind_parameters(parameters)

    def bind_parameters(self, parameters: Iterable[Tensor]) -> None:
        """Give each trainable parameter its slot in r (in this order), keeping a residual already
        loaded from a checkpoint; r lives on the parameters' device."""
        params = [p for p in parameters if p.requires_grad]
        offset, slots = 0, {}
        for p in params:
            slots[id(p)] = (offset, p.numel())
            offset += p.numel()
        device = params[0].device if params else torch.device("cpu")
        if self.residual is not None and self.residual.numel() != offset:
            raise ValueError(f"the top-k residual to restore has {self.residual.numel()} elements but the model's "
                             f"trainable parameters have {offset}: the checkpoint is of another model")
        self.residual = (torch.zeros(offset, dtype=torch.float32, device=device) if self.residual is None
                         else self.residual.to(device=device, dtype=torch.float32))
        self._slots = slots

    def memory(self, param: Tensor) -> Tensor:
        """This parameter's residual, a (1, m) view of r."""
        slot = self._slots.get(id(param))
        if slot is None or self.residual is None:
            raise RuntimeError("a DDP bucket holds a parameter the top-k state was not bound to; "
                               "call TopKState.bind_parameters(model.parameters()) first")
        offset, numel = slot
        return self.residual[offset:offset + numel].view(1, numel)

    def sends_dense(self) -> bool:
        """Whether this step all-reduces the dense gradient (still in the warm-up)."""
        return self.iter < self.warmup_steps

    def record_bucket(self, elements_sent: int, elements_total: int, is_last: bool) -> None:
        """Count a bucket's elements; on the step's last bucket close the step."""
        self._step_sent += elements_sent
        self._step_total += elements_total
        if not is_last:
            return
        self.comm_stats.record_elements(self._step_sent, self._step_total)
        self.comm_stats.step()
        self._step_sent = self._step_total = 0
        self.iter += 1

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Rank-local state as tensors and plain numbers (loads with ``weights_only=True``)."""
        residual = self.residual.detach().cpu().clone() if self.residual is not None else torch.zeros(0)
        return {"iter": self.iter, "density": self.density, "residual": residual,
                "comm_stats": self.comm_stats.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        residual = state["residual"].detach().to(torch.float32)
        if self._slots and residual.numel() != self.residual.numel():  # type: ignore[union-attr]
            raise ValueError(f"the top-k residual to restore has {residual.numel()} elements but the model's "
                             f"trainable parameters have {self.residual.numel()}: "  # type: ignore[union-attr]
                             f"the checkpoint is of another model")
        if float(state.get("density", self.density)) != self.density and is_rank_zero():
            log.warning("top-k residuals were saved with density %s and resume with density %s",
                        state["density"], self.density)
        device = self.residual.device if self.residual is not None else torch.device("cpu")
        self.residual = residual.to(device).clone()
        self.iter = int(state["iter"])
        self.comm_stats.load_state_dict(state["comm_stats"])

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the process group (and the slots, which name this process's parameters)."""
        return {slot: getattr(self, slot) for slot in self.__slots__ if slot not in ("process_group", "_slots")}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        """The process group becomes the default one (None); call :meth:`bind_parameters` again."""
        self.process_group = None
        self._slots = {}
        for slot, value in state.items():
            setattr(self, slot, value)


def _bucket_pieces(state: TopKState, bucket: dist.GradBucket) -> tuple[list[Tensor], list[Tensor], list[int],
                                                                       list[int]]:
    """Per parameter of the bucket: its residual (1, m), its gradient in the buffer (1, m), k and offset."""
    buffer = bucket.buffer()
    residuals, grads, ks, offsets = [], [], [], []
    offset = 0
    for p in bucket.parameters():
        m = p.numel()
        residuals.append(state.memory(p))
        grads.append(buffer[offset:offset + m].view(1, m))
        ks.append(k_of(m, state.density))
        offsets.append(offset)
        offset += m
    assert offset == buffer.numel(), "top-k expects dense, unpadded buckets"
    return residuals, grads, ks, offsets


def _exchange_dense(state: TopKState, bucket: dist.GradBucket, world: int) -> torch.futures.Future[Tensor]:
    """A warm-up step: the mean gradient by one all-reduce, as DDP's default hook does."""
    buffer = bucket.buffer()
    state.comm_stats.record_all_reduce(buffer, world)
    state.comm_stats.record_dense(buffer.numel() * buffer.element_size(), world)
    state.record_bucket(buffer.numel(), buffer.numel(), bucket.is_last())
    fut = dist.all_reduce(buffer.div_(world), group=state.process_group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _all_gather_messages(message: Tensor, world: int, state: TopKState,
                         bucket: dist.GradBucket) -> tuple[Tensor, torch.futures.Future[Any]]:
    """Step 3's exchange: start one all_gather of the equal-length messages; (their buffer, its future)."""
    gathered = message.new_empty(world * message.numel())
    try:
        work = dist.all_gather_into_tensor(gathered, message, group=state.process_group, async_op=True)
    except RuntimeError as err:
        raise collective_error(err, f"top-k exchange of bucket {bucket.index()}", state.iter) from err
    return gathered, work.get_future()


def topk_hook(state: TopKState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Top-k sparsification with error feedback (Aji & Heafield 2017; Lin et al. 2018) on one DDP
    bucket; the future holds the mean of the decoded messages.

    1. Accumulate: r <- r + g per parameter of the bucket (:func:`accumulate`).
    2. Select per parameter tensor the k_t elements of largest |r| (:func:`select`).
    3. Take their values out of r (:func:`take_sent`), pack values and indices into one int32
       message (:func:`pack`) and all_gather the messages, all of one length
       (:func:`_all_gather_messages`). Steps 1-3 are :func:`compress`.
    4. Decode: scatter-add every worker's values at its indices in rank order, divide by N and
       return it as the bucket's gradient (:func:`unpack`, :func:`decode`).

    During ``state.warmup_steps`` the bucket is all-reduced dense instead and r is left alone.
    """
    world = dist.get_world_size(state.process_group)
    if state.comm_stats.world_size != world:
        state.comm_stats.world_size = world
        state.comm_stats.rank = dist.get_rank(state.process_group)
    if state.sends_dense():
        return _exchange_dense(state, bucket, world)
    buffer = bucket.buffer()
    if buffer.numel() > MAX_BUCKET_NUMEL:
        raise ValueError(f"A top-k bucket holds {buffer.numel()} elements but indices are int32; lower `bucket_cap_mb`")
    step, number = state.iter, bucket.index()
    values, index = compress(*_bucket_pieces(state, bucket))
    message = pack(values, index)
    gathered, fut = _all_gather_messages(message, world, state, bucket)
    state.comm_stats.record_all_gather(message, world)
    state.comm_stats.record_dense(buffer.numel() * buffer.element_size(), world)
    state.record_bucket(values.numel(), buffer.numel(), bucket.is_last())
    fp32 = buffer.dtype == torch.float32
    out = buffer if fp32 else torch.empty(buffer.numel(), dtype=torch.float32, device=buffer.device)

    def apply_mean(f: torch.futures.Future[Any]) -> Tensor:
        try:
            f.value()
        except RuntimeError as err:
            raise collective_error(err, f"top-k exchange of bucket {number}", step) from err
        decode(*unpack(gathered, world), out, world)
        return buffer if fp32 else buffer.copy_(out)

    return fut.then(apply_mean)


# DDP inspects the hook's annotations as objects; with postponed evaluation they are strings.
topk_hook.__annotations__.update(state=TopKState, bucket=dist.GradBucket, **{"return": torch.futures.Future[Tensor]})


# ---------------------------------------------------------------------------------------------
# Lightning strategy
# ---------------------------------------------------------------------------------------------
class TopKStrategy(AccountedDDPStrategy):
    """DDP with :func:`topk_hook` on every bucket, on CPU (gloo) as on GPU (NCCL).

    Keywords: ``density`` (d: fraction of each parameter tensor's elements sent per step),
    ``warmup_steps`` (steps all-reduced dense first), ``bucket_cap_mb`` (DDP bucket size, MB),
    ``gradient_as_bucket_view`` (gradients alias the bucket, so the mean is decoded in place);
    other keywords go to Lightning's ``DDPStrategy`` (``timeout``: seconds or a timedelta, ...).
    Checkpoints hold every rank's residual under ``"asrbench_topk"`` (gathered to rank 0, which
    writes the file); on load each rank takes its own.
    """

    registry_name = "asrbench_topk"

    def __init__(self, density: float = DEFAULT_DENSITY, warmup_steps: int = 0, bucket_cap_mb: float = 25.0,
                 gradient_as_bucket_view: bool = True, timeout: timedelta | float | None = None,
                 **kwargs: Any) -> None:
        refuse_hook_keywords(kwargs, "TopKStrategy registers its own DDP communication hook")
        self._topk_state = TopKState(None, density=density, warmup_steps=warmup_steps)
        if rank_zero_only.rank == 0:
            log.info("top-k config: density = %s; warmup_steps = %s", density, warmup_steps)
        super().__init__(timeout=timeout, bucket_cap_mb=bucket_cap_mb,
                         gradient_as_bucket_view=gradient_as_bucket_view, **kwargs)

    @property
    def topk_state(self) -> TopKState:
        return self._topk_state

    @property
    def comm_stats(self) -> CommStats:
        return self._topk_state.comm_stats

    def _register_ddp_hooks(self) -> None:
        """Unlike DDPStrategy (CUDA only), register the hook on every device type."""
        self._topk_state.bind_parameters(self.model.module.parameters())
        self.register_comm_hook(topk_hook, self._topk_state)

    def comm_metrics(self) -> dict[str, float]:
        metrics = super().comm_metrics()
        metrics["topk_density"] = self._topk_state.density
        return metrics

    rank_state_key = CHECKPOINT_KEY
    rank_state_what = "top-k residuals"

    def rank_local_state(self) -> TopKState:
        return self._topk_state


TopKStrategy.register_strategies(StrategyRegistry)  # Trainer(strategy="asrbench_topk")


# ---------------------------------------------------------------------------------------------
# On the simulated cluster, and in the cost model
# ---------------------------------------------------------------------------------------------
class StackedTopK:
    """Top-k with error feedback for N workers on the rows of G (the simulated cluster's exchange).

    :func:`compress` runs once over the (N, m_t) columns of every parameter tensor t (the rows of
    R, the stacked residuals), then :func:`decode` of the N messages in rank order writes the mean
    into every row: what :func:`topk_hook` leaves in each worker's gradient. Top-k is per tensor
    and decoding elementwise, so DDP's buckets change no value and this treats the row as one
    bucket. `state` is worker 0's :class:`TopKState` (its statistics and step counter); the
    ``warmup_steps`` exchange the dense mean. Also keeps what the cost model reads: the message
    size, encode and decode seconds, and the fraction of dense steps.
    """

    def __init__(self, state: TopKState, nodes: int, shapes: Sequence[torch.Size], device: torch.device) -> None:
        self.state, self.nodes, self.group_size, self.device = state, nodes, nodes, device
        state.comm_stats.world_size, state.comm_stats.rank = nodes, 0
        self.sizes = [math.prod(s) for s in shapes]
        self.numel = sum(self.sizes)
        self.offsets = [sum(self.sizes[:t]) for t in range(len(self.sizes))]
        self.ks = [k_of(m, state.density) for m in self.sizes]
        self.sent = sum(self.ks)  # K, elements of one worker's message
        self.residual = torch.zeros(nodes, self.numel, device=device)  # R
        self.steps = 0
        self.dense_steps = 0
        self.encode_s = 0.0
        self.decode_s = 0.0
        self.decoded_elements = 0

    def _columns(self, rows: Tensor) -> list[Tensor]:
        return [rows[:, a:a + m] for a, m in zip(self.offsets, self.sizes)]

    @torch.no_grad()
    def exchange(self, grads: Tensor, step: int) -> None:
        if self.state.sends_dense():
            self._exchange_dense(grads)
            return
        _synchronize(self.device)
        t0 = time.perf_counter()
        values, index = compress(self._columns(self.residual), self._columns(grads), self.ks, self.offsets)
        _synchronize(self.device)
        t1 = time.perf_counter()
        decode(values, index, grads[0], self.nodes)
        grads[1:].copy_(grads[0].expand(self.nodes - 1, -1))
        _synchronize(self.device)
        self.encode_s += t1 - t0
        self.decode_s += time.perf_counter() - t1
        self.decoded_elements += values.numel()
        self.steps += 1
        stats = self.state.comm_stats  # worker 0's, as topk_hook records them for one bucket
        stats.record_all_gather(ELEMENT_BYTES * self.sent, self.nodes)
        stats.record_dense(self.numel * FP32_BYTES, self.nodes)
        self.state.record_bucket(self.sent, self.numel, True)

    def _exchange_dense(self, grads: Tensor) -> None:
        grads.copy_(grads.mean(0, keepdim=True).expand_as(grads))
        stats = self.state.comm_stats
        stats.record_all_reduce(self.numel * FP32_BYTES, self.nodes)
        stats.record_dense(self.numel * FP32_BYTES, self.nodes)
        self.state.record_bucket(self.numel, self.numel, True)
        self.steps += 1
        self.dense_steps += 1

    def cost_stats(self) -> dict[str, float]:
        """Per worker per compressed step: message bytes, elements sent, decode rate (elements/s);
        and the fraction of steps all-reduced dense."""
        rate = (self.decoded_elements / self.decode_s if self.decoded_elements and self.decode_s > 0
                else measure_decode_rate(self.numel, self.device, self.state.density))
        return {"topk_msg_bytes": float(ELEMENT_BYTES * self.sent), "elements_sent_per_step": float(self.sent),
                "decode_rate": rate, "topk_dense_step_fraction": self.dense_steps / max(self.steps, 1)}


def measure_decode_rate(numel: int, device: torch.device, density: float = DEFAULT_DENSITY,
                        repeats: int = 5) -> float:
    """Decode rate (elements per second) of :func:`decode` on one message of `density` of `numel` elements."""
    k = k_of(numel, density)
    gen = torch.Generator().manual_seed(0)
    index = torch.randperm(numel, generator=gen)[:k].view(1, k).to(device)
    values = torch.randn(1, k, generator=gen).to(device)
    out = torch.empty(numel, device=device)
    best = math.inf
    for _ in range(repeats + 1):
        _synchronize(device)
        t0 = time.perf_counter()
        decode(values, index, out, 1)
        _synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return k / max(best, 1e-9)


def benchmark_codec(numel: int, repeats: int = 10, seed: int = 0, density: float = DEFAULT_DENSITY) -> dict[str, float]:
    """Best-of-`repeats` seconds of steps 1-4 for one worker's `numel`-element gradient (one tensor,
    a zero residual each time) beside one torch.add pass (:func:`time_codec`)."""
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(1, numel, generator=gen)
    residual = torch.zeros(1, numel)
    out = torch.empty(numel)
    k = k_of(numel, density)

    def codec() -> None:
        values, index = compress([residual], [grad], [k], [0])
        decode(values, index, out, 1)

    result = time_codec(codec, numel, repeats, reset=residual.zero_)
    result["density"] = k / numel
    return result


TOPK_KNOBS = {
    "density": Knob(float, 0, 1, low_open=True),
    "warmup_steps": Knob(int, 0),
    "bucket_cap_mb": Knob(float, 0, low_open=True),
    "gradient_as_bucket_view": Knob(bool),
}
TOPK_STATS_KEYS = ("topk_msg_bytes", "elements_sent_per_step", "decode_rate", "topk_dense_step_fraction",
                   "dense_bytes_per_worker_per_step")


def topk_schedule(s: Mapping[str, float], n: int) -> list[Collective]:
    """On the fraction 1 - f of steps after the warm-up: one all_gather of each worker's message
    (``topk_msg_bytes``) among the n workers, then the decode of the n messages (n e / r seconds, e
    the elements of one message, r the measured decode rate); on the fraction f, a ring all-reduce
    of the dense gradient. A lone worker applies its own gradient: nothing."""
    if n == 1:
        return []
    f = s["topk_dense_step_fraction"]
    elements = n * s["elements_sent_per_step"]
    out = [Collective("topk_messages", "all_gather", n, nbytes=s["topk_msg_bytes"], share=1 - f),
           Collective("topk_decode", "local", n, seconds=elements / s["decode_rate"], share=1 - f)]
    if f > 0:
        out.append(Collective("topk_dense_allreduce", "all_reduce", n,
                              nbytes=s["dense_bytes_per_worker_per_step"], share=f))
    return out


class TopKSpec(StrategySpec):
    name = "topk"
    summary = "top-k sparsification with error feedback (Aji & Heafield 2017; DGC) as a DDP hook"
    order = 20
    strategy_class = TopKStrategy
    stats_keys = TOPK_STATS_KEYS
    size_keys = ("topk_msg_bytes", "elements_sent_per_step")
    compresses = True
    knobs = TOPK_KNOBS

    def stacked_arrays(self, cfg: Mapping[str, Any], nodes: int) -> dict[str, int]:
        return {"residuals": 1}

    def simulate(self, strategy: Any, ctx: SimContext) -> Simulation:
        exchange = StackedTopK(strategy.topk_state, ctx.nodes, ctx.shapes, ctx.device)
        return Simulation(exchange=exchange, group_size=ctx.nodes)

    def read_stats(self, stats: Mapping[str, Any], n: int) -> dict[str, float]:
        out = read_stats(self.name, self.stats_keys, stats, n)
        if n > 1 and not out["decode_rate"] > 0:
            raise ValueError(f"stats['decode_rate'] must be positive (got {out['decode_rate']}); measure it with "
                             f"the top-k decoder on the target device")
        return out

    def schedule(self, stats: Mapping[str, float], n: int) -> list[Collective]:
        return topk_schedule(stats, n)

    codec_settings = ({"density": 0.001}, {"density": 0.01})

    def codec_label(self, setting: Mapping[str, Any]) -> str:
        return f"{100 * float(setting['density']):g}%"

    def benchmark_codec(self, numel: int, repeats: int, seed: int, **setting: Any) -> dict[str, float]:
        return benchmark_codec(numel, repeats=repeats, seed=seed, density=float(setting["density"]))


SPECS = [TopKSpec()]
