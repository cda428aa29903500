"""PowerSGD (T. Vogels, S. P. Karimireddy and M. Jaggi, "PowerSGD: Practical Low-Rank Gradient
Compression for Distributed Optimization", NeurIPS 2019) through torch's own DDP hook.

Each worker views every gradient tensor of a DDP bucket as a matrix M (``tensor.view(n, -1)``) and
sends, instead of M, the two thin factors of one step of power iteration (Vogels et al., Alg. 1):

1. Warm-up: the first ``warmup_steps`` optimizer steps all-reduce the bucket dense (the mean),
   as plain DDP does; nothing is remembered.
2. Error feedback: M_w <- M_w + e_w, worker w's error of the previous step (``error_feedback``).
3. Split the bucket: a tensor is compressed when (n + m) r ``min_compression_rate`` < n m with
   r = min(n, m, ``rank``) (torch's ``_should_compress``); the others (biases) are all-reduced
   uncompressed, their mean written back.
4. Q: at the first compressed step (every step without ``warm_start``) drawn from N(0, 1) with a
   seed that every worker draws from ``numpy.random.RandomState(random_seed)``; with warm start
   the previous step's Q is kept. Either way Q is orthogonalised.
5. P = sum_w M_w Q (all-reduce), then orthogonalised (Gram-Schmidt for r <= 2, else QR).
6. Q = (1/N) sum_w M_w^T P (all-reduce).
7. Every worker applies M_hat = P Q^T in place of the mean of the M_w, and keeps
   e_w = (its input of step 2) - (what it applies), over the whole bucket, compressed or not.

Symbols (Vogels et al. 2019; config key, torch's name in brackets)

    ======  ==================================================  ================================
    M_w     worker w's gradient tensor as an n x m matrix       ``tensor.view(shape[0], -1)``
    r       ``rank`` [matrix_approximation_rank]                columns of P and Q, min(n, m, r)
    P, Q    n x r and m x r factors; M_hat = P Q^T
    e_w     worker w's error-feedback memory, per bucket        ``error_feedback`` [use_error_feedback]
    N                                                           workers
    ======  ==================================================  ================================

Bytes per compressed step and bucket: three ring all-reduces, of the uncompressed tensors
(4 x their elements), of the Ps (4 x sum n r) and of the Qs (4 x sum m r): (n + m) r 4 per
compressed matrix instead of 4 n m.

The real path is torch's :func:`~torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook.powerSGD_hook`
and its ``PowerSGDState``, wrapped (not rewritten) by :func:`accounted_powersgd_hook`, which records
the bytes. The simulated cluster runs steps 1-7 batched over the N worker rows
(:class:`SimulatedPowerSGD`: :func:`power_step` and torch's ``_orthogonalize``); what both share
is :func:`plan_bucket` (step 3 and the sizes) and :func:`record_bucket` (the bytes). Those, the power
step and the simulation live in :mod:`asrbench.strategies.powersgd_sim`; every name stays
importable from here.

Buckets. The hook works per DDP bucket (error memory, Q, the random draws), and Q's random start
depends on the order of the tensors in the bucket: the hook draws one Q per compressed tensor,
grouped by matrix shape in order of first appearance. DDP starts with one bucket holding every
parameter in model order (``find_unused_parameters=False``) and, after the first step, rebuilds
its buckets in the order rank 0's gradients became ready in its first backward pass (measured for
this LSTM on gloo: output.bias, output.weight, lstm.weight_ih, lstm.bias_ih, lstm.weight_hh,
lstm.bias_hh, neither the model order nor its reverse). The simulation therefore records that
order from worker 0's first backward (a post-accumulate-grad hook on each parameter, where DDP's
own hooks fire) and cuts it into buckets with DDP's own ``_compute_bucket_assignment_by_size``
and ``bucket_cap_mb``. Guaranteed and tested: one bucket (the test model, 2157 parameters), equal
to torch's hook on gloo within 1e-5. Several buckets follow the same rules (bucket index order
for the random draws, one error memory per bucket) but are not tested against real processes;
``warmup_steps`` >= 2, which error feedback and warm start require, keeps the one layout change
out of the compressed steps.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import StrategyRegistry
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import (
    PowerSGDState,
    powerSGD_hook,
)

from asrbench.knobs import Knob
from asrbench.errors import ConfigError
from asrbench.strategies.accounting import CommStats
from asrbench.strategies.base import AccountedDDPStrategy, refuse_hook_keywords
from asrbench.strategies.contract import (
    Collective,
    SimContext,
    Simulation,
    StrategySpec,
    time_codec,
)

# The plan, the power step and the simulation live in their own module; every name stays importable from here.
from asrbench.strategies.powersgd_sim import (MIN_WARMUP, SEED_LIMIT, BucketPlan, SimulatedPowerSGD,  # noqa: F401
                                              ddp_buckets, decompress, plan_bucket, power_step, random_qs,
                                              record_bucket)

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "asrbench_powersgd"  # checkpoint entry with every rank's PowerSGD memory


# ---------------------------------------------------------------------------------------------
# The real path: torch's hook, wrapped to count the bytes
# ---------------------------------------------------------------------------------------------
class AccountedPowerSGDState:
    """torch's :class:`PowerSGDState` (``powersgd``: hyper-parameters, per-bucket error and Q
    memory, the iteration counter) beside this rank's :class:`CommStats`; and, to keep that memory
    right when DDP lays a bucket out anew, each bucket's layout: the positions (in
    ``param_index``, the model's trainable parameters) of its tensors, in the order its memory is in."""

    __slots__ = ["powersgd", "comm_stats", "param_index", "layouts"]

    def __init__(self, powersgd: PowerSGDState, comm_stats: CommStats,
                 parameters: Sequence[Tensor] = ()) -> None:
        self.powersgd = powersgd
        self.comm_stats = comm_stats
        self.param_index = {id(p): i for i, p in enumerate(parameters)}
        self.layouts: dict[int, tuple[int, ...]] = {}


def follow_layout(state: AccountedPowerSGDState, bucket: dist.GradBucket) -> None:
    """Reorder bucket `bucket`'s error and Q memory into its current tensor order when it changed.

    A resumed run's DDP starts again from its first bucket layout (model order) and rebuilds it after
    one step (module docstring), while the checkpointed memory is in the rebuilt order: without this,
    one step would add each tensor's error to another tensor's gradient. A bucket that changed members
    (several buckets, cut differently) starts its memory afresh, with a warning."""
    if not state.param_index:
        return
    index = bucket.index()
    layout = tuple(state.param_index[id(p)] for p in bucket.parameters())
    before = state.layouts.get(index)
    state.layouts[index] = layout
    ps = state.powersgd
    if before is None or before == layout or not (index in ps.error_dict or index in ps.q_memory_dict):
        return
    if sorted(before) != sorted(layout):
        log.warning("PowerSGD: DDP bucket %d changed its tensors; its error and Q memory start afresh", index)
        for memory in (ps.error_dict, ps.p_memory_dict, ps.q_memory_dict):
            memory.pop(index, None)
        return
    shapes = {i: tuple(p.shape) for i, p in zip(layout, bucket.parameters())}
    if index in ps.error_dict:
        ps.error_dict[index] = _reorder(ps.error_dict[index], before, layout,
                                        {i: math.prod(shapes[i]) for i in layout})
    if index in ps.q_memory_dict:
        old, new = (plan_bucket([shapes[i] for i in order], ps.matrix_approximation_rank, ps.min_compression_rate)
                    for order in (before, layout))
        sizes = {before[k]: m * r for k, (_, m, r) in zip(old.compressed, old.matrices)}
        ps.q_memory_dict[index] = _reorder(ps.q_memory_dict[index], [before[k] for k in old.compressed],
                                           [layout[k] for k in new.compressed], sizes)


def _reorder(flat: Tensor, before: Sequence[int], after: Sequence[int], sizes: Mapping[int, int]) -> Tensor:
    """`flat`, the concatenation of segments (one per key, `sizes` long) in order `before`, in order `after`."""
    starts, offset = {}, 0
    for key in before:
        starts[key], offset = offset, offset + sizes[key]
    assert offset == flat.numel(), (offset, flat.numel())
    return torch.cat([flat[starts[k]:starts[k] + sizes[k]] for k in after]) if after else flat


def accounted_powersgd_hook(state: AccountedPowerSGDState, bucket: dist.GradBucket
                            ) -> torch.futures.Future[Tensor]:
    """torch's ``powerSGD_hook`` on one bucket (steps 1-7), after recording its bytes
    (:func:`record_bucket`); the step closes on the bucket that DDP reduces last."""
    ps = state.powersgd
    group = ps.process_group if ps.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    stats = state.comm_stats
    if stats.world_size != world:
        stats.world_size, stats.rank = world, dist.get_rank(group)
    compressed = ps.iter >= ps.start_powerSGD_iter  # read before the hook, which counts the step on the last bucket
    buffer = bucket.buffer()
    plan = plan_bucket([g.shape for g in bucket.gradients()], ps.matrix_approximation_rank, ps.min_compression_rate)
    record_bucket(stats, plan, buffer.numel(), world, compressed, buffer.element_size())
    if bucket.is_last():
        stats.step()
    follow_layout(state, bucket)
    return powerSGD_hook(ps, bucket)


# DDP inspects the hook's annotations as objects; with postponed evaluation they are strings.
accounted_powersgd_hook.__annotations__.update(state=AccountedPowerSGDState, bucket=dist.GradBucket,
                                               **{"return": torch.futures.Future[Tensor]})


MEMORIES = {"error": "error_dict", "p": "p_memory_dict", "q": "q_memory_dict"}  # checkpoint prefix -> torch's slot
COUNTERS = ("iter", "total_numel_before_compression", "total_numel_after_compression", "next_stats_report")


def powersgd_state_dict(state: PowerSGDState) -> dict[str, Any]:
    """What torch's ``__getstate__`` keeps of the hook's state beyond its settings, as tensors and
    ints (torch loads them with ``weights_only=True``): per bucket b the error memory ``error.<b>``
    (e_w) and the P and Q memories ``p.<b>``, ``q.<b>`` (warm start; a bucket without a P draws a
    fresh Q), the iteration counter ``iter`` and the state of ``rng``, which draws Q's random starts."""
    name, keys, pos, has_gauss, cached = state.rng.get_state()
    assert name == "MT19937", name
    out: dict[str, Any] = {k: int(getattr(state, k)) for k in COUNTERS}
    for prefix, slot in MEMORIES.items():
        out |= {f"{prefix}.{b}": t.detach().clone() for b, t in getattr(state, slot).items()}
    return out | {"rng_keys": torch.from_numpy(keys.astype("int64")), "rng_pos": int(pos),
                  "rng_has_gauss": int(has_gauss), "rng_cached_gaussian": float(cached)}


def load_powersgd_state(state: PowerSGDState, saved: Mapping[str, Any], device: torch.device | str) -> None:
    """Put :func:`powersgd_state_dict`'s `saved` back into `state` (memories on `device`)."""
    for k in COUNTERS:
        setattr(state, k, int(saved[k]))
    for prefix, slot in MEMORIES.items():
        memory = {int(k.split(".", 1)[1]): v.to(device) for k, v in saved.items() if k.startswith(prefix + ".")}
        setattr(state, slot, memory)
    keys = saved["rng_keys"].cpu().numpy().astype("uint32")
    state.rng.set_state(("MT19937", keys, int(saved["rng_pos"]), int(saved["rng_has_gauss"]),
                         float(saved["rng_cached_gaussian"])))


class PowerSGDRankState:
    """This rank's PowerSGD memory for checkpoints (``state_dict``/``load_state_dict``), rank-local:
    e_w differs by worker. The hook's state exists only once DDP is set up, after Lightning loads a
    checkpoint, so a loaded state waits in :attr:`pending` until the hook is registered."""

    def __init__(self, strategy: PowerSGDStrategy) -> None:
        self.strategy = strategy
        self.pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        hook = self.strategy.hook_state
        assert hook is not None, "a checkpoint is written after DDP registered the PowerSGD hook"
        layouts = {f"layout.{b}": torch.tensor(order, dtype=torch.long) for b, order in hook.layouts.items()}
        return powersgd_state_dict(hook.powersgd) | layouts | {"comm_stats": hook.comm_stats.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pending = dict(state)
        if self.strategy.hook_state is not None:
            self.apply(self.strategy.hook_state)

    def apply(self, hook: AccountedPowerSGDState) -> None:
        if self.pending is None:
            return
        load_powersgd_state(hook.powersgd, self.pending, self.strategy.root_device)
        hook.layouts = {int(k.split(".", 1)[1]): tuple(int(i) for i in v.tolist())
                        for k, v in self.pending.items() if k.startswith("layout.")}
        hook.comm_stats.load_state_dict(self.pending["comm_stats"])
        self.pending = None


def check_options(rank: Any, warmup_steps: Any, error_feedback: Any, warm_start: Any, min_compression_rate: Any,
                  orthogonalization_epsilon: Any, random_seed: Any) -> None:
    """ValueError (one line, naming the argument) for a setting torch's hook would refuse or misread."""
    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (whole(rank) and rank >= 1):
        raise ValueError(f"Arg `rank` (columns of P and Q) must be a positive integer, got {rank!r}")
    if not (whole(warmup_steps) and warmup_steps >= 0):
        raise ValueError(f"Arg `warmup_steps` (dense steps before PowerSGD) must be an integer >= 0, got {warmup_steps!r}")
    if (error_feedback or warm_start) and warmup_steps < MIN_WARMUP:
        raise ValueError(f"Arg `warmup_steps` must be >= {MIN_WARMUP} with error_feedback or warm_start (DDP rebuilds "
                         f"its buckets after the first step), got {warmup_steps}")
    if not (number(min_compression_rate) and min_compression_rate >= 0):
        raise ValueError(f"Arg `min_compression_rate` must be a number >= 0, got {min_compression_rate!r}")
    if not (number(orthogonalization_epsilon) and orthogonalization_epsilon >= 0):
        raise ValueError(f"Arg `orthogonalization_epsilon` must be a number >= 0, got {orthogonalization_epsilon!r}")
    if not (whole(random_seed) and 0 <= random_seed < 2**32):
        raise ValueError(f"Arg `random_seed` must be an integer in [0, 2**32), got {random_seed!r}")


class PowerSGDStrategy(AccountedDDPStrategy):
    """DDP with torch's PowerSGD hook (wrapped by :func:`accounted_powersgd_hook`) on every bucket,
    on CPU (gloo) as on GPU.

    Keywords (torch's names in brackets): ``rank`` [matrix_approximation_rank], ``warmup_steps``
    [start_powerSGD_iter], ``error_feedback`` [use_error_feedback], ``warm_start``,
    ``min_compression_rate``, ``orthogonalization_epsilon``, ``random_seed``; ``bucket_cap_mb`` and
    ``gradient_as_bucket_view`` are DDP's; the rest go to Lightning's ``DDPStrategy``. Each rank
    builds its own ``PowerSGDState`` when the hook is registered (after the process group exists:
    torch's state does not survive pickling before it). Checkpointed per rank
    (:class:`PowerSGDRankState` under ``asrbench_powersgd``): a resumed run continues with each
    rank's error memory, the P and Q memories, the counter and the random draws where they were.
    """

    registry_name = "asrbench_powersgd"

    def __init__(self, rank: int = 4, warmup_steps: int = 10, error_feedback: bool = True, warm_start: bool = True,
                 min_compression_rate: float = 2.0, orthogonalization_epsilon: float = 0.0, random_seed: int = 0,
                 bucket_cap_mb: float = 25.0, gradient_as_bucket_view: bool = False,
                 timeout: timedelta | float | None = None, **kwargs: Any) -> None:
        refuse_hook_keywords(kwargs, "PowerSGDStrategy registers its own DDP communication hook")
        check_options(rank, warmup_steps, error_feedback, warm_start, min_compression_rate,
                      orthogonalization_epsilon, random_seed)
        self.powersgd_options = {"matrix_approximation_rank": rank, "start_powerSGD_iter": warmup_steps,
                                 "min_compression_rate": min_compression_rate,
                                 "use_error_feedback": bool(error_feedback), "warm_start": bool(warm_start),
                                 "orthogonalization_epsilon": orthogonalization_epsilon, "random_seed": random_seed}
        self.bucket_cap_mb = float(bucket_cap_mb)
        self._hook_state: AccountedPowerSGDState | None = None
        self._rank_state = PowerSGDRankState(self)
        super().__init__(timeout=timeout, bucket_cap_mb=bucket_cap_mb,
                         gradient_as_bucket_view=gradient_as_bucket_view, **kwargs)

    def new_powersgd_state(self, process_group: dist.ProcessGroup | None = None) -> PowerSGDState:
        """A fresh torch PowerSGDState with this strategy's settings."""
        return PowerSGDState(process_group, **self.powersgd_options)

    @property
    def hook_state(self) -> AccountedPowerSGDState | None:
        return self._hook_state

    def _register_ddp_hooks(self) -> None:
        """Unlike DDPStrategy (CUDA only), register the hook on every device type."""
        params = [p for p in self.model.module.parameters() if p.requires_grad]
        self._hook_state = AccountedPowerSGDState(self.new_powersgd_state(None), self.comm_stats, params)
        self._rank_state.apply(self._hook_state)  # a resumed run's memory, loaded before DDP existed
        self.register_comm_hook(accounted_powersgd_hook, self._hook_state)

    rank_state_key = CHECKPOINT_KEY
    rank_state_what = "PowerSGD error and Q memory"

    def rank_local_state(self) -> PowerSGDRankState:
        return self._rank_state


PowerSGDStrategy.register_strategies(StrategyRegistry)  # Trainer(strategy="asrbench_powersgd")


# ---------------------------------------------------------------------------------------------
# The spec: knobs, simulation, cost
# ---------------------------------------------------------------------------------------------
POWERSGD_KNOBS = {
    "rank": Knob(int, 1),
    "warmup_steps": Knob(int, 0),
    "error_feedback": Knob(bool),
    "warm_start": Knob(bool),
    "min_compression_rate": Knob(float, 0),
    "orthogonalization_epsilon": Knob(float, 0),
    "random_seed": Knob(int, 0, 2**32, high_open=True),
    "bucket_cap_mb": Knob(float, 0, low_open=True),
    "gradient_as_bucket_view": Knob(bool),
}
BYTE_KEYS = ("powersgd_uncompressed_bytes", "powersgd_p_bytes", "powersgd_q_bytes")
DENSE_KEY = "dense_bytes_per_worker_per_step"


class PowerSGDSpec(StrategySpec):
    name = "powersgd"
    summary = "PowerSGD (Vogels et al. 2019): rank-r power iteration, torch's DDP hook"
    order = 7
    strategy_class = PowerSGDStrategy
    stats_keys = BYTE_KEYS + ("powersgd_dense_step_fraction", DENSE_KEY)
    size_keys = BYTE_KEYS + (DENSE_KEY,)
    compresses = False  # every element reaches the mean, through a low-rank approximation
    knobs = POWERSGD_KNOBS

    def check(self, cfg: Mapping[str, Any], nodes: int) -> None:
        warmup = cfg.get("warmup_steps", 10)
        if (cfg.get("error_feedback", True) or cfg.get("warm_start", True)) and isinstance(warmup, int) \
                and warmup < MIN_WARMUP:
            raise ConfigError(f"strategy.warmup_steps={warmup} must be >= {MIN_WARMUP} with error_feedback or "
                              f"warm_start (torch's start_powerSGD_iter); use warmup_steps={MIN_WARMUP} or more")

    def stacked_arrays(self, cfg: Mapping[str, Any], nodes: int) -> dict[str, int]:
        return {"error feedback": 1} if cfg.get("error_feedback", True) else {}

    def simulate(self, strategy: Any, ctx: SimContext) -> Simulation:
        exchange = SimulatedPowerSGD(strategy.new_powersgd_state(None), strategy.comm_stats, ctx.nodes, ctx.shapes,
                                     ctx.device, strategy.bucket_cap_mb, list(ctx.params) or None)
        return Simulation(exchange=exchange, group_size=ctx.nodes)

    def schedule(self, stats: Mapping[str, float], n: int) -> list[Collective]:
        """On the compressed steps (share 1 - f) three ring all-reduces among n: the uncompressed
        tensors, the Ps, the Qs (each bucket's summed into one: latency counted once per step); on
        the warm-up's share f the dense gradient's ring all-reduce."""
        f = stats["powersgd_dense_step_fraction"]
        out = [Collective("powersgd_uncompressed", "all_reduce", n, nbytes=stats["powersgd_uncompressed_bytes"],
                          share=1 - f),
               Collective("powersgd_p", "all_reduce", n, nbytes=stats["powersgd_p_bytes"], share=1 - f),
               Collective("powersgd_q", "all_reduce", n, nbytes=stats["powersgd_q_bytes"], share=1 - f)]
        if f > 0:
            out.append(Collective("powersgd_dense_allreduce", "all_reduce", n, nbytes=stats[DENSE_KEY], share=f))
        return out

    codec_settings = ({"rank": 1}, {"rank": 4})

    def benchmark_codec(self, numel: int, repeats: int, seed: int, **setting: Any) -> dict[str, float]:
        """One worker's steps 5-7 (P = M Q, orthogonalise, Q = M^T P, M_hat = P Q^T) on a near-square
        matrix of about `numel` elements."""
        rank = int(setting["rank"])
        rows = max(1, math.isqrt(numel))
        cols = max(1, numel // rows)
        gen = torch.Generator().manual_seed(seed)
        M = torch.randn(1, rows, cols, generator=gen)
        q = random_qs(seed, [(rows, cols, min(rows, cols, rank))], 0.0)[0]

        def codec() -> None:
            P, Q = power_step(M, q, 0.0)
            decompress(P, Q)

        out = time_codec(codec, rows * cols, repeats)
        out.update(rank=float(rank), rows=float(rows), cols=float(cols))
        return out


SPECS = [PowerSGDSpec()]
