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

The core (:func:`encode`, :func:`decode`, :func:`pack`, :func:`unpack`, in
:mod:`asrbench.strategies.gtc_codec`) works on plain tensors with no process group, so a
simulated cluster can run it for many logical workers; :func:`exchange` (there too) holds the
two collectives; :class:`GTCState` (:mod:`asrbench.strategies.gtc_state`) keeps each rank's
residuals; :func:`gtc_hook` wires them into DDP and :class:`GTCStrategy` into Lightning. Every
name stays importable from this module.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.strategies import StrategyRegistry
from torch import Tensor

from asrbench.knobs import Knob
from asrbench.errors import ConfigError
from asrbench.strategies import gtc_kernel
from asrbench.strategies.base import refuse_hook_keywords
from asrbench.strategies.comm import collective_error
from asrbench.strategies.contract import synchronize as _synchronize
from asrbench.strategies.contract import FP32_BYTES, Collective, Simulation, StrategySpec, read_stats
# The codec and the state live in their own modules; every name stays importable from here.
from asrbench.strategies.gtc_codec import (INDEX_MASK, MAX_BUCKET_NUMEL, DEFAULT_TAU, TAU_UNITS,  # noqa: F401
                                           NonFiniteGradientError, _cpu_kernel, _flatnonzero, _float32_bits,
                                           accumulate, decode, encode, exchange, pack, quantum, select,
                                           subtract_sent, unpack)
from asrbench.strategies.gtc_state import GTCState
from asrbench.strategies.hooked import CommHookStrategy

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "asrbench_gtc"  # checkpoint entry with every rank's residual


# ---------------------------------------------------------------------------------------------
# DDP communication hook
# ---------------------------------------------------------------------------------------------
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

    Steps 1-4 are :func:`encode` (:func:`_encode_bucket`), 5 :func:`_exchange_bucket` (its bytes
    :func:`_record_exchange`) and 6 :func:`_decoder`. During ``state.dense_warmup_steps`` (and with ``pass_through``) the
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
    words, nonfinite, scale = _encode_bucket(state, bucket, buffer)
    headers, fut = _exchange_bucket(state, bucket, words, nonfinite, group)
    _record_exchange(state, bucket, buffer, words, headers, sent=fut is not None, world=world)
    decode_messages = _decoder(state, bucket, buffer, headers[:, 0], scale)
    if fut is None:
        done: torch.futures.Future[Tensor] = torch.futures.Future()
        done.set_result(decode_messages(None))
        return done
    return fut.then(decode_messages)


def _encode_bucket(state: GTCState, bucket: dist.GradBucket, buffer: Tensor) -> tuple[Tensor, bool, Tensor | None]:
    """Steps 1-4 on the bucket's residual (:func:`encode`), in units of d with ``tau_units="rms"``:
    the words, whether r held NaN/inf (then no words), and the scale d (None in gradient units)."""
    residual, mask = state.memory(bucket)
    fp32 = buffer.dtype == torch.float32
    scale = state.element_scale(bucket.parameters())
    if scale is not None:  # r accumulates g / d: GTC in units of Adam's RMS, τ_i = τ d_i in gradient units
        buffer.div_(scale)
    try:
        return encode(residual, buffer, state.tau, scratch=buffer if fp32 else None, mask=mask), False, scale
    except NonFiniteGradientError:
        return torch.empty(0, dtype=torch.int32, device=buffer.device), True, scale


def _exchange_bucket(state: GTCState, bucket: dist.GradBucket, words: Tensor, nonfinite: bool,
                     group: dist.ProcessGroup | None) -> tuple[Tensor, torch.futures.Future[Tensor] | None]:
    """Step 5 (:func:`exchange`): the headers and the future of the messages; one error on every
    rank naming the rank(s) whose r held NaN/inf, or the rank at fault when a peer is lost."""
    try:
        headers, fut = exchange(words, nonfinite, group)
    except RuntimeError as err:
        raise collective_error(err, f"GTC exchange of bucket {bucket.index()}", state.iter) from err
    if bool(headers[:, 1].any()):
        bad = [int(r) for r in torch.nonzero(headers[:, 1]).view(-1)]
        raise NonFiniteGradientError(f"NaN/inf in the gradient of rank(s) {', '.join(map(str, bad))} "
                                     f"(bucket {bucket.index()})", method="GTC", step=state.iter)
    return headers, fut


def _record_exchange(state: GTCState, bucket: dist.GradBucket, buffer: Tensor, words: Tensor, headers: Tensor,
                     sent: bool, world: int) -> None:
    """The bucket's bytes: the headers' all-gather, the padded messages' (when `sent`), the dense
    equivalent, and its elements (the last bucket closes the step)."""
    lmax = int(headers[:, 0].max())
    state.comm_stats.record_all_gather(headers[0], world)
    if sent:
        state.comm_stats.record_all_gather(lmax * words.element_size(), world)
    state.comm_stats.record_dense(buffer.numel() * buffer.element_size(), world)
    state.record_bucket(words.numel(), buffer.numel(), bucket.is_last())


def _decoder(state: GTCState, bucket: dist.GradBucket, buffer: Tensor, lengths: Tensor,
             scale: Tensor | None) -> Callable[[torch.futures.Future[Tensor] | None], Tensor]:
    """Step 6 (:func:`decode`) once the messages arrive (None: nobody sent any): the mean into the
    bucket, times d with ``tau_units="rms"``."""
    fp32 = buffer.dtype == torch.float32
    out = buffer if fp32 else torch.empty(buffer.numel(), dtype=torch.float32, device=buffer.device)
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

    return decode_messages


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
            raise NonFiniteGradientError(f"NaN/inf in the gradient of worker {i}", method="GTC", step=step) from None

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
