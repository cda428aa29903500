"""GTC's codec (Strom 2015; see :mod:`asrbench.strategies.gtc` for the symbols): steps 1-4 and 6
on plain flat tensors with no process group, so the simulated cluster runs them for many logical
workers, and step 5's two collectives (:func:`exchange`) in one place.

Wire format of one element (step 3): bit 31 is the sign (1 = -τ), bits 0-30 the element's index
in its bucket, so a word is ``index | (sign << 31)`` read as an int32.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from asrbench.strategies import gtc_kernel
from asrbench.strategies.errors import NonFiniteGradientError

MAX_BUCKET_NUMEL = 2**31  # 31 index bits per word
INDEX_MASK = 0x7FFFFFFF
DEFAULT_TAU = 0.001  # keep in step with conf/strategy/gtc.yaml
TAU_UNITS = ("gradient", "rms")  # τ as Strom's (gradient units) or per element in units of Adam's frozen RMS


# ---------------------------------------------------------------------------------------------
# Core: steps 1-4 and 6 on flat tensors, no process group
# ---------------------------------------------------------------------------------------------
def pack(index: Tensor, negative: Tensor) -> Tensor:
    """Step 3: one int32 word per element, ``index | (negative << 31)``; indices must be < 2**31."""
    words = index.to(torch.int32)
    return words.bitwise_or_(negative.to(torch.int32).bitwise_left_shift_(31))


def unpack(words: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack`: (int64 element indices, bool "value is -τ")."""
    return words.bitwise_and(INDEX_MASK).long(), words < 0


def quantum(negative: Tensor, tau: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """The value an element carries on the wire: -τ where `negative`, else +τ."""
    return torch.where(negative, -tau, tau).to(dtype)


def _flatnonzero(mask: Tensor) -> Tensor:
    """Ascending indices of the True elements of a flat bool tensor.

    On CPU, first finds the 8-byte blocks holding any True (an int64 view, 8 flags per word),
    then the flags inside those blocks only: at 1 % density about 2x faster than nonzero().
    """
    n = mask.numel()
    head = n - n % 8
    if mask.device.type != "cpu" or head == 0 or mask.storage_offset() % 8:
        return mask.nonzero().view(-1)
    blocks = torch.ne(mask[:head].view(torch.int64), 0).nonzero().view(-1)
    inside = mask[:head].view(-1, 8).index_select(0, blocks).view(-1).nonzero().view(-1)
    index = blocks.index_select(0, inside >> 3).mul_(8).add_(inside & 7)
    if head < n:
        index = torch.cat([index, mask[head:].nonzero().view(-1).add_(head)])
    return index


def accumulate(residual: Tensor, grad: Tensor) -> None:
    """Step 1: r <- r + g."""
    residual.add_(grad)


def _float32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def select(residual: Tensor, tau: float, scratch: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """Step 2: indices i with |r_i| >= τ.

    For fp32 r the test runs on the IEEE-754 bits: clearing the sign bit gives |r_i|, and
    non-negative floats order like their bit patterns read as integers. NaN and inf (exponent all
    ones) always pass, so the sent values are the only ones :func:`encode` checks for them.
    """
    if residual.dtype != torch.float32:
        return _flatnonzero(torch.lt(residual.abs(), tau).logical_not_())
    bits = scratch.view(torch.int32) if scratch is not None else None
    magnitude = torch.bitwise_and(residual.view(torch.int32), INDEX_MASK, out=bits) if bits is not None \
        else torch.bitwise_and(residual.view(torch.int32), INDEX_MASK)
    mask = torch.ge(magnitude, _float32_bits(tau), out=mask) if mask is not None \
        else torch.ge(magnitude, _float32_bits(tau))
    return _flatnonzero(mask)


def subtract_sent(residual: Tensor, index: Tensor, values: Tensor, negative: Tensor, tau: float) -> None:
    """Step 4: r_i <- r_i - (±τ) for the sent elements; everything else stays in r."""
    residual.scatter_(0, index, values.sub_(quantum(negative, tau, values.dtype)))


def encode(residual: Tensor, grad: Tensor, tau: float, *, scratch: Tensor | None = None,
           mask: Tensor | None = None, kernel: bool = True) -> Tensor:
    """Steps 1-4 for one worker and one flat bucket: update `residual` in place, return the words.

    `scratch` (float, like `residual`) and `mask` (bool) are optional preallocated work buffers of
    the same length; `scratch` may be `grad` itself, which is read first. On CPU with fp32 tensors
    the one-pass kernel of :mod:`asrbench.strategies.gtc_kernel` runs instead (same result; it
    needs neither buffer) unless `kernel` is False or it cannot be built. Raises
    :class:`NonFiniteGradientError` when r holds NaN/inf (checked on the selected values only:
    :func:`select` always selects non-finite elements).
    """
    if residual.numel() > MAX_BUCKET_NUMEL:
        raise ValueError(f"A GTC bucket holds {residual.numel()} elements but a word has 31 index bits "
                         f"(at most {MAX_BUCKET_NUMEL}); lower `bucket_cap_mb`")
    built = _cpu_kernel(residual, grad) if kernel else None
    if built is not None:  # the same steps 1-4 in one pass (asrbench.strategies.gtc_kernel)
        words, nonfinite = built.encode(residual, grad, float(tau))
        if nonfinite:
            raise NonFiniteGradientError("non-finite gradient elements")
        return words
    accumulate(residual, grad)
    index = select(residual, tau, scratch, mask)
    values = residual.index_select(0, index)
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteGradientError(f"{int((~torch.isfinite(values)).sum())} non-finite gradient elements")
    negative = values < 0
    words = pack(index, negative)
    subtract_sent(residual, index, values, negative, tau)
    return words


def _cpu_kernel(residual: Tensor, grad: Tensor) -> Any:
    """The one-pass C++ encoder where it applies (fp32, contiguous, on CPU) and could be built, else None."""
    if not (residual.device.type == grad.device.type == "cpu" and residual.dtype == grad.dtype == torch.float32
            and residual.is_contiguous() and grad.is_contiguous() and residual.numel() == grad.numel()):
        return None
    return gtc_kernel.load()


def decode(words: Tensor | Sequence[Tensor], lengths: Tensor | Sequence[int] | None, numel: int, tau: float,
           out: Tensor | None = None) -> Tensor:
    """Step 6: the mean over workers of their decoded messages, written into `out` (or a new tensor).

    `words` is either the gathered (N, L_max) matrix of messages padded to the longest, with
    `lengths` (N,) giving each worker's true length, or a sequence of N one-dimensional messages
    (`lengths` None). Each message adds ±τ at its indices and the sum is divided by N, computed as
    adding ±τ/N (no pass over the bucket; exact when N is a power of two, else within rounding).
    """
    if isinstance(words, Tensor) and words.dim() == 2:
        workers, lmax = words.shape
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=words.device).view(-1, 1)
            words = words[torch.arange(lmax, device=words.device).view(1, -1) < lengths]
        flat = words.reshape(-1)
    elif isinstance(words, Tensor):
        workers, flat = 1, words if lengths is None else words[: int(torch.as_tensor(lengths).reshape(-1)[0])]
    else:
        workers = len(words)
        flat = torch.cat(list(words)) if workers else torch.empty(0, dtype=torch.int32)
    if workers < 1:
        raise ValueError("decode needs the messages of at least one worker")
    index, negative = unpack(flat)
    if index.numel() and int(index.max()) >= numel:
        raise ValueError(f"a GTC message addresses element {int(index.max())} of a {numel}-element bucket: "
                         f"the workers' buckets differ (same model and bucket_cap_mb on every rank?)")
    out = torch.zeros(numel, dtype=torch.float32, device=flat.device) if out is None else out.zero_()
    return out.scatter_add_(0, index, quantum(negative, tau / workers, out.dtype))


# ---------------------------------------------------------------------------------------------
# Step 5: the collectives, in one place
# ---------------------------------------------------------------------------------------------
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def exchange(words: Tensor, nonfinite: bool, group: dist.ProcessGroup | None = None
             ) -> tuple[Tensor, torch.futures.Future[Tensor] | None]:
    """Step 5: all_gather the headers (length, non-finite flag), 8 bytes per worker, blocking; then
    start the all_gather of the messages padded to the longest.

    Returns the (N, 2) headers and a future of the (N, L_max) padded messages, or None when no
    worker sent anything or one reported non-finite values (then no message is exchanged).
    """
    world = dist.get_world_size(group)
    header = torch.tensor([words.numel(), int(nonfinite)], dtype=torch.int32, device=words.device)
    headers = header.new_empty(world * 2)
    _all_gather_single(headers, header, group=group)
    headers = headers.view(world, 2)
    lmax = int(headers[:, 0].max())
    if lmax == 0 or bool(headers[:, 1].any()):
        return headers, None
    padded = words.new_empty(world * lmax)
    work = _all_gather_single(padded, F.pad(words, (0, lmax - words.numel())), group=group, async_op=True)
    return headers, work.get_future().then(lambda fut: (fut.value(), padded.view(world, lmax))[1])
