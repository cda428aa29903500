"""Gradient threshold compression (GTC; N. Strom, "Scalable distributed DNN training using
commodity GPU cloud computing", Interspeech 2015) as a DDP communication hook.

Each worker keeps the part of its gradient it has not sent yet, the residual r. Every step it
adds its new gradient to r and sends only the elements whose residual reached the threshold τ,
each as +τ or -τ in one 32-bit word; what is sent is taken out of r and the rest waits for
later steps (error feedback). Every worker decodes every worker's message and applies the mean.

Symbols (Strom 2015; config key in brackets)

    =====  =================  ===========================================================
    g      local gradient     this worker's gradient of one minibatch (one DDP bucket)
    r      residual           gradient not yet sent; fp32, per bucket, starts at 0
    τ      ``tau``            threshold, in gradient units: elements with |r| >= τ are sent
    N                         workers in the process group
    M_w                       worker w's message: {(i, ±τ) : |r_i| >= τ}, one word per element
    =====  =================  ===========================================================

Wire format of one element (step 3): bit 31 is the sign (1 = -τ), bits 0-30 the element's index
in its bucket, so a word is ``index | (sign << 31)`` read as an int32 and a negative word is a
negative update. A bucket therefore holds at most 2**31 elements (DDP buckets are ~25 MB).

The core (:func:`encode`, :func:`decode`, :func:`pack`, :func:`unpack`) works on plain tensors
with no process group, so a simulated cluster can run it for many logical workers;
:func:`exchange` holds the two collectives; :func:`gtc_hook` wires them into DDP and
:class:`GTCStrategy` into Lightning.
"""
from __future__ import annotations

import logging
import math
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.strategies import StrategyRegistry
from torch import Tensor

from asrbench.knobs import Knob
from asrbench.errors import ConfigError
from asrbench.strategies import gtc_kernel
from asrbench.strategies.accounting import CommStats
from asrbench.strategies.comm import collective_error, is_rank_zero
from asrbench.strategies.contract import synchronize as _synchronize
from asrbench.strategies.contract import FP32_BYTES, Collective, Simulation, StrategySpec, read_stats
from asrbench.strategies.base import refuse_hook_keywords
from asrbench.strategies.hooked import CommHookStrategy

log = logging.getLogger(__name__)

MAX_BUCKET_NUMEL = 2**31  # 31 index bits per word
INDEX_MASK = 0x7FFFFFFF
CHECKPOINT_KEY = "asrbench_gtc"  # checkpoint entry with every rank's residual
DEFAULT_TAU = 0.001  # keep in step with conf/strategy/gtc.yaml
TAU_UNITS = ("gradient", "rms")  # τ as Strom's (gradient units) or per element in units of Adam's frozen RMS


class NonFiniteGradientError(FloatingPointError):
    """A gradient (hence the residual r) holds NaN or inf."""


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


# ---------------------------------------------------------------------------------------------
# DDP communication hook
# ---------------------------------------------------------------------------------------------
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


def _world(state: GTCState) -> tuple[dist.ProcessGroup | None, int]:
    return state.process_group, dist.get_world_size(state.process_group)


def _exchange_dense(state: GTCState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """``pass_through``: the mean gradient by one all-reduce, as DDP's default hook does."""
    group, world = _world(state)
    buffer = bucket.buffer()
    state.comm_stats.record_all_reduce(buffer, world)
    state.comm_stats.record_dense(buffer.numel() * buffer.element_size(), world)
    state.record_bucket(buffer.numel(), buffer.numel(), bucket.is_last())
    fut = dist.all_reduce(buffer.div_(world), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def gtc_hook(state: GTCState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """GTC (Strom 2015) on one DDP bucket; the future holds the mean of the decoded messages.

    1. Accumulate: r <- r + g (:func:`accumulate`), r this bucket's fp32 residual.
    2. Select the elements with |r_i| >= τ (:func:`select`).
    3. Encode each as one 32-bit word, 31 bits of index and 1 bit of sign (:func:`pack`).
    4. Subtract what is sent: r_i <- r_i - (±τ) (:func:`subtract_sent`); the rest stays in r.
    5. Exchange (:func:`exchange`): all_gather the message lengths, then the messages padded
       to the longest.
    6. Decode every worker's message, adding ±τ at its indices, divide by N and return it as the
       bucket's gradient (:func:`decode`).

    With ``state.tau_units="rms"`` the gradient is first divided elementwise by d, Adam's frozen
    sqrt(v̂) + ε (:meth:`GTCState.element_scale`), and the decoded mean multiplied back by d: each
    element has its own threshold τ d_i, still sent as one bit of sign, since every rank knows d.

    Steps 1-4 are :func:`encode`. During ``state.dense_warmup_steps`` (and with ``pass_through``) the
    bucket is all-reduced dense instead and r is left alone. A non-finite r on any rank ends the step on every rank with one
    error naming the step and the rank(s); a lost peer ends it naming the rank at fault.
    """
    group, world = _world(state)
    state.hook_calls += 1
    if state.comm_stats.world_size != world:
        state.comm_stats.world_size = world
        state.comm_stats.rank = dist.get_rank(group)
    if state.sends_dense():
        return _exchange_dense(state, bucket)
    buffer = bucket.buffer()
    residual, mask = state.memory(bucket)
    fp32 = buffer.dtype == torch.float32
    scale = state.element_scale(bucket.parameters())
    if scale is not None:  # r accumulates g / d: GTC in units of Adam's RMS, τ_i = τ d_i in gradient units
        buffer.div_(scale)
    nonfinite = False
    try:
        words = encode(residual, buffer, state.tau, scratch=buffer if fp32 else None, mask=mask)
    except NonFiniteGradientError:
        words, nonfinite = torch.empty(0, dtype=torch.int32, device=buffer.device), True
    try:
        headers, fut = exchange(words, nonfinite, group)
    except RuntimeError as err:
        raise collective_error(err, f"GTC exchange of bucket {bucket.index()}", state.iter) from err
    if bool(headers[:, 1].any()):
        bad = [int(r) for r in torch.nonzero(headers[:, 1]).view(-1)]
        raise NonFiniteGradientError(f"GTC step {state.iter}: NaN/inf in the gradient of rank(s) "
                                     f"{', '.join(map(str, bad))} (bucket {bucket.index()}); lower the learning "
                                     f"rate or clip gradients")
    lmax = int(headers[:, 0].max())
    state.comm_stats.record_all_gather(headers[0], world)
    if fut is not None:
        state.comm_stats.record_all_gather(lmax * words.element_size(), world)
    state.comm_stats.record_dense(buffer.numel() * buffer.element_size(), world)
    state.record_bucket(words.numel(), buffer.numel(), bucket.is_last())
    out = buffer if fp32 else torch.empty(buffer.numel(), dtype=torch.float32, device=buffer.device)
    lengths = headers[:, 0]
    step, index = state.iter, bucket.index()

    def decode_messages(f: torch.futures.Future[Tensor] | None) -> Tensor:
        if f is None:
            out.zero_()
        else:
            try:
                padded = f.value()
            except RuntimeError as err:
                raise collective_error(err, f"GTC exchange of bucket {index}", step) from err
            decode(padded, lengths, buffer.numel(), state.tau, out)
        if scale is not None:
            out.mul_(scale)
        return buffer if fp32 else buffer.copy_(out)

    if fut is None:
        done: torch.futures.Future[Tensor] = torch.futures.Future()
        done.set_result(decode_messages(None))
        return done
    return fut.then(decode_messages)


# DDP inspects the hook's annotations as objects; with postponed evaluation they are strings.
gtc_hook.__annotations__.update(state=GTCState, bucket=dist.GradBucket, **{"return": torch.futures.Future[Tensor]})


# ---------------------------------------------------------------------------------------------
# Benchmark of the codec
# ---------------------------------------------------------------------------------------------
def benchmark_codec(numel: int = 10_000_000, density: float = 0.01, repeats: int = 10,
                    seed: int = 0) -> dict[str, float]:
    """Time encode + decode of one `numel` fp32 vector sending `density` of it, against one torch.add pass.

    Gradients are uniform in [-1, 1] and τ = 1 - density, so a fraction `density` of a zero residual
    is sent. Returns the best-of-`repeats` seconds of each and ``ratio`` = codec / add (<= 4 is the
    target: at least 25 % of an add's throughput).
    """

    gen = torch.Generator().manual_seed(seed)
    grad = torch.rand(numel, generator=gen).mul_(2).sub_(1)
    tau = 1.0 - density
    residual = torch.zeros(numel)
    scratch, out, mask = torch.empty(numel), torch.empty(numel), torch.empty(numel, dtype=torch.bool)

    def best(fn: Any, reset: Any = None) -> float:
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            if reset is not None:
                reset()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    def codec() -> None:
        words = encode(residual, grad, tau, scratch=scratch, mask=mask)
        decode(words.view(1, -1), None, numel, tau, out)

    t_codec = best(codec, reset=residual.zero_)
    t_add = best(lambda: torch.add(residual, grad, out=out))
    words = encode(residual.zero_(), grad, tau, scratch=scratch, mask=mask)
    return {"numel": float(numel), "density": words.numel() / numel, "codec_s": t_codec, "add_s": t_add,
            "ratio": t_codec / t_add, "threads": float(torch.get_num_threads()),
            "kernel": float(_cpu_kernel(residual, grad) is not None)}


# ---------------------------------------------------------------------------------------------
# Lightning strategy
# ---------------------------------------------------------------------------------------------
class GTCStrategy(CommHookStrategy):
    """DDP with :func:`gtc_hook` on every bucket, on CPU (gloo) as on GPU (NCCL).

    Keywords: ``tau`` (τ, gradient units), ``max_density`` (warn above this fraction of elements
    sent per step), ``density_warn_interval`` (steps between such warnings), ``pass_through``
    (dense all-reduce instead of GTC), ``dense_warmup_steps`` (steps all-reduced dense before GTC
    starts), ``tau_units`` (``gradient``: τ as Strom's; ``rms``: per element, τ times Adam's frozen
    sqrt(v̂) + ε), ``bucket_cap_mb`` (DDP bucket size, MB),
    ``gradient_as_bucket_view`` (gradients alias the bucket, so the hook decodes in place and no
    model-sized copy is kept); other keywords go to Lightning's ``DDPStrategy`` (``timeout``:
    collective timeout as a timedelta or seconds, ``start_method``, ``find_unused_parameters``, ...).

    Defaults: ``gradient_as_bucket_view=True`` because step 1 reads the gradient once into r, after
    which the bucket serves as step 2's scratch and step 6's output, so GTC adds only r (4 B per
    element) and a mask (1 B) to DDP's memory. ``bucket_cap_mb=25`` (DDP's default): each bucket
    costs two all_gathers whose latency outweighs a ~1 % payload, so few large buckets beat many
    small ones; smaller buckets only buy more overlap with the backward pass.

    Checkpoints hold every rank's residual under ``"asrbench_gtc"`` (rank 0 writes the file, so the
    residuals are gathered to it at save time); on load each rank takes its own.
    """

    registry_name = "asrbench_gtc"
    hook = staticmethod(gtc_hook)

    def __init__(self, tau: float = DEFAULT_TAU, max_density: float | None = 0.1, pass_through: bool = False,
                 bucket_cap_mb: float = 25.0, gradient_as_bucket_view: bool = True, density_warn_interval: int = 100,
                 dense_warmup_steps: int = 0, tau_units: str = "gradient", timeout: timedelta | float | None = None,
                 **kwargs: Any) -> None:
        refuse_hook_keywords(kwargs, "GTCStrategy registers its own DDP communication hook")
        state = GTCState(None, tau=tau, max_density=max_density, pass_through=pass_through,
                         density_warn_interval=density_warn_interval, dense_warmup_steps=dense_warmup_steps,
                         tau_units=tau_units)
        if rank_zero_only.rank == 0:  # every rank builds one; the launching process (rank 0) says it
            log.info("GTC config: tau = %s (%s units); max_density = %s; pass_through = %s; dense_warmup_steps = %s",
                     tau, tau_units, max_density, pass_through, dense_warmup_steps)
        gtc_kernel.load()  # built here, in the launching process, before any worker waits on a collective
        self._init_hook(state, timeout, bucket_cap_mb, gradient_as_bucket_view, **kwargs)

    def _frozen_adam_denominator(self, p: Tensor) -> Tensor | None:
        """For ``tau_units="rms"``: the optimizer's frozen sqrt(v̂) + ε of `p` (None before it freezes)."""
        optimizer = self.optimizers[0] if self.optimizers else None
        if not hasattr(optimizer, "denominator"):
            raise RuntimeError("GTC with tau_units=rms needs Adam with a frozen second moment "
                               "(optim.name=adam and optim.freeze_variance_after)")
        return optimizer.denominator(p)

    @property
    def gtc_state(self) -> GTCState:
        return self._hook_state

    def _bind_hook_state(self) -> None:
        super()._bind_hook_state()
        self._hook_state.scale_of = self._frozen_adam_denominator

    def comm_metrics(self) -> dict[str, float]:
        metrics = super().comm_metrics()
        metrics["tau"] = self._hook_state.tau
        return metrics

    rank_state_key = CHECKPOINT_KEY
    rank_state_what = "GTC residuals"


GTCStrategy.register_strategies(StrategyRegistry)  # Trainer(strategy="asrbench_gtc")


# ---------------------------------------------------------------------------------------------
# On the simulated cluster, and in the cost model
# ---------------------------------------------------------------------------------------------
GTC_HEADER_BYTES = 8  # the hook's header: (message length, non-finite flag) as two int32
LENGTH_BYTES = 8  # one message length per worker in the cost model's first all-gather


class GroupGTC:
    """GTC (Strom 2015) within groups of g consecutive workers, on the rows of G.

    Per group: :func:`encode` each member's row into its message (updating its residual row
    R[i]), then :func:`decode` the members' messages in rank order (the mean, ±τ/g at each sent
    index) into every row of the group, which is what the hook leaves in each member's bucket.
    GTC is elementwise, so DDP's split of the gradient into buckets changes no value; this
    treats the whole gradient as one bucket. `state` is worker 0's :class:`GTCState` (its
    statistics, density warnings and step counter); ``pass_through`` and the steps of
    ``dense_warmup_steps`` exchange the group mean dense, as the hook does.

    Besides worker 0's statistics it keeps what the cost model reads over all workers: message
    sizes (mean, and the largest per step: the padded size), and encode and decode times.
    """

    def __init__(self, state: GTCState, nodes: int, group_size: int, numel: int, device: torch.device) -> None:
        assert nodes % group_size == 0
        self.state, self.nodes, self.group_size, self.numel = state, nodes, group_size, numel
        self.device = device
        state.comm_stats.world_size, state.comm_stats.rank = group_size, 0
        self.residual = None if state.pass_through else torch.zeros(nodes, numel, device=device)  # R
        self.mask = None if state.pass_through else torch.empty(numel, dtype=torch.bool, device=device)
        self.steps = 0
        self.dense_steps = 0  # steps exchanged dense (pass_through, dense_warmup_steps): no messages
        self.elements_sent = 0  # over all workers and compressed steps
        self.largest_sum = 0  # sum over steps of the largest message of any worker (elements)
        self.encode_s = 0.0
        self.decode_s = 0.0
        self.decoded_elements = 0
        self.rows: Sequence[Tensor] = ()  # the workers' parameter rows, for tau_units=rms

    @torch.no_grad()
    def exchange(self, grads: Tensor, step: int) -> None:
        if self.state.sends_dense():
            self._exchange_dense(grads)
            return
        tau, g = self.state.tau, self.group_size
        rms = self.state.tau_units == "rms"  # GTC on g / d, decoded back times d (see gtc_hook)
        lengths = []
        for first in range(0, self.nodes, g):
            scales = [self.state.element_scale([self.rows[i]]) for i in range(first, first + g)] if rms else []
            for i, scale in enumerate(scales, start=first):
                grads[i].div_(scale)
            _synchronize(self.device)
            t0 = time.perf_counter()
            words = [self._encode(grads, i, step) for i in range(first, first + g)]
            _synchronize(self.device)
            t1 = time.perf_counter()
            decode(words, None, self.numel, tau, out=grads[first])
            grads[first + 1:first + g].copy_(grads[first].expand(g - 1, -1))
            for i, scale in enumerate(scales, start=first):
                grads[i].mul_(scale)
            _synchronize(self.device)
            self.encode_s += t1 - t0
            self.decode_s += time.perf_counter() - t1
            sizes = [w.numel() for w in words]
            self.decoded_elements += sum(sizes)
            lengths += sizes
        self.steps += 1
        self.elements_sent += sum(lengths)
        self.largest_sum += max(lengths)
        self._record_worker0(lengths[0], max(lengths[:g]))

    def _encode(self, grads: Tensor, i: int, step: int) -> Tensor:
        assert self.residual is not None
        try:
            return encode(self.residual[i], grads[i], self.state.tau, scratch=grads[i], mask=self.mask)
        except NonFiniteGradientError:
            raise NonFiniteGradientError(f"GTC step {step}: NaN/inf in the gradient of worker {i}; lower the "
                                         f"learning rate or clip gradients") from None

    def _record_worker0(self, sent: int, largest_in_group: int) -> None:
        """Worker 0's bytes, as :func:`gtc_hook` records them for one bucket."""
        stats, g = self.state.comm_stats, self.group_size
        stats.record_all_gather(GTC_HEADER_BYTES, g)
        if largest_in_group > 0:
            stats.record_all_gather(largest_in_group * FP32_BYTES, g)
        stats.record_dense(self.numel * FP32_BYTES, g)
        self.state.record_bucket(sent, self.numel, True)

    def _exchange_dense(self, grads: Tensor) -> None:
        g = self.group_size
        rows = grads.view(-1, g, self.numel)
        rows.copy_(rows.mean(1, keepdim=True).expand_as(rows))
        stats = self.state.comm_stats
        stats.record_all_reduce(self.numel * FP32_BYTES, g)
        stats.record_dense(self.numel * FP32_BYTES, g)
        self.state.record_bucket(self.numel, self.numel, True)
        self.steps += 1
        self.dense_steps += 1

    def cost_stats(self) -> dict[str, float]:
        """Per worker per compressed step: mean and largest (padded) message bytes, elements sent,
        decode rate; and the fraction of steps exchanged dense instead."""
        steps = max(self.steps - self.dense_steps, 1)
        per_worker = self.elements_sent / (steps * self.nodes)
        rate = (self.decoded_elements / self.decode_s if self.decoded_elements and self.decode_s > 0
                else measure_decode_rate(self.numel, self.device))
        return {"gtc_msg_bytes_mean": per_worker * FP32_BYTES,
                "gtc_msg_bytes_max": self.largest_sum / steps * FP32_BYTES,
                "elements_sent_per_step": per_worker, "decode_rate": rate,
                "gtc_dense_step_fraction": self.dense_steps / max(self.steps, 1)}


def measure_decode_rate(numel: int, device: torch.device, density: float = 0.01, repeats: int = 5) -> float:
    """GTC decode rate (elements per second) of one message sending `density` of `numel` elements."""
    k = max(1, int(numel * density))
    gen = torch.Generator().manual_seed(0)
    index = torch.randperm(numel, generator=gen)[:k].sort().values
    words = pack(index, torch.rand(k, generator=gen) < 0.5).to(device)
    out = torch.empty(numel, device=device)
    best = math.inf
    for _ in range(repeats + 1):
        _synchronize(device)
        t0 = time.perf_counter()
        decode([words], None, numel, 1.0, out=out)
        _synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return k / max(best, 1e-9)



GTC_KNOBS = {
    "tau": Knob(float, 0, low_open=True),
    "max_density": Knob(float, 0, 1, low_open=True, nullable=True),
    "density_warn_interval": Knob(int, 1),
    "dense_warmup_steps": Knob(int, 0),
    "tau_units": Knob(str, choices=TAU_UNITS),
    "pass_through": Knob(bool),
    "bucket_cap_mb": Knob(float, 0, low_open=True),
    "gradient_as_bucket_view": Knob(bool),
}
GTC_STATS_KEYS = ("gtc_msg_bytes_mean", "gtc_msg_bytes_max", "elements_sent_per_step", "decode_rate")
GTC_SIZE_KEYS = ("gtc_msg_bytes_mean", "gtc_msg_bytes_max", "elements_sent_per_step")


def simulate_gtc(strategy: Any, ctx: Any, group_size: int) -> GroupGTC | None:
    """GTC among groups of `group_size` rows (None for groups of one: a lone worker sends nothing)."""
    if group_size < 2:
        return None
    exchange = GroupGTC(strategy.gtc_state, ctx.nodes, group_size, ctx.numel, ctx.device)
    if strategy.gtc_state.tau_units == "rms":
        if not hasattr(ctx.optimizer, "denominator"):
            raise ConfigError("strategy.tau_units=rms needs Adam with a frozen second moment: set "
                              "optim.name=adam and strategy.dense_warmup_steps")
        strategy.gtc_state.scale_of = ctx.optimizer.denominator
        exchange.rows = ctx.rows
    return exchange


def gtc_cost_stats(exchange: GroupGTC | None, numel: int, device: torch.device) -> dict[str, float]:
    if exchange is not None:
        return exchange.cost_stats()
    return {"gtc_msg_bytes_mean": 0.0, "gtc_msg_bytes_max": 0.0, "elements_sent_per_step": 0.0,
            "decode_rate": measure_decode_rate(numel, device)}


def read_gtc_stats(name: str, stats: Mapping[str, Any], n: int, keys: Sequence[str]) -> dict[str, float]:
    """GTC's stats checked: max >= mean message, and the dense steps' fraction with their bytes."""
    out = read_stats(name, keys, stats, n)
    if out["gtc_msg_bytes_max"] < out["gtc_msg_bytes_mean"]:
        raise ValueError(f"stats['gtc_msg_bytes_max'] ({out['gtc_msg_bytes_max']}) must be >= "
                         f"stats['gtc_msg_bytes_mean'] ({out['gtc_msg_bytes_mean']})")
    if stats.get("gtc_dense_step_fraction"):
        f = out["gtc_dense_step_fraction"] = float(stats["gtc_dense_step_fraction"])
        if not 0 <= f <= 1:
            raise ValueError(f"stats['gtc_dense_step_fraction'] must be in [0, 1] (got {f})")
        if stats.get("dense_bytes_per_worker_per_step") is None:
            raise ValueError("stats['dense_bytes_per_worker_per_step'] is missing; GTC's dense steps "
                             "(gtc_dense_step_fraction > 0) need it")
        out["dense_bytes_per_worker_per_step"] = float(stats["dense_bytes_per_worker_per_step"])
    return out


def gtc_schedule(s: Mapping[str, float], workers: int) -> list[Collective]:
    """GTC among groups of `workers` consecutive ranks, every step: an all-gather of the message
    lengths, an all-gather of the messages padded to the largest (``gtc_msg_bytes_max``), the decode
    of the `workers` messages (e / r, r the measured decode rate: padding is not decoded); on the
    fraction f of steps sent dense (``dense_warmup_steps``), a ring all-reduce of the gradient instead.
    A lone worker applies its own update: nothing."""
    if workers == 1:
        return []
    f = s.get("gtc_dense_step_fraction", 0.0)
    elements = workers * s["elements_sent_per_step"]
    if not s["decode_rate"] > 0:
        raise ValueError(f"stats['decode_rate'] must be positive (got {s['decode_rate']}); measure it with the GTC "
                         f"decoder on the target device")
    out = [Collective("gtc_lengths", "all_gather", workers, nbytes=LENGTH_BYTES, share=1 - f),
           Collective("gtc_messages", "all_gather", workers, nbytes=s["gtc_msg_bytes_max"], share=1 - f),
           Collective("gtc_decode", "local", workers, seconds=elements / s["decode_rate"] if elements else 0.0,
                      share=1 - f)]
    if f > 0:
        out.append(Collective("gtc_dense_allreduce", "all_reduce", workers,
                              nbytes=s["dense_bytes_per_worker_per_step"], share=f))
    return out


def gtc_stacked_arrays(cfg: Mapping[str, Any]) -> dict[str, int]:
    return {} if cfg.get("pass_through") else {"residuals": 1}


class GTCSpec(StrategySpec):
    name = "gtc"
    summary = "gradient threshold compression (Strom 2015) as a DDP hook"
    order = 2
    strategy_class = GTCStrategy
    stats_keys = GTC_STATS_KEYS
    size_keys = GTC_SIZE_KEYS
    compresses = True
    knobs = GTC_KNOBS

    def stacked_arrays(self, cfg: Mapping[str, Any], nodes: int) -> dict[str, int]:
        return gtc_stacked_arrays(cfg)

    def simulate(self, strategy: Any, ctx: Any) -> Simulation:
        exchange = simulate_gtc(strategy, ctx, ctx.nodes)
        return Simulation(exchange=exchange, group_size=ctx.nodes)

    def read_stats(self, stats: Mapping[str, Any], n: int) -> dict[str, float]:
        return read_gtc_stats(self.name, stats, n, self.stats_keys)

    def schedule(self, stats: Mapping[str, float], n: int) -> list[Collective]:
        return gtc_schedule(stats, n)

    codec_settings = ({"density": 0.001}, {"density": 0.01})

    def codec_label(self, setting: Mapping[str, Any]) -> str:
        return f"{100 * float(setting['density']):g}%"

    def benchmark_codec(self, numel: int, repeats: int, seed: int, **setting: Any) -> dict[str, float]:
        out = benchmark_codec(numel, density=float(setting["density"]), repeats=repeats, seed=seed)
        out["encoder"] = "one-pass C++ kernel" if out.pop("kernel") else "eager torch passes"
        return out


SPECS = [GTCSpec()]
