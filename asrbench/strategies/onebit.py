"""1-bit SGD with error feedback (F. Seide, H. Fu, J. Droppo, G. Li, D. Yu, "1-Bit Stochastic
Gradient Descent and its Application to Data-Parallel Distributed Training of Speech DNNs",
Interspeech 2014; CNTK's implementation) as a DDP communication hook.

Every worker, every step, for each parameter tensor viewed as a matrix (``shape[0]`` rows, the
rest flattened into columns; a 1-D tensor is one column):

1. Compensate: x = g + e, adding the quantisation error carried from the previous step.
2. Quantise each column to one bit per element: b = [x >= 0]; the column's two reconstruction
   values are the mean of its elements with b = 1 and the mean of those with b = 0 (Seide 2014,
   Sec. 2: the values minimising the squared quantisation error; an empty side gets 0);
   q = the value of each element's side.
3. Carry the error: e = x - q (error feedback: nothing is lost, only delayed).
4. Exchange: every worker all-gathers every worker's message, its bits packed 8 per byte and its
   2 fp32 values per column, decodes each message to q_w and applies (sum_w q_w) / N, summed in
   rank order.

Symbols (Seide 2014; config key in brackets)

    =====  =====================  ========================================================
    g      local gradient         this worker's gradient of one minibatch
    e      error feedback         quantisation error carried to the next step; fp32, per
                                  parameter, rank-local, starts at 0
    x      compensated gradient   g + e
    b      bits                   [x >= 0], one per element
    v1,v0  reconstruction values  per column: mean of x over b = 1, over b = 0 (0 if empty)
    q      quantised gradient     v1 where b, else v0 (what the worker's message decodes to)
    N                             workers in the process group
    E, C                          elements and columns of the exchanged parameters
    W      ``warmup_steps``       first steps all-reduced dense (e stays 0)
    =====  =====================  ========================================================

Wire format of one worker's message (every worker's has the same size, 8 C + ceil(E / 8) bytes):
the (2, C) fp32 values (row 0: v1, row 1: v0; columns of the parameters in order) as bytes, then
the bits, element k of the flat gradient in bit k % 8 (weight 2^(k % 8)) of byte k // 8.

The core (:func:`quantise`, :func:`encode`, :func:`decode`, :func:`pack_bits`,
:func:`unpack_bits`, :func:`pack_message`, :func:`read_message`) works on plain tensors with no
process group, so the simulated cluster (:class:`OneBitExchange`) runs it for many logical
workers; :func:`onebit_hook` wires it into DDP and :class:`OneBitStrategy` into Lightning.
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
import torch.nn.functional as F
from lightning.pytorch.strategies import StrategyRegistry
from torch import Tensor

from asrbench.knobs import Knob
from asrbench.strategies.accounting import CommStats
from asrbench.strategies.base import AccountedDDPStrategy, refuse_hook_keywords
from asrbench.strategies.comm import collective_error
from asrbench.strategies.contract import synchronize as _synchronize
from asrbench.strategies.contract import (FP32_BYTES, Collective, SimContext, Simulation, StrategySpec, read_stats,
                                          time_codec)

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "asrbench_onebit"  # checkpoint entry with every rank's error feedback
_SHIFTS = torch.arange(8, dtype=torch.uint8)  # bit k % 8 of byte k // 8


class NonFiniteGradientError(FloatingPointError):
    """A worker's reconstruction values (hence its gradient or error) hold NaN or inf."""


# ---------------------------------------------------------------------------------------------
# Core: steps 1-4 on plain tensors, no process group
# ---------------------------------------------------------------------------------------------
def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, columns) of a parameter viewed as a matrix (shape[0], -1); a 1-D tensor is one column."""
    numel = math.prod(shape)
    rows = int(shape[0]) if len(shape) else 1
    return rows, (numel // rows if rows else 0)


def count_columns(shapes: Iterable[Sequence[int]]) -> int:
    """C: the columns of these parameters, each quantised on its own."""
    return sum(matrix_shape(s)[1] for s in shapes)


def message_bytes(numel: int, columns: int) -> int:
    """Bytes of one worker's message: ceil(E / 8) of bits and 2 fp32 values per column."""
    return -(-numel // 8) + 2 * FP32_BYTES * columns


def compensate(grad: Tensor, error: Tensor) -> Tensor:
    """Step 1: x = g + e, in place in `grad`."""
    return grad.add_(error)


def quantise(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Step 2 on the columns of x (..., R, C): the bits b = [x >= 0] (..., R, C) and the values
    v1, v0 (..., C), the means of each column over b = 1 and over b = 0 (0 where a side is empty)."""
    bits = x >= 0
    ones = bits.sum(-2)
    v1 = torch.where(bits, x, 0.0).sum(-2).div_(ones.clamp(min=1))
    v0 = torch.where(bits, 0.0, x).sum(-2).div_((x.shape[-2] - ones).clamp(min=1))
    return bits, v1, v0


def encode(x: Tensor, shapes: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Step 2 for a flat gradient (..., E), the parameters of `shapes` concatenated: bits (..., E)
    and values (..., 2, C), row 0 v1 and row 1 v0, the columns of the parameters in order."""
    lead = x.shape[:-1]
    bits, ones, zeros = [], [], []
    offset = 0
    for shape in shapes:
        rows, cols = matrix_shape(shape)
        if rows * cols == 0:
            continue
        b, v1, v0 = quantise(x[..., offset:offset + rows * cols].reshape(*lead, rows, cols))
        bits.append(b.reshape(*lead, rows * cols))
        ones.append(v1)
        zeros.append(v0)
        offset += rows * cols
    assert offset == x.shape[-1], f"{offset} elements in the shapes, {x.shape[-1]} in the gradient"
    if not bits:
        return x >= 0, x.new_zeros(*lead, 2, 0)
    return torch.cat(bits, -1), torch.stack([torch.cat(ones, -1), torch.cat(zeros, -1)], -2)


def column_index(shapes: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> Tensor:
    """For each element of the flat gradient, its column among the C (int64, (E,))."""
    pieces, first = [], 0
    for shape in shapes:
        rows, cols = matrix_shape(shape)
        if rows * cols:
            pieces.append(torch.arange(cols, device=device).repeat(rows).add_(first))
            first += cols
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=device)


def decode(bits: Tensor, values: Tensor, column: Tensor) -> Tensor:
    """q of one message: v1 of its column where the bit is set, else v0 ((E,) fp32)."""
    columns = values.shape[-1]
    index = torch.where(bits, column, column + columns)
    return values.reshape(-1).index_select(0, index)


def carry_error(x: Tensor, q: Tensor, out: Tensor | None = None) -> Tensor:
    """Step 3: e = x - q."""
    return torch.sub(x, q, out=out)


def pack_bits(bits: Tensor) -> Tensor:
    """Bits (..., E) as bytes (..., ceil(E / 8)): element k in bit k % 8 of byte k // 8."""
    pad = -bits.shape[-1] % 8
    grouped = F.pad(bits.to(torch.uint8), (0, pad)).view(*bits.shape[:-1], -1, 8)
    return grouped.bitwise_left_shift(_SHIFTS.to(bits.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first `numel` bits as bool (..., numel)."""
    shifted = packed.unsqueeze(-1).bitwise_right_shift(_SHIFTS.to(packed.device)).bitwise_and_(1)
    return shifted.view(*packed.shape[:-1], -1)[..., :numel].bool()


def pack_message(bits: Tensor, values: Tensor) -> Tensor:
    """One worker's message (uint8): the fp32 values (2, C) as bytes, then the packed bits."""
    return torch.cat([values.contiguous().view(torch.uint8).reshape(-1), pack_bits(bits)])


def read_message(message: Tensor, numel: int, columns: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack_message`: bits (E,) and values (2, C)."""
    head = 2 * FP32_BYTES * columns
    values = message[:head].clone().view(torch.float32).view(2, columns)  # clone: 4-byte aligned
    return unpack_bits(message[head:], numel), values


def check_finite(values: Tensor, step: int, workers: str = "rank") -> None:
    """Refuse NaN/inf in the gathered values (..., 2, C) of the N workers, naming them."""
    finite = torch.isfinite(values.reshape(values.shape[0], -1)).all(-1)
    if not bool(finite.all()):
        bad = ", ".join(str(int(w)) for w in torch.nonzero(~finite).view(-1))
        raise NonFiniteGradientError(f"1-bit SGD step {step}: NaN/inf in the gradient of {workers}(s) {bad}; "
                                     f"lower the learning rate or clip gradients")


# ---------------------------------------------------------------------------------------------
# DDP communication hook
# ---------------------------------------------------------------------------------------------
class OneBitState:
    """Hyper-parameters, per-parameter error feedback and the step counter of :func:`onebit_hook`.

    ``warmup_steps``: the first that many steps (counted by ``iter``, which a checkpoint keeps)
    all-reduce the dense gradient (summed in rank order) and leave e at 0. ``parameters``
    fixes the canonical order of the error memory (the model's trainable parameters): e is one
    flat fp32 tensor in that order, and each bucket reads and writes its parameters' slices, so
    DDP's rebuild of its buckets after the first step (a new order and split) moves nothing.
    """

    __slots__ = [
        "process_group",
        # Hyper-parameters.
        "warmup_steps",
        # Error memory (rank-local): flat e in the canonical order, id(param) -> (offset, numel).
        "error",
        "slots",
        "_columns",
        # Iteration counter.
        "iter",
        # Statistics.
        "comm_stats",
    ]

    def __init__(self, process_group: dist.ProcessGroup | None = None, warmup_steps: int = 0,
                 parameters: Iterable[Tensor] | None = None) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Arg `warmup_steps` (dense all-reduce steps before 1-bit SGD starts) must be a "
                             f"non-negative integer, got {warmup_steps!r}")
        self.process_group = process_group
        self.warmup_steps = warmup_steps
        self.error = torch.zeros(0)
        self.slots: dict[int, tuple[int, int]] = {}
        self._columns: dict[tuple[int, ...], Tensor] = {}
        self.iter = 0
        self.comm_stats = CommStats(world_size=1)
        if parameters is not None:
            self.bind_parameters(parameters)

    def bind_parameters(self, parameters: Iterable[Tensor]) -> None:
        """Fix the canonical order of e: these trainable parameters in order (e kept if it fits)."""
        slots, offset = {}, 0
        for p in parameters:
            if p.requires_grad:
                slots[id(p)] = (offset, p.numel())
                offset += p.numel()
        self.slots = slots
        if self.error.numel() != offset:
            self.error = torch.zeros(offset)
        self._columns.clear()

    def sends_dense(self) -> bool:
        return self.iter < self.warmup_steps

    def error_slices(self, params: Sequence[Tensor], device: torch.device) -> list[Tensor]:
        """The views of e holding these parameters' errors (e moved to `device`, grown for unbound ones)."""
        for p in params:
            if id(p) not in self.slots:
                self.slots[id(p)] = (self.error.numel(), p.numel())
                self.error = torch.cat([self.error, torch.zeros(p.numel(), device=self.error.device)])
        if self.error.device != device:
            self.error = self.error.to(device)
        return [self.error[o:o + n] for o, n in (self.slots[id(p)] for p in params)]

    def column_index(self, params: Sequence[Tensor], device: torch.device) -> Tensor:
        """:func:`column_index` of a bucket's parameters, cached per bucket layout."""
        key = tuple(id(p) for p in params)
        if key not in self._columns:
            self._columns[key] = column_index([p.shape for p in params], device)
        return self._columns[key]

    def close_step(self) -> None:
        self.comm_stats.step()
        self.iter += 1

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Rank-local state as tensors and plain numbers (loads with ``weights_only=True``)."""
        return {"iter": self.iter, "error": self.error.detach().cpu().clone(),
                "comm_stats": self.comm_stats.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        error = state["error"]
        if self.slots and error.numel() != self.error.numel():
            raise ValueError(f"the 1-bit SGD error to restore has {error.numel()} elements but the model's "
                             f"trainable parameters have {self.error.numel()}: the checkpoint is of another model")
        self.error = error.detach().to(torch.float32, copy=True)
        self.iter = int(state["iter"])
        self.comm_stats.load_state_dict(state["comm_stats"])

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the process group and the parameter identities (call bind_parameters again)."""
        return {"warmup_steps": self.warmup_steps, **self.state_dict()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.process_group, self.slots, self._columns = None, {}, {}
        self.warmup_steps = state["warmup_steps"]
        self.comm_stats = CommStats(world_size=1)
        self.error = torch.zeros(0)
        self.load_state_dict(state)


_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def sum_in_rank_order(rows: Tensor) -> Tensor:
    """The sum of the rows (N, ...) as ((r_0 + r_1) + r_2) + ...: the same floats on every path."""
    total = rows[0].clone()
    for row in rows[1:]:
        total.add_(row)
    return total


def _exchange_dense(state: OneBitState, bucket: dist.GradBucket, world: int) -> torch.futures.Future[Tensor]:
    """Warm-up: the mean gradient, dense, by an all-reduce whose sums run in rank order; e untouched.

    A reduce-scatter as one all_to_all (worker w receives every worker's chunk w and sums them in
    rank order, then divides by N), then an all_gather of the reduced chunks: the bytes of a ring
    all-reduce, 2 (N-1)/N of the gradient's, in a fixed order of additions (a ring's order depends
    on the library), so the simulated cluster reproduces it bit for bit. 1-bit quantisation puts a
    threshold at 0, where one rounding of a different order can flip a bit later.
    """
    group, buffer = state.process_group, bucket.buffer()
    state.comm_stats.record_all_reduce(buffer, world)
    state.comm_stats.record_dense(buffer.numel() * buffer.element_size(), world)
    state.comm_stats.record_elements(buffer.numel(), buffer.numel())
    step, index = state.iter, bucket.index()
    if bucket.is_last():
        state.close_step()
    numel = buffer.numel()
    chunk = -(-numel // world)
    send = F.pad(buffer.to(torch.float32), (0, chunk * world - numel))
    received = torch.empty_like(send)
    gathered = torch.empty_like(send)
    try:
        dist.all_to_all_single(received, send, group=group)
        reduced = sum_in_rank_order(received.view(world, chunk)).div_(world)
        work = _all_gather_single(gathered, reduced, group=group, async_op=True)
    except RuntimeError as err:
        raise collective_error(err, f"1-bit SGD warm-up all-reduce of bucket {index}", step) from err

    def apply_mean(fut: torch.futures.Future[Any]) -> Tensor:
        try:
            fut.value()
        except RuntimeError as err:
            raise collective_error(err, f"1-bit SGD warm-up all-reduce of bucket {index}", step) from err
        return buffer.copy_(gathered[:numel])

    return work.get_future().then(apply_mean)


def _compensate_bucket(x: Tensor, errors: Sequence[Tensor]) -> None:
    """Step 1 on a bucket: each parameter's slice of x plus its error."""
    offset = 0
    for e in errors:
        compensate(x[offset:offset + e.numel()], e)
        offset += e.numel()


def _carry_bucket(x: Tensor, q: Tensor, errors: Sequence[Tensor]) -> None:
    """Step 3 on a bucket: each parameter's error e = x - q, written into its slice of the memory."""
    offset = 0
    for e in errors:
        carry_error(x[offset:offset + e.numel()], q[offset:offset + e.numel()], out=e)
        offset += e.numel()


def mean_of_messages(messages: Tensor, numel: int, columns: int, column: Tensor, step: int) -> Tensor:
    """Step 4's receiving end: every worker's message (N, L) decoded and summed in rank order, / N."""
    decoded = [read_message(m, numel, columns) for m in messages]
    check_finite(torch.stack([values for _, values in decoded]), step)
    total = decode(*decoded[0], column)
    for bits, values in decoded[1:]:  # sum_in_rank_order, without holding N decoded gradients
        total.add_(decode(bits, values, column))
    return total.div_(len(decoded))


def onebit_hook(state: OneBitState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """1-bit SGD with error feedback (Seide et al. 2014) on one DDP bucket.

    1. Compensate: x = g + e, per parameter (:func:`compensate`); e is this rank's memory.
    2. Quantise each column of each parameter to one bit, with its two reconstruction values
       (:func:`encode`, :func:`quantise`).
    3. Carry the error: e = x - q, q the message decoded (:func:`decode`, :func:`carry_error`).
    4. Exchange: one all_gather of every worker's message (:func:`pack_message`), then decode them
       all and return their mean, summed in rank order, as the bucket's gradient
       (:func:`mean_of_messages`).

    During ``state.warmup_steps`` the bucket is all-reduced dense instead (:func:`_exchange_dense`,
    sums in rank order) and e stays 0. NaN/inf in
    any worker's values ends the step on every rank with one error naming the rank(s).
    """
    group = state.process_group
    world = dist.get_world_size(group)
    if state.comm_stats.world_size != world:
        state.comm_stats.world_size, state.comm_stats.rank = world, dist.get_rank(group)
    if state.sends_dense():
        return _exchange_dense(state, bucket, world)
    buffer = bucket.buffer()
    params = bucket.parameters()
    numel = buffer.numel()
    assert sum(p.numel() for p in params) == numel, "1-bit SGD expects dense, unpadded buckets"
    x = buffer if buffer.dtype == torch.float32 else buffer.to(torch.float32)
    errors = state.error_slices(params, x.device)
    column = state.column_index(params, x.device)
    shapes = [p.shape for p in params]
    _compensate_bucket(x, errors)
    bits, values = encode(x, shapes)
    message = pack_message(bits, values)
    _carry_bucket(x, decode(bits, values, column), errors)

    columns = values.shape[-1]
    gathered = message.new_empty(world * message.numel())
    step, index = state.iter, bucket.index()
    state.comm_stats.record_all_gather(message, world)
    state.comm_stats.record_dense(numel * FP32_BYTES, world)
    state.comm_stats.record_elements(numel, numel)
    if bucket.is_last():
        state.close_step()
    try:
        work = _all_gather_single(gathered, message, group=group, async_op=True)
    except RuntimeError as err:
        raise collective_error(err, f"1-bit SGD exchange of bucket {index}", step) from err

    def apply_mean(fut: torch.futures.Future[Any]) -> Tensor:
        try:
            fut.value()
        except RuntimeError as err:
            raise collective_error(err, f"1-bit SGD exchange of bucket {index}", step) from err
        mean = mean_of_messages(gathered.view(world, -1), numel, columns, column, step)
        return buffer.copy_(mean)

    return work.get_future().then(apply_mean)


# DDP inspects the hook's annotations as objects; with postponed evaluation they are strings.
onebit_hook.__annotations__.update(state=OneBitState, bucket=dist.GradBucket,
                                   **{"return": torch.futures.Future[Tensor]})


# ---------------------------------------------------------------------------------------------
# Lightning strategy
# ---------------------------------------------------------------------------------------------
class OneBitStrategy(AccountedDDPStrategy):
    """DDP with :func:`onebit_hook` (1-bit SGD, Seide 2014) on every bucket, on CPU as on GPU.

    Keywords: ``warmup_steps`` (steps all-reduced dense before 1-bit SGD starts),
    ``bucket_cap_mb`` (DDP bucket size, MB), ``gradient_as_bucket_view`` (gradients alias the
    bucket; the hook writes the mean back into it either way); other keywords go to Lightning's
    ``DDPStrategy`` (``timeout``: collective timeout as a timedelta or seconds, ...).

    Checkpoints hold every rank's error feedback under ``"asrbench_onebit"`` (rank 0 writes the
    file, so the errors are gathered to it at save time); on load each rank takes its own.
    """

    registry_name = "asrbench_onebit"

    def __init__(self, warmup_steps: int = 0, bucket_cap_mb: float = 25.0, gradient_as_bucket_view: bool = True,
                 timeout: timedelta | float | None = None, **kwargs: Any) -> None:
        refuse_hook_keywords(kwargs, "OneBitStrategy registers its own DDP communication hook")
        self._onebit_state = OneBitState(None, warmup_steps=warmup_steps)
        super().__init__(timeout=timeout, bucket_cap_mb=bucket_cap_mb,
                         gradient_as_bucket_view=gradient_as_bucket_view, **kwargs)

    @property
    def onebit_state(self) -> OneBitState:
        return self._onebit_state

    @property
    def comm_stats(self) -> CommStats:
        return self._onebit_state.comm_stats

    def _register_ddp_hooks(self) -> None:
        """Unlike DDPStrategy (CUDA only), register the hook on every device type."""
        self._onebit_state.bind_parameters(self.model.module.parameters())
        self.register_comm_hook(onebit_hook, self._onebit_state)

    rank_state_key = CHECKPOINT_KEY
    rank_state_what = "1-bit SGD errors"

    def rank_local_state(self) -> OneBitState:
        return self._onebit_state


OneBitStrategy.register_strategies(StrategyRegistry)  # Trainer(strategy="asrbench_onebit")


# ---------------------------------------------------------------------------------------------
# On the simulated cluster, and in the cost model
# ---------------------------------------------------------------------------------------------
class OneBitExchange:
    """1-bit SGD (Seide 2014) over the N rows of G, as :func:`onebit_hook` does on each worker.

    Steps 1-3 run on all rows at once (E (N, n), the stacked error feedback); step 4 decodes the N
    messages in rank order into their mean, written to every row. The whole gradient is one
    bucket (the columns are per parameter, so DDP's split changes no value; with several buckets
    the real path's byte counts round each bucket's bits up to whole bytes, this the whole
    gradient's). `state` is worker 0's :class:`OneBitState` (its statistics and step counter).
    """

    def __init__(self, state: OneBitState, nodes: int, shapes: Sequence[torch.Size], device: torch.device) -> None:
        self.state, self.nodes, self.group_size = state, nodes, nodes
        self.shapes = list(shapes)
        self.numel = sum(math.prod(s) for s in self.shapes)
        self.columns = count_columns(self.shapes)
        self.column = column_index(self.shapes, device)
        self.device = device
        state.comm_stats.world_size, state.comm_stats.rank = nodes, 0
        self.error = torch.zeros(nodes, self.numel, device=device)  # E, row i worker i's e
        self.steps = self.dense_steps = 0
        self.encode_s = self.decode_s = 0.0

    @torch.no_grad()
    def exchange(self, grads: Tensor, step: int) -> None:
        if self.state.sends_dense():
            self._exchange_dense(grads)
            return
        _synchronize(self.device)
        t0 = time.perf_counter()
        x = compensate(grads, self.error)  # step 1, in place in G
        bits, values = encode(x, self.shapes)  # step 2
        messages = [pack_message(bits[i], values[i]) for i in range(self.nodes)]
        for i in range(self.nodes):  # step 3, as each worker decodes its own message
            carry_error(x[i], decode(bits[i], values[i], self.column), out=self.error[i])
        _synchronize(self.device)
        t1 = time.perf_counter()
        try:
            mean = mean_of_messages(torch.stack(messages), self.numel, self.columns, self.column, step)  # step 4
        except NonFiniteGradientError as err:
            raise NonFiniteGradientError(str(err).replace("rank(s)", "worker(s)")) from None
        grads.copy_(mean.expand_as(grads))
        _synchronize(self.device)
        self.encode_s += t1 - t0
        self.decode_s += time.perf_counter() - t1
        stats = self.state.comm_stats
        stats.record_all_gather(messages[0], self.nodes)
        stats.record_dense(self.numel * FP32_BYTES, self.nodes)
        stats.record_elements(self.numel, self.numel)
        self.state.close_step()
        self.steps += 1

    def _exchange_dense(self, grads: Tensor) -> None:
        """The hook's warm-up: the rows summed in rank order, divided by N (bit for bit)."""
        grads.copy_(sum_in_rank_order(grads).div_(self.nodes).expand_as(grads))
        stats = self.state.comm_stats
        stats.record_all_reduce(self.numel * FP32_BYTES, self.nodes)
        stats.record_dense(self.numel * FP32_BYTES, self.nodes)
        stats.record_elements(self.numel, self.numel)
        self.state.close_step()
        self.steps += 1
        self.dense_steps += 1

    def cost_stats(self) -> dict[str, float]:
        """Per worker per step: the message bytes, the decode rate (elements per second of one
        worker decoding, measured over its N messages) and the fraction of dense warm-up steps."""
        onebit_steps = self.steps - self.dense_steps
        decoded = onebit_steps * self.nodes * self.numel
        rate = decoded / self.decode_s if decoded and self.decode_s > 0 else \
            measure_decode_rate(self.shapes, self.device)
        return {"onebit_msg_bytes": float(message_bytes(self.numel, self.columns)), "onebit_decode_rate": rate,
                "onebit_dense_step_fraction": self.dense_steps / max(self.steps, 1)}


def measure_decode_rate(shapes: Sequence[Sequence[int]], device: torch.device, repeats: int = 5) -> float:
    """Elements per second of :func:`mean_of_messages` on two random messages of these parameters."""
    numel, columns = sum(math.prod(s) for s in shapes), count_columns(shapes)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, numel, generator=gen).to(device)
    bits, values = encode(x, shapes)
    messages = torch.stack([pack_message(bits[i], values[i]) for i in range(2)])
    column = column_index(shapes, device)
    best = math.inf
    for _ in range(repeats + 1):
        _synchronize(device)
        t0 = time.perf_counter()
        mean_of_messages(messages, numel, columns, column, 0)
        _synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * numel / max(best, 1e-9)


def onebit_schedule(s: Mapping[str, float], n: int) -> list[Collective]:
    """Every step among all n workers: an all-gather of each worker's message (``onebit_msg_bytes``)
    and the decode of the n messages of E elements each (n E / r, r the measured decode rate; E from
    the dense gradient's bytes); on the fraction f of steps in the dense warm-up a ring all-reduce of
    the gradient instead. A lone worker applies its own gradient: nothing."""
    if n == 1:
        return []
    f = s.get("onebit_dense_step_fraction", 0.0)
    if not s["onebit_decode_rate"] > 0:
        raise ValueError(f"stats['onebit_decode_rate'] must be positive (got {s['onebit_decode_rate']}); measure it "
                         f"with the 1-bit decoder on the target device")
    elements = s["dense_bytes_per_worker_per_step"] / FP32_BYTES
    out = [Collective("onebit_messages", "all_gather", n, nbytes=s["onebit_msg_bytes"], share=1 - f),
           Collective("onebit_decode", "local", n, seconds=n * elements / s["onebit_decode_rate"], share=1 - f)]
    if f > 0:
        out.append(Collective("onebit_dense_allreduce", "all_reduce", n, nbytes=s["dense_bytes_per_worker_per_step"],
                              share=f))
    return out


ONEBIT_KNOBS = {
    "warmup_steps": Knob(int, 0),
    "bucket_cap_mb": Knob(float, 0, low_open=True),
    "gradient_as_bucket_view": Knob(bool),
}


class OneBitSpec(StrategySpec):
    name = "onebit"
    summary = "1-bit SGD with error feedback (Seide et al. 2014) as a DDP hook"
    order = 6
    strategy_class = OneBitStrategy
    stats_keys = ("onebit_msg_bytes", "onebit_decode_rate", "dense_bytes_per_worker_per_step")
    size_keys = ("onebit_msg_bytes",)
    compresses = False  # every element is sent, at one bit: the compression ratio shows the ~32x
    knobs = ONEBIT_KNOBS

    def stacked_arrays(self, cfg: Mapping[str, Any], nodes: int) -> dict[str, int]:
        return {"error feedback": 1}

    def simulate(self, strategy: Any, ctx: SimContext) -> Simulation:
        exchange = OneBitExchange(strategy.onebit_state, ctx.nodes, ctx.shapes, ctx.device)
        return Simulation(exchange=exchange, group_size=ctx.nodes)

    def read_stats(self, stats: Mapping[str, Any], n: int) -> dict[str, float]:
        """The schedule's keys, and the optional fraction of dense warm-up steps in [0, 1]."""
        out = read_stats(self.name, self.stats_keys, stats, n)
        if stats.get("onebit_dense_step_fraction") is not None:
            f = out["onebit_dense_step_fraction"] = float(stats["onebit_dense_step_fraction"])
            if not 0 <= f <= 1:
                raise ValueError(f"stats['onebit_dense_step_fraction'] must be in [0, 1] (got {f})")
        return out

    def schedule(self, stats: Mapping[str, float], n: int) -> list[Collective]:
        return onebit_schedule(stats, n)

    codec_settings = ({},)

    def benchmark_codec(self, numel: int, repeats: int, seed: int, **setting: Any) -> dict[str, float]:
        """Steps 1-3 and one decode of one worker's gradient of `numel` elements as a (1000, numel / 1000)
        matrix (plus a 1-D remainder): compensate, quantise, pack, unpack, decode, carry the error."""
        rows = min(1000, max(numel, 1))
        shapes = [torch.Size([rows, numel // rows])] + ([torch.Size([numel % rows])] if numel % rows else [])
        columns = count_columns(shapes)
        gen = torch.Generator().manual_seed(seed)
        grad = torch.randn(numel, generator=gen)
        x, error = torch.empty(numel), torch.zeros(numel)
        column = column_index(shapes)

        def codec() -> None:
            compensate(x.copy_(grad), error)
            bits, values = encode(x, shapes)
            received = read_message(pack_message(bits, values), numel, columns)
            carry_error(x, decode(*received, column), out=error)

        out = time_codec(codec, numel, repeats, reset=error.zero_)
        out["message_bytes"] = float(message_bytes(numel, columns))
        return out


SPECS = [OneBitSpec()]
