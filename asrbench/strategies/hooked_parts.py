"""The parts of :mod:`asrbench.strategies.hooked` that run inside a worker (see its docstring for
the steps): GRACE's three parts (:class:`Communicator`, :class:`Compressor`, :class:`ErrorFeedback`),
the hook's state with its one byte counter (:meth:`HookState.record`) and the DDP hooks
(:func:`dense_mean`, :func:`compressed_hook`). Plain tensors and a process group: no Lightning.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from asrbench.knobs import Knob
from asrbench.strategies.accounting import CommStats
from asrbench.strategies.comm import collective_error, is_rank_zero
from asrbench.strategies.contract import FP32_BYTES

log = logging.getLogger("asrbench.strategies.hooked")  # the hook strategies' messages under one logger name

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ---------------------------------------------------------------------------------------------
# The three parts
# ---------------------------------------------------------------------------------------------
class Communicator:
    """The collective that carries the messages: ``all_gather`` (every worker receives the N
    messages, (N, L)) or ``all_reduce`` (every worker receives their sum, (1, L))."""

    def __init__(self, op: str) -> None:
        assert op in ("all_gather", "all_reduce"), op
        self.op = op

    def start(self, message: Tensor, world: int, group: dist.ProcessGroup | None) -> tuple[Tensor, Any]:
        """Start the collective of this worker's `message` (L,): (what it will hold, its future)."""
        if self.op == "all_reduce":
            return message.view(1, -1), dist.all_reduce(message, group=group, async_op=True).get_future()
        gathered = message.new_empty(world * message.numel())
        work = _all_gather_single(gathered, message, group=group, async_op=True)
        return gathered.view(world, -1), work.get_future()

    def stacked(self, messages: Tensor) -> Tensor:
        """What every worker holds after the collective of the rows of `messages` (N, L), on one
        device: the rows themselves, or their sum in rank order."""
        return messages if self.op == "all_gather" else sum_in_rank_order(messages).view(1, -1)


ALL_GATHER, ALL_REDUCE = Communicator("all_gather"), Communicator("all_reduce")


class Compressor:
    """How one worker's gradient becomes its message and N messages the mean gradient.

    A subclass sets the class attributes and the methods below; ``__init__`` takes its knobs (the
    keywords of its strategy and the keys of ``conf/strategy/<name>.yaml``) and checks them with
    a ValueError naming the argument. A plan is what the compressor precomputes for one layout of
    parameters (a DDP bucket, or the whole model on the simulated cluster); it is cached.
    """

    name: str = ""  # the strategy's name (conf/strategy/<name>.yaml, cost keys <name>_*)
    label: str = ""  # for messages, e.g. "top-k"
    communicator: Communicator = ALL_GATHER
    error_feedback: bool = True  # keeps a residual per rank (ErrorFeedback)
    memory_what: str = "residuals"  # what the residual is, for messages (e.g. "1-bit SGD errors")
    stacked_name: str = "residuals"  # its (N, n) array on the simulated cluster, for the memory estimate
    knobs: Mapping[str, Knob] = {}  # the compressor's own knobs
    rate_key: str | None = None  # cost key of the decode rate (elements/s); None: <name>_decode_rate
    element_bytes: int | None = None  # bytes on the wire per element sent; None: message_bytes is the compressor's own
    decoded_key: str | None = "elements_sent_per_step"  # cost key of the elements decoded per message;
    # None: the dense gradient's elements (dense_bytes_per_worker_per_step / 4)

    def settings(self) -> dict[str, float]:
        """The hyper-parameters, saved beside the residual (a resume with others is warned of): each
        knob's value, kept in the attribute of the knob's name."""
        return {k: getattr(self, k) for k in self.knobs}

    def plan(self, shapes: Sequence[torch.Size]) -> Any:
        """What encode and decode need of these parameters' shapes (concatenated flat, in order)."""
        return list(shapes)

    def message_bytes(self, plan: Any) -> int:
        """Bytes of one worker's message: the one place a compressor's wire cost is stated; by
        default ``element_bytes`` per element sent."""
        if self.element_bytes is None:
            raise NotImplementedError
        return self.element_bytes * self.elements_sent(plan)

    def elements_sent(self, plan: Any) -> int:
        """Gradient elements one message carries (density = this / the plan's elements)."""
        raise NotImplementedError

    def decoded_elements(self, plan: Any) -> int:
        """Elements one worker decodes per received message (the decode rate's unit)."""
        return self.elements_sent(plan)

    def encode(self, x: Tensor, memory: Sequence[Tensor] | None, plan: Any, world: int) -> tuple[Tensor, Any]:
        """x (W, E) fp32, the gradients (may be overwritten), and each parameter's residual (W, m)
        (updated in place): the messages (W, L) and what the workers keep locally."""
        raise NotImplementedError

    def decode(self, received: Tensor, plan: Any, out: Tensor, world: int, step: int,
               own: tuple[int, Any] | None = None) -> Tensor:
        """The mean gradient of `world` workers from what the collective delivered, written to
        `out` (E,); `own` is (this rank, what its encode kept), so it need not decode its own message."""
        raise NotImplementedError

    def benchmark_shapes(self, numel: int) -> list[torch.Size]:
        """The parameter shapes `asrbench bench` times the codec on (one tensor of `numel`)."""
        return [torch.Size([numel])]


def split_columns(x: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """The column views (W, m) of x (W, E) holding each parameter of `sizes` elements, in order (no copy):
    a worker's gradient or residual cut per parameter tensor, as compressors and their memory work."""
    return [x[:, a:a + m] for a, m in zip(itertools.accumulate(sizes, initial=0), sizes)]


def sum_in_rank_order(rows: Tensor) -> Tensor:
    """The sum of the rows (N, ...) as ((r_0 + r_1) + r_2) + ...: the same floats on every path."""
    total = rows[0].clone()
    for row in rows[1:]:
        total.add_(row)
    return total


class ErrorFeedback:
    """GRACE's Memory: this rank's residual, per parameter (rank-local, fp32, starts at 0).

    One flat tensor in the canonical order of :meth:`bind` (the model's trainable parameters), a
    view per parameter, so DDP's rebuild of its buckets after the first step (a new split and
    order) moves nothing. `what` names it in messages.
    """

    __slots__ = ["flat", "_slots", "what"]

    def __init__(self, what: str = "residual") -> None:
        self.flat = torch.zeros(0)
        self._slots: dict[int, tuple[int, int]] = {}
        self.what = what

    def bind(self, parameters: Iterable[Tensor]) -> None:
        """Give each trainable parameter its slot, keeping a residual already loaded if it fits."""
        params = [p for p in parameters if p.requires_grad]
        offset, slots = 0, {}
        for p in params:
            slots[id(p)] = (offset, p.numel())
            offset += p.numel()
        self._check(self.flat.numel(), offset, allow_empty=True)
        device = params[0].device if params else self.flat.device
        self.flat = (torch.zeros(offset, device=device) if self.flat.numel() != offset
                     else self.flat.to(device=device, dtype=torch.float32))
        self._slots = slots

    def _check(self, saved: int, expected: int, allow_empty: bool = False) -> None:
        if saved != expected and not (allow_empty and saved == 0):
            raise ValueError(f"the {self.what} to restore has {saved} elements but the model's trainable "
                             f"parameters have {expected}: the checkpoint is of another model")

    def view(self, param: Tensor) -> Tensor:
        """This parameter's residual, a (1, m) view of the flat one."""
        slot = self._slots.get(id(param))
        if slot is None:
            raise RuntimeError(f"a DDP bucket holds a parameter the {self.what} were not bound to; "
                               f"call bind_parameters(model.parameters()) first")
        offset, numel = slot
        return self.flat[offset:offset + numel].view(1, numel)

    def views(self, params: Sequence[Tensor], device: torch.device) -> list[Tensor]:
        """The (1, m) views of these parameters' residuals (the memory moved to `device` first)."""
        if self.flat.device != device:
            self.flat = self.flat.to(device)
        return [self.view(p) for p in params]

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the slots, which name this process's parameters (bind again)."""
        return {"flat": self.flat, "what": self.what}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.flat, self.what, self._slots = state["flat"], state["what"], {}

    def load(self, flat: Tensor) -> None:
        if self._slots:
            self._check(flat.numel(), self.flat.numel())
        self.flat = flat.detach().to(device=self.flat.device, dtype=torch.float32, copy=True)


# ---------------------------------------------------------------------------------------------
# The hook's state and the one accounting helper
# ---------------------------------------------------------------------------------------------
class HookState:
    """The compressor (its hyper-parameters), ``warmup_steps``, this rank's error feedback, the
    step counter ``iter`` and the CommStats of :func:`compressed_hook`; checkpointed as
    ``state_dict()`` (rank-local), pickled without the process group."""

    __slots__ = [
        "process_group",
        # Hyper-parameters.
        "compressor",
        "warmup_steps",
        # Per-parameter memory (rank-local), and the compressor's plan per bucket layout.
        "error_feedback",
        "_plans",
        # Iteration counter.
        "iter",
        # Statistics.
        "comm_stats",
    ]

    def __init__(self, compressor: Compressor, process_group: dist.ProcessGroup | None = None,
                 warmup_steps: int = 0, parameters: Iterable[Tensor] | None = None) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Arg `warmup_steps` (steps all-reduced dense first) must be a non-negative integer, "
                             f"got {warmup_steps!r}")
        self.process_group = process_group
        self.compressor = compressor
        self.warmup_steps = int(warmup_steps)
        self.error_feedback = ErrorFeedback(compressor.memory_what)
        self._plans: dict[tuple[int, ...], Any] = {}
        self.iter = 0
        self.comm_stats = CommStats(world_size=1)
        if parameters is not None:
            self.bind_parameters(parameters)

    def bind_parameters(self, parameters: Iterable[Tensor]) -> None:
        """Fix the canonical order of the residual: these trainable parameters, in order."""
        self.error_feedback.bind(parameters if self.compressor.error_feedback else ())
        self._plans.clear()

    def memory(self, param: Tensor) -> Tensor:
        """This parameter's residual, a (1, m) view of the flat one."""
        return self.error_feedback.view(param)

    def sends_dense(self) -> bool:
        """Whether this step all-reduces the dense gradient (still in the warm-up)."""
        return self.iter < self.warmup_steps

    def plan_of(self, params: Sequence[Tensor]) -> Any:
        """The compressor's plan of a bucket's parameters, cached per bucket layout."""
        key = tuple(id(p) for p in params)
        if key not in self._plans:
            self._plans[key] = self.compressor.plan([p.shape for p in params])
        return self._plans[key]

    def join(self, group: dist.ProcessGroup | None) -> int:
        """The group's size, recorded with this rank in the statistics."""
        world = dist.get_world_size(group)
        if self.comm_stats.world_size != world:
            self.comm_stats.world_size, self.comm_stats.rank = world, dist.get_rank(group)
        return world

    def record(self, op: str, message_bytes: int, numel: int, sent: int, is_last: bool) -> None:
        """One exchange's bytes, counted the same way by the hook (per bucket) and the simulation
        (per step): the collective `op` of this worker's `message_bytes`, the dense equivalent (a
        ring all-reduce of `numel` fp32), `sent` of `numel` elements; the step closes on the last
        bucket, which advances ``iter``."""
        stats = self.comm_stats
        (stats.record_all_gather if op == "all_gather" else stats.record_all_reduce)(message_bytes)
        stats.record_dense(numel * FP32_BYTES)
        stats.record_elements(sent, numel)
        if is_last:
            stats.step()
            self.iter += 1

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Rank-local state as tensors and plain numbers (loads with ``weights_only=True``)."""
        return {"iter": self.iter, "residual": self.error_feedback.flat.detach().cpu().clone(),
                "comm_stats": self.comm_stats.state_dict(), **self.compressor.settings()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        residual = state["residual"] if "residual" in state else state["error"]  # "error": 1-bit SGD's earlier key
        self.error_feedback.load(residual)
        changed = {k: (state[k], v) for k, v in self.compressor.settings().items() if k in state and state[k] != v}
        if changed and is_rank_zero():
            log.warning("%s were saved with %s and resume with %s", self.error_feedback.what,
                        ", ".join(f"{k} {a}" for k, (a, _) in changed.items()),
                        ", ".join(f"{k} {b}" for k, (_, b) in changed.items()))
        self.iter = int(state["iter"])
        self.comm_stats.load_state_dict(state["comm_stats"])

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the process group and the plans (which name this process's parameters)."""
        return {slot: getattr(self, slot) for slot in HookState.__slots__ if slot not in ("process_group", "_plans")}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        """The process group becomes the default one (None); call :meth:`bind_parameters` again."""
        self.process_group, self._plans = None, {}
        for slot, value in state.items():
            setattr(self, slot, value)


class CompressorState(HookState):
    """A :class:`HookState` of one compressor, built from its knobs: a subclass sets
    ``compressor_class``; its keywords are the compressor's knobs (e.g. ``density``) beside
    ``process_group``, ``warmup_steps``, ``parameters`` (or a ready ``compressor``), and each knob
    reads back as an attribute of the state (``state.density``)."""

    __slots__ = ()
    compressor_class: type[Compressor]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for knob in cls.compressor_class.knobs:
            setattr(cls, knob, property(lambda self, k=knob: getattr(self.compressor, k)))

    def __init__(self, process_group: dist.ProcessGroup | None = None, warmup_steps: int = 0,
                 parameters: Iterable[Tensor] | None = None, compressor: Compressor | None = None,
                 **knobs: Any) -> None:
        super().__init__(compressor or self.compressor_class(**knobs), process_group, warmup_steps, parameters)


# ---------------------------------------------------------------------------------------------
# The DDP communication hook
# ---------------------------------------------------------------------------------------------
def ddp_hook(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a hook the annotations DDP checks as objects (with postponed evaluation they are strings)."""
    fn.__annotations__.update(bucket=dist.GradBucket, **{"return": torch.futures.Future[Tensor]})
    return fn


def _then(fut: Any, finish: Callable[[], Tensor], what: str, step: int) -> torch.futures.Future[Tensor]:
    """`fut` followed by `finish()`, a failed collective named as :func:`collective_error` names it."""
    def done(f: Any) -> Tensor:
        try:
            f.value()
        except RuntimeError as err:
            raise collective_error(err, what, step) from err
        return finish()

    return fut.then(done)


@ddp_hook
def dense_mean(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Step 1 (the warm-up): the mean gradient, dense, by an all-reduce whose sums run in rank
    order; the residual untouched.

    A reduce-scatter as one all_to_all (worker w receives every worker's chunk w and sums them in
    rank order, then divides by N), then an all_gather of the reduced chunks: the bytes of a ring
    all-reduce, 2 (N-1)/N of the gradient's, in a fixed order of additions (a ring's order depends
    on the library), so the simulated cluster reproduces it bit for bit (1-bit quantisation puts
    a threshold at 0, where one rounding of a different order can flip a bit later).
    """
    group, buffer = state.process_group, bucket.buffer()
    world, numel = state.join(group), buffer.numel()
    step, what = state.iter, f"{state.compressor.label} warm-up all-reduce of bucket {bucket.index()}"
    state.record("all_reduce", numel * FP32_BYTES, numel, numel, bucket.is_last())
    chunk = -(-numel // world)
    send = F.pad(buffer.to(torch.float32), (0, chunk * world - numel))
    received, gathered = torch.empty_like(send), torch.empty_like(send)
    try:
        dist.all_to_all_single(received, send, group=group)
        reduced = sum_in_rank_order(received.view(world, chunk)).div_(world)
        work = _all_gather_single(gathered, reduced, group=group, async_op=True)
    except RuntimeError as err:
        raise collective_error(err, what, step) from err
    return _then(work.get_future(), lambda: buffer.copy_(gathered[:numel]), what, step)


@ddp_hook
def compressed_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """A compressor with error feedback on one DDP bucket (steps 1-5 of the module docstring):
    warm-up (:func:`dense_mean`), encode, count the bytes (:meth:`HookState.record`),
    communicate, decode the mean back into the bucket."""
    if state.sends_dense():
        return dense_mean(state, bucket)
    c, group = state.compressor, state.process_group
    world, buffer, params = state.join(group), bucket.buffer(), bucket.parameters()
    assert sum(p.numel() for p in params) == buffer.numel(), f"{c.label} expects dense, unpadded buckets"
    plan = state.plan_of(params)
    x = (buffer if buffer.dtype == torch.float32 else buffer.to(torch.float32)).view(1, -1)
    memory = state.error_feedback.views(params, x.device) if c.error_feedback else None
    message, kept = c.encode(x, memory, plan, world)
    nbytes = c.message_bytes(plan)
    assert message.numel() * message.element_size() == nbytes, (message.shape, nbytes)
    step, what = state.iter, f"{c.label} exchange of bucket {bucket.index()}"
    state.record(c.communicator.op, nbytes, buffer.numel(), c.elements_sent(plan), bucket.is_last())
    try:
        received, fut = c.communicator.start(message[0], world, group)
    except RuntimeError as err:
        raise collective_error(err, what, step) from err
    own = (dist.get_rank(group), kept)

    def finish() -> Tensor:
        out = c.decode(received, plan, x[0], world, step, own)
        return buffer if out.data_ptr() == buffer.data_ptr() else buffer.copy_(out)

    return _then(fut, finish, what, step)
