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

The core (:func:`quantise`, :func:`encode`, :func:`expand`, :func:`pack_bits`,
:func:`unpack_bits`, :func:`pack_message`, :func:`read_message`) works on plain tensors, one row
per worker, with no process group; :class:`OneBit` is it as a compressor of
:mod:`asrbench.strategies.hooked`, which runs it in the DDP hook (one row) and on the simulated
cluster (N rows) and counts its bytes. A worker decodes the N - 1 messages of the others and
keeps its own q from step 3.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from asrbench.strategies import hooked
from asrbench.strategies.contract import FP32_BYTES
from asrbench.strategies.errors import NonFiniteGradientError
from asrbench.strategies.hooked import sum_in_rank_order  # noqa: F401  (the warm-up's sum, for callers)

_SHIFTS = torch.arange(8, dtype=torch.uint8)  # bit k % 8 of byte k // 8


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
    """q of one message by an index: v1 of its column where the bit is set, else v0 ((E,) fp32).
    :func:`expand` computes the same floats without the (E,) int64 indices; this is its reference."""
    columns = values.shape[-1]
    index = torch.where(bits, column, column + columns)
    return values.reshape(-1).index_select(0, index)


def expand(bits: Tensor, values: Tensor, shapes: Sequence[Sequence[int]], out: Tensor | None = None) -> Tensor:
    """q of messages (..., E) from their bits (..., E) and values (..., 2, C): per parameter, its
    columns' v1 and v0 broadcast over its rows by one ``torch.where`` (no per-element index)."""
    lead = bits.shape[:-1]
    out = torch.empty(bits.shape, dtype=values.dtype, device=bits.device) if out is None else out
    offset = first = 0
    for shape in shapes:
        rows, cols = matrix_shape(shape)
        if rows * cols == 0:
            continue
        v = values[..., first:first + cols].unsqueeze(-2)  # (..., 2, 1, cols)
        torch.where(bits[..., offset:offset + rows * cols].view(*lead, rows, cols), v[..., 0, :, :], v[..., 1, :, :],
                    out=out[..., offset:offset + rows * cols].view(*lead, rows, cols))
        offset, first = offset + rows * cols, first + cols
    return out


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
    """Messages (..., L) uint8 of bits (..., E) and values (..., 2, C): the fp32 values as bytes, then the packed bits."""
    lead = bits.shape[:-1]
    return torch.cat([values.contiguous().view(torch.uint8).reshape(*lead, -1), pack_bits(bits)], -1)


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
        raise NonFiniteGradientError(f"NaN/inf in the gradient of {workers}(s) {bad}", method="1-bit SGD", step=step)


def _slices(x: Tensor, memory: Sequence[Tensor]) -> list[Tensor]:
    """The columns of x (W, E) that each parameter's error (W, m) is the memory of."""
    return hooked.split_columns(x, [e.shape[-1] for e in memory])


class Plan(NamedTuple):
    shapes: list[torch.Size]
    numel: int  # E
    columns: int  # C


# ---------------------------------------------------------------------------------------------
# The compressor, the strategy, the spec
# ---------------------------------------------------------------------------------------------
class OneBit(hooked.Compressor):
    """Steps 1-4 as a compressor (no knobs of its own)."""

    name, label, memory_what, stacked_name = "onebit", "1-bit SGD", "1-bit SGD errors", "error feedback"
    decoded_key = None  # a worker decodes every element of every message

    def plan(self, shapes: Sequence[torch.Size]) -> Plan:
        return Plan(list(shapes), sum(math.prod(s) for s in shapes), count_columns(shapes))

    def elements_sent(self, plan: Plan) -> int:
        return plan.numel

    def message_bytes(self, plan: Plan) -> int:
        return message_bytes(plan.numel, plan.columns)

    def encode(self, x: Tensor, memory: Sequence[Tensor] | None, plan: Plan, world: int) -> tuple[Tensor, Tensor]:
        """Steps 1-3 on rows (W, E): x = g + e, bits and values, e = x - q; the messages and q."""
        assert memory is not None
        for piece, e in zip(_slices(x, memory), memory):
            compensate(piece, e)
        bits, values = encode(x, plan.shapes)
        q = expand(bits, values, plan.shapes)
        for piece, q_piece, e in zip(_slices(x, memory), _slices(q, memory), memory):
            carry_error(piece, q_piece, out=e)
        return pack_message(bits, values), q

    def decode(self, received: Tensor, plan: Plan, out: Tensor, world: int, step: int,
               own: tuple[int, Tensor] | None = None) -> Tensor:
        """Step 4's receiving end: the N messages (N, L) decoded and summed in rank order, / N; a
        worker's own q (``own``) is taken as its encode computed it, not decoded again."""
        head = 2 * FP32_BYTES * plan.columns
        values = received[:, :head].clone(memory_format=torch.contiguous_format).view(torch.float32).view(-1, 2, plan.columns)  # clone: 4-byte aligned
        check_finite(values, step)
        q = torch.empty(plan.numel, device=out.device)
        for w in range(received.shape[0]):
            if own is not None and w == own[0]:
                mine = own[1].view(-1)
            else:
                mine = expand(unpack_bits(received[w, head:], plan.numel), values[w], plan.shapes, out=q)
            out.copy_(mine) if w == 0 else out.add_(mine)
        return out.div_(received.shape[0])

    def benchmark_shapes(self, numel: int) -> list[torch.Size]:
        """A (1000, numel / 1000) matrix, plus a 1-D remainder."""
        rows = min(1000, max(numel, 1))
        return [torch.Size([rows, numel // rows])] + ([torch.Size([numel % rows])] if numel % rows else [])


class OneBitState(hooked.CompressorState):
    """:class:`~asrbench.strategies.hooked.HookState` of :class:`OneBit`: ``warmup_steps``, the
    error e per parameter (rank-local; ``error`` is the flat tensor), ``iter``."""

    __slots__ = ()
    compressor_class = OneBit

    @property
    def error(self) -> Tensor:
        return self.error_feedback.flat

    def error_slices(self, params: Sequence[Tensor], device: torch.device) -> list[Tensor]:
        """The (1, m) views of e holding these parameters' errors (e moved to `device`)."""
        return self.error_feedback.views(params, device)


class OneBitStrategy(hooked.HookedStrategy):
    """DDP with 1-bit SGD (Seide 2014) on every bucket (keywords: :class:`~asrbench.strategies.hooked.HookedStrategy`'s);
    checkpoints hold every rank's error feedback; ``onebit_state`` is its :class:`OneBitState`."""

    compressor, state_class = OneBit, OneBitState


class OneBitExchange(hooked.SimulatedHook):
    """1-bit SGD over the N rows of G; ``error`` is E (N, n), row i worker i's e."""

    @property
    def error(self) -> Tensor:
        return self.residual


class OneBitSpec(hooked.HookSpec):
    summary = "1-bit SGD with error feedback (Seide et al. 2014) as a DDP hook"
    order = 6
    strategy_class = OneBitStrategy
    compresses = False  # every element is sent, at one bit: the compression ratio shows the ~32x


SPECS = [OneBitSpec()]
