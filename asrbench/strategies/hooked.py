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
benchmark from the compressor, and :class:`CompressorState` its state from the compressor's
knobs. A strategy module is then its compressor, a state, a Strategy and a Spec of a few lines
each.

The parts that run inside a worker (the three parts, :class:`HookState`, the hooks) are
:mod:`asrbench.strategies.hooked_parts`; every name stays importable from here.
"""
from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch.strategies import StrategyRegistry
from torch import Tensor

from asrbench.knobs import Knob
from asrbench.strategies.accounting import CommStats
from asrbench.strategies.base import AccountedDDPStrategy, refuse_hook_keywords
from asrbench.strategies.contract import (FP32_BYTES, Collective, SimContext, Simulation, StrategySpec, read_stats,
                                          synchronize, time_codec)
from asrbench.strategies.errors import NonFiniteGradientError

# The parts that run inside a worker live in their own module; every name stays importable from here.
from asrbench.strategies.hooked_parts import (ALL_GATHER, ALL_REDUCE, Communicator, Compressor,  # noqa: F401
                                              CompressorState, ErrorFeedback, HookState, _then, compressed_hook,
                                              ddp_hook,
                                              dense_mean, split_columns, sum_in_rank_order)


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
            if not hasattr(cls, f"{cls.compressor.name}_state"):  # e.g. TopKStrategy.topk_state
                setattr(cls, f"{cls.compressor.name}_state", property(lambda self: self._hook_state))

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
        self.memory = split_columns(self.residual, self.sizes) if state.compressor.error_feedback else None
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
        except NonFiniteGradientError as err:  # the simulated cluster's words: workers, not ranks
            raise NonFiniteGradientError(err.where.replace("rank(s)", "worker(s)"), method=err.method,
                                         step=err.step) from None
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
    return None if residual is None else split_columns(residual, [math.prod(s) for s in shapes])


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

    def codec_label(self, setting: Mapping[str, Any]) -> str:
        """A compressor's ``density`` as a percentage (1%); any other setting as StrategySpec names it."""
        if set(setting) == {"density"}:
            return f"{100 * float(setting['density']):g}%"
        return super().codec_label(setting)

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
