"""One base for strategies that are a DDP communication hook on the gradient (top-k, 1-bit SGD,
fp16/bf16 casts): each is a compressor; this module wires it into DDP, the simulated cluster, the
byte accounting and the cost model once.

The split is GRACE's (H. Xu et al., "GRACE: A Compressed Communication Framework for Distributed
Machine Learning", ICDCS 2021): three small parts, of which only the compressor differs between
methods.

- :class:`Compressor`: ``encode`` one worker's flat gradient into the message it sends (what stays
  local, e.g. its own decoded message, is returned beside it and never sent), ``decode`` the
  messages the collective delivered into the mean gradient. Both work on rows (W, E), one row
  per worker: W = 1 in the hook, W = N on the simulated cluster, so the two paths run the same
  code. ``message_bytes`` declares once what one message costs on the wire.
- :class:`ErrorFeedback` (GRACE's Memory): this rank's residual, per parameter, rank-local;
  ``state_dict()`` of tensors, gathered to rank 0 in checkpoints (:class:`HookedStrategy`).
- :class:`Communicator`: an all-gather of equal-length messages, or an all-reduce (sum).

Per worker and optimizer step a hook strategy does, on every DDP bucket (:func:`compressed_hook`):

1. During the first ``warmup_steps`` steps, all-reduce the dense gradient (summed in rank order,
   :func:`dense_mean`) and stop; the residual stays 0.
2. Encode: ``compressor.encode`` on the bucket's gradient and its parameters' residuals.
3. Count the bytes: :meth:`HookState.record`, the one accounting helper the hook and the
   simulation (:class:`SimulatedHook`) both call, from ``compressor.message_bytes``.
4. Communicate: the compressor's collective of the message.
5. Decode: ``compressor.decode`` of what was received, written back into the bucket.

:class:`HookedStrategy` registers itself in Lightning's StrategyRegistry (``asrbench_<name>``)
when its class is defined, registers the hook on every device type (Lightning's DDPStrategy
only on CUDA), reads its CommStats from the hook state and checkpoints the residuals per rank.
:class:`HookSpec` derives the strategy's name, knobs, cost keys, simulation, schedule and codec
benchmark from the compressor. A strategy module is then its compressor, a Strategy and a Spec
of a few lines each.
"""
from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from asrbench.strategies.comm import collective_error, is_rank_zero
from asrbench.strategies.contract import (FP32_BYTES, Collective, SimContext, Simulation, StrategySpec, read_stats,
                                          synchronize, time_codec)

log = logging.getLogger(__name__)

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
    decoded_key: str | None = "elements_sent_per_step"  # cost key of the elements decoded per message;
    # None: the dense gradient's elements (dense_bytes_per_worker_per_step / 4)

    def settings(self) -> dict[str, float]:
        """The hyper-parameters, saved beside the residual (a resume with others is warned of)."""
        return {}

    def plan(self, shapes: Sequence[torch.Size]) -> Any:
        """What encode and decode need of these parameters' shapes (concatenated flat, in order)."""
        return list(shapes)

    def message_bytes(self, plan: Any) -> int:
        """Bytes of one worker's message: the one place a compressor's wire cost is stated."""
        raise NotImplementedError

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


# ---------------------------------------------------------------------------------------------
# The Lightning strategy
# ---------------------------------------------------------------------------------------------
class CommHookStrategy(AccountedDDPStrategy):
    """DDP with one communication hook and its state on every bucket, on CPU (gloo) as on GPU (NCCL).

    The wiring every hook strategy shares (GTC's and the compressors' of :class:`HookedStrategy`):
    a subclass sets ``hook`` and calls :meth:`_init_hook` from its ``__init__``; the hook state's
    ``bind_parameters`` fixes the canonical order of its memory before the hook is registered, on
    every device type (Lightning's DDPStrategy registers one only on CUDA). The state is this
    rank's checkpointed state (``rank_local_state``) and holds the CommStats.
    """

    hook: Callable[..., Any]

    def _init_hook(self, state: Any, timeout: timedelta | float | None, bucket_cap_mb: float,
                   gradient_as_bucket_view: bool, **kwargs: Any) -> None:
        """Keep `state` for the hook, then DDPStrategy's ``__init__`` with the rest."""
        self._hook_state = state
        super().__init__(timeout=timeout, bucket_cap_mb=bucket_cap_mb,
                         gradient_as_bucket_view=gradient_as_bucket_view, **kwargs)

    @property
    def hook_state(self) -> Any:
        return self._hook_state

    @property
    def comm_stats(self) -> CommStats:
        return self._hook_state.comm_stats

    def _bind_hook_state(self) -> None:
        """Before the hook is registered: bind the state to the model's parameters."""
        self._hook_state.bind_parameters(self.model.module.parameters())

    def _register_ddp_hooks(self) -> None:
        """Unlike DDPStrategy (CUDA only), register the hook on every device type."""
        self._bind_hook_state()
        self.register_comm_hook(type(self).hook, self._hook_state)

    def rank_local_state(self) -> Any:
        return self._hook_state


class HookedStrategy(CommHookStrategy):
    """DDP with a compressor's hook on every bucket, on CPU (gloo) as on GPU (NCCL).

    A subclass sets ``compressor`` (the class) and a docstring; it is registered in Lightning's
    StrategyRegistry as ``asrbench_<compressor.name>`` when defined. Keywords: the compressor's
    own, ``warmup_steps`` (steps all-reduced dense first), ``bucket_cap_mb`` (DDP bucket size,
    MB), ``gradient_as_bucket_view`` (gradients alias the bucket, so the mean is decoded in
    place); the rest go to Lightning's ``DDPStrategy`` (``timeout``: seconds or a timedelta, ...).
    Checkpoints hold every rank's :meth:`HookState.state_dict` under ``"asrbench_<name>"``
    (gathered to rank 0, which writes the file); on load each rank takes its own.
    """

    compressor: type[Compressor]
    state_class: type[HookState] = HookState  # a subclass of HookState may name its hyper-parameters
    hook: Callable[..., Any] = staticmethod(compressed_hook)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "compressor" in cls.__dict__:
            cls.registry_name = cls.rank_state_key = f"asrbench_{cls.compressor.name}"
            cls.rank_state_what = cls.compressor.memory_what
            cls.register_strategies(StrategyRegistry)  # Trainer(strategy="asrbench_<name>")
            if "__init__" not in cls.__dict__:
                cls.__init__ = _with_compressor_keywords(cls.__init__, cls.compressor)  # type: ignore[method-assign]

    def __init__(self, warmup_steps: int = 0, bucket_cap_mb: float = 25.0, gradient_as_bucket_view: bool = True,
                 timeout: timedelta | float | None = None, **kwargs: Any) -> None:
        refuse_hook_keywords(kwargs, f"{type(self).__name__} registers its own DDP communication hook")
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in self.compressor.knobs}
        state = self.state_class(compressor=self.compressor(**own), warmup_steps=warmup_steps)
        self._init_hook(state, timeout, bucket_cap_mb, gradient_as_bucket_view, **kwargs)

    def comm_metrics(self) -> dict[str, float]:
        c = self._hook_state.compressor
        return super().comm_metrics() | {f"{c.name}_{k}": float(v) for k, v in c.settings().items()}


def _with_compressor_keywords(init: Callable[..., None], compressor: type[Compressor]) -> Callable[..., None]:
    """`init` whose signature also names the compressor's keywords (keyword-only), so that
    ``inspect.signature(Strategy.__init__)`` lists every key the strategy's yaml may hold."""
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)

    base = list(inspect.signature(init).parameters.values())
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
           for name, p in inspect.signature(compressor.__init__).parameters.items() if name in compressor.knobs]
    __init__.__signature__ = inspect.Signature(base[:-1] + own + base[-1:])  # type: ignore[attr-defined]
    __init__.__doc__ = init.__doc__
    return __init__


# ---------------------------------------------------------------------------------------------
# On the simulated cluster
# ---------------------------------------------------------------------------------------------
class SimulatedHook:
    """A hook strategy for N workers on the rows of G (the simulated cluster's exchange).

    ``compressor.encode`` runs once over the N rows (their residuals are the column views of R,
    the stacked memory), then ``decode`` of what the collective would deliver writes the mean into
    every row: what the hook leaves in each worker's gradient. The compressors work per parameter
    tensor, so DDP's buckets change no value and the model is one bucket here. `state` is worker
    0's :class:`HookState` (its statistics and step counter); the warm-up steps sum the rows in
    rank order as :func:`dense_mean` does. Also keeps what the cost model reads.
    """

    def __init__(self, state: HookState, nodes: int, shapes: Sequence[torch.Size], device: torch.device) -> None:
        self.state, self.nodes, self.group_size, self.device = state, nodes, nodes, device
        state.comm_stats.world_size, state.comm_stats.rank = nodes, 0
        self.shapes = list(shapes)
        self.sizes = [math.prod(s) for s in self.shapes]
        self.numel = sum(self.sizes)
        self.plan = state.compressor.plan(self.shapes)
        self.residual = torch.zeros(nodes, self.numel if state.compressor.error_feedback else 0, device=device)  # R
        offsets = [sum(self.sizes[:t]) for t in range(len(self.sizes))]
        self.memory = ([self.residual[:, a:a + m] for a, m in zip(offsets, self.sizes)]
                       if state.compressor.error_feedback else None)
        self.steps = self.dense_steps = self.decoded = 0
        self.encode_s = self.decode_s = 0.0

    @torch.no_grad()
    def exchange(self, grads: Tensor, step: int) -> None:
        c, n = self.state.compressor, self.nodes
        if self.state.sends_dense():
            grads.copy_(sum_in_rank_order(grads).div_(n).expand_as(grads))
            self.state.record("all_reduce", self.numel * FP32_BYTES, self.numel, self.numel, True)
            self.steps += 1
            self.dense_steps += 1
            return
        synchronize(self.device)
        t0 = time.perf_counter()
        messages, _ = c.encode(grads, self.memory, self.plan, n)
        synchronize(self.device)
        t1 = time.perf_counter()
        try:
            c.decode(c.communicator.stacked(messages), self.plan, grads[0], n, step)
        except FloatingPointError as err:
            raise type(err)(str(err).replace("rank(s)", "worker(s)")) from None
        grads[1:].copy_(grads[0].expand(n - 1, -1))
        synchronize(self.device)
        self.encode_s += t1 - t0
        self.decode_s += time.perf_counter() - t1
        self.decoded += n * c.decoded_elements(self.plan)
        self.steps += 1
        self.state.record(c.communicator.op, c.message_bytes(self.plan), self.numel, c.elements_sent(self.plan), True)

    def cost_stats(self) -> dict[str, float]:
        """Per worker per compressed step: the message bytes, the elements it carries, the decode
        rate (elements per second, measured over the N messages) and the fraction of dense steps."""
        c = self.state.compressor
        keys = cost_keys(c)
        out = {keys["msg"]: float(c.message_bytes(self.plan)), "elements_sent_per_step": float(c.elements_sent(self.plan)),
               keys["dense_fraction"]: self.dense_steps / max(self.steps, 1)}
        if keys["rate"]:
            out[keys["rate"]] = (self.decoded / self.decode_s if self.decoded and self.decode_s > 0
                                 else measure_decode_rate(c, self.shapes, self.device))
        return out


def cost_keys(c: Compressor | type[Compressor]) -> dict[str, str | None]:
    """The cost model's keys of a compressor's strategy: message bytes, decode rate (None for an
    all-reduce, which decodes nothing worth pricing), fraction of dense warm-up steps."""
    gather = c.communicator.op == "all_gather"
    return {"msg": f"{c.name}_msg_bytes", "rate": (c.rate_key or f"{c.name}_decode_rate") if gather else None,
            "dense_fraction": f"{c.name}_dense_step_fraction"}


def _random_messages(c: Compressor, shapes: Sequence[torch.Size], device: torch.device, workers: int,
                     seed: int = 0) -> tuple[Any, Tensor, Tensor | None]:
    """(plan, gradients (W, E), zero residual (W, E) or None) of random gradients, for timing."""
    plan = c.plan(shapes)
    numel = sum(math.prod(s) for s in shapes)
    x = torch.randn(workers, numel, generator=torch.Generator().manual_seed(seed)).to(device)
    residual = torch.zeros(workers, numel, device=device) if c.error_feedback else None
    return plan, x, residual


def _views(residual: Tensor | None, shapes: Sequence[torch.Size]) -> list[Tensor] | None:
    if residual is None:
        return None
    sizes = [math.prod(s) for s in shapes]
    return [residual[:, sum(sizes[:t]):sum(sizes[:t]) + m] for t, m in enumerate(sizes)]


def measure_decode_rate(c: Compressor, shapes: Sequence[torch.Size], device: torch.device,
                        repeats: int = 5) -> float:
    """Elements per second of ``c.decode`` of two random messages of these parameters."""
    plan, x, residual = _random_messages(c, shapes, device, 2)
    messages, _ = c.encode(x, _views(residual, shapes), plan, 2)
    received = c.communicator.stacked(messages)
    out = torch.empty(x.shape[1], device=device)
    best = math.inf
    for _ in range(repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        c.decode(received, plan, out, 2, 0)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * c.decoded_elements(plan) / max(best, 1e-9)


def benchmark_codec(c: Compressor, numel: int, repeats: int = 10, seed: int = 0) -> dict[str, float]:
    """Best-of-`repeats` seconds of one worker's encode and decode of its own message (a
    `numel`-element gradient in ``c.benchmark_shapes``, a zero residual each time) beside one
    torch.add pass (:func:`time_codec`); also the density and the message's bytes."""
    shapes = c.benchmark_shapes(numel)
    plan, grad, residual = _random_messages(c, shapes, torch.device("cpu"), 1, seed)
    x, out, memory = torch.empty_like(grad), torch.empty(numel), _views(residual, shapes)

    def codec() -> None:
        messages, _ = c.encode(x.copy_(grad), memory, plan, 1)
        c.decode(c.communicator.stacked(messages), plan, out, 1, 0)

    result = time_codec(codec, numel, repeats, reset=None if residual is None else residual.zero_)
    return result | {"density": c.elements_sent(plan) / numel, "message_bytes": float(c.message_bytes(plan))}


# ---------------------------------------------------------------------------------------------
# The spec: registry entry, simulation, cost model
# ---------------------------------------------------------------------------------------------
HOOK_KNOBS = {
    "warmup_steps": Knob(int, 0),
    "bucket_cap_mb": Knob(float, 0, low_open=True),
    "gradient_as_bucket_view": Knob(bool),
}


class HookSpec(StrategySpec):
    """The spec of a :class:`HookedStrategy`: a subclass sets ``strategy_class``, ``summary`` and
    ``order``; name, knobs, cost keys, simulation, schedule and codec benchmark follow from the
    strategy's compressor."""

    codec_settings: tuple[Mapping[str, Any], ...] = ({},)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        c = cls.strategy_class.compressor  # type: ignore[union-attr]
        keys = cost_keys(c)
        cls.name, cls.knobs = c.name, {**c.knobs, **HOOK_KNOBS}
        decoded = (c.decoded_key,) if keys["rate"] and c.decoded_key else ()
        cls.size_keys = (keys["msg"], *decoded)
        cls.stats_keys = (*cls.size_keys, *((keys["rate"],) if keys["rate"] else ()), "dense_bytes_per_worker_per_step")

    def stacked_arrays(self, cfg: Mapping[str, Any], nodes: int) -> dict[str, int]:
        c = self.strategy_class.compressor  # type: ignore[union-attr]
        return {c.stacked_name: 1} if c.error_feedback else {}

    def simulate(self, strategy: Any, ctx: SimContext) -> Simulation:
        return Simulation(exchange=SimulatedHook(strategy.hook_state, ctx.nodes, ctx.shapes, ctx.device),
                          group_size=ctx.nodes)

    def read_stats(self, stats: Mapping[str, Any], n: int) -> dict[str, float]:
        """The schedule's keys, the optional fraction of dense warm-up steps in [0, 1], and a
        positive decode rate (ValueError naming the key)."""
        keys = cost_keys(self.strategy_class.compressor)  # type: ignore[union-attr]
        optional = (keys["dense_fraction"],) if stats.get(keys["dense_fraction"]) is not None else ()
        out = read_stats(self.name, (*self.stats_keys, *optional), stats, n)
        rate = keys["rate"]
        if n > 1 and rate and not out[rate] > 0:
            raise ValueError(f"stats[{rate!r}] must be positive (got {out[rate]}); measure it with the "
                             f"{self.strategy_class.compressor.label} decoder on the target device")  # type: ignore
        return out

    def schedule(self, stats: Mapping[str, float], n: int) -> list[Collective]:
        """On the fraction 1 - f of steps after the warm-up, the compressor's collective of each
        worker's message (``<name>_msg_bytes``) among the n workers and, after an all-gather, the
        decode of the n messages (n e / r seconds, e the elements decoded per message, r the
        measured rate); on the fraction f, a ring all-reduce of the dense gradient. A lone worker
        applies its own gradient: nothing."""
        if n == 1:
            return []
        c = self.strategy_class.compressor  # type: ignore[union-attr]
        keys = cost_keys(c)
        f = stats.get(keys["dense_fraction"], 0.0)
        dense = stats["dense_bytes_per_worker_per_step"]
        op = c.communicator.op
        out = [Collective(f"{self.name}_messages" if op == "all_gather" else f"{self.name}_allreduce", op, n,
                          nbytes=stats[keys["msg"]], share=1 - f)]
        if keys["rate"]:
            elements = stats[c.decoded_key] if c.decoded_key else dense / FP32_BYTES
            out.append(Collective(f"{self.name}_decode", "local", n, seconds=n * elements / stats[keys["rate"]],
                                  share=1 - f))
        if f > 0:
            out.append(Collective(f"{self.name}_dense_allreduce", "all_reduce", n, nbytes=dense, share=f))
        return out

    def benchmark_codec(self, numel: int, repeats: int, seed: int, **setting: Any) -> dict[str, float]:
        return benchmark_codec(self.strategy_class.compressor(**setting), numel, repeats, seed)  # type: ignore
