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
is :func:`plan_bucket` (step 3 and the sizes) and :func:`record_bucket` (the bytes).

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
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import StrategyRegistry
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import (
    PowerSGDState,
    _orthogonalize,
    _should_compress,
    powerSGD_hook,
)

from asrbench.knobs import Knob
from asrbench.errors import ConfigError
from asrbench.strategies.accounting import CommStats
from asrbench.strategies.base import AccountedDDPStrategy, refuse_hook_keywords
from asrbench.strategies.contract import synchronize as _synchronize
from asrbench.strategies.contract import (
    FP32_BYTES,
    Collective,
    SimContext,
    Simulation,
    StrategySpec,
    time_codec,
)

log = logging.getLogger(__name__)

SEED_LIMIT = 1_000_000_000  # the hook's rng.randint bound for the seed of Q's random start
MIN_WARMUP = 2  # torch: error feedback and warm start need 2 dense steps (DDP rebuilds its buckets after the first)
CHECKPOINT_KEY = "asrbench_powersgd"  # checkpoint entry with every rank's PowerSGD memory


# ---------------------------------------------------------------------------------------------
# Core: plain functions on shapes and tensors, shared by the real hook and the simulation
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BucketPlan:
    """Step 3 for one bucket: which tensors (positions in the bucket) are compressed, in the order
    the hook draws and stores their Qs, with each one's (n, m, r); the others; and the sizes."""

    compressed: tuple[int, ...]
    matrices: tuple[tuple[int, int, int], ...]  # (n, m, r) of each compressed tensor
    uncompressed: tuple[int, ...]
    uncompressed_elements: int
    p_elements: int  # sum n r
    q_elements: int  # sum m r

    @property
    def sent_elements(self) -> int:
        return self.uncompressed_elements + self.p_elements + self.q_elements


def plan_bucket(shapes: Sequence[Sequence[int]], rank: int, min_compression_rate: float) -> BucketPlan:
    """Step 3 as torch's powerSGD_hook decides it: tensor i is the matrix (shape[0], rest), r =
    min(n, m, rank), compressed when torch's ``_should_compress`` says so; compressed tensors in the
    hook's order of its Qs (grouped by matrix shape, shapes in order of first appearance)."""
    groups: dict[tuple[int, int], list[int]] = {}
    uncompressed: list[int] = []
    unc = 0
    for i, shape in enumerate(shapes):
        numel = math.prod(shape)
        n = int(shape[0]) if len(shape) else 1
        m = numel // n if n else 0
        r = min(n, m, rank)
        if _should_compress(n, m, r, min_compression_rate)[0]:
            groups.setdefault((n, m), []).append(i)
        else:
            uncompressed.append(i)
            unc += numel
    compressed = [i for members in groups.values() for i in members]
    matrices = []
    for (n, m), members in groups.items():
        matrices += [(n, m, min(n, m, rank))] * len(members)
    return BucketPlan(tuple(compressed), tuple(matrices), tuple(uncompressed), unc,
                      sum(n * r for n, _, r in matrices), sum(m * r for _, m, r in matrices))


def record_bucket(stats: CommStats, plan: BucketPlan, numel: int, world: int, compressed: bool,
                  element_size: int = FP32_BYTES) -> None:
    """One bucket's bytes: a dense all-reduce during the warm-up (step 1), else the hook's three
    all-reduces (uncompressed tensors, Ps, Qs; each issued even when empty); the dense equivalent;
    the elements sent of the bucket's `numel`."""
    if not compressed:
        stats.record_all_reduce(numel * element_size, world)
        stats.record_dense(numel * element_size, world)
        stats.record_elements(numel, numel)
        return
    for elements in (plan.uncompressed_elements, plan.p_elements, plan.q_elements):
        stats.record_all_reduce(elements * element_size, world)
    stats.record_dense(numel * element_size, world)
    stats.record_elements(plan.sent_elements, numel)


def random_qs(seed: int, matrices: Sequence[tuple[int, int, int]], epsilon: float,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> list[Tensor]:
    """Step 4, a random start: one (1, m, r) Q per compressed tensor, drawn as the hook draws them
    (``torch.manual_seed(seed)`` in a forked CPU generator, ``torch.randn`` in order), orthogonalised."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        qs = [torch.randn(1, m, r, device="cpu", dtype=dtype) for _, m, r in matrices]
    out = []
    for q in qs:
        q = q.to(device)
        _orthogonalize(q, epsilon)
        out.append(q)
    return out


def power_step(M: Tensor, Q: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """Steps 5-6 over the stacked matrices M (N, n, m) of N workers and the shared Q (1, m, r):
    P = orthogonalise(sum_w M_w Q) (1, n, r), Q' = (1/N) sum_w M_w^T P (1, m, r)."""
    workers = M.shape[0]
    P = torch.matmul(M, Q).sum(0, keepdim=True)
    _orthogonalize(P, epsilon)
    Q_new = torch.matmul(M.transpose(1, 2), P).sum(0, keepdim=True).div_(workers)
    return P, Q_new


def decompress(P: Tensor, Q: Tensor) -> Tensor:
    """Step 7: M_hat = P Q^T, (1, n, m)."""
    return torch.matmul(P, Q.transpose(1, 2))


def ddp_buckets(shapes: Sequence[Sequence[int]], ready_order: Sequence[int] | None, bucket_cap_mb: float
                ) -> list[list[int]]:
    """DDP's buckets as lists of parameter indices (model order), each in its bucket order.

    ``ready_order`` None: DDP's first layout (``find_unused_parameters=False``), one bucket in model
    order. Otherwise the rebuilt layout: the gradient-ready order cut by DDP's own assignment with
    ``bucket_cap_mb`` for every bucket (the cap DDP uses when it is given explicitly, as here).
    """
    if ready_order is None:
        return [list(range(len(shapes)))]
    cap = int(bucket_cap_mb * 1024 * 1024)
    tensors = [torch.empty(tuple(shapes[i])) for i in ready_order]
    buckets, _ = dist._compute_bucket_assignment_by_size(tensors, [cap, cap], [], list(ready_order))
    return [list(b) for b in buckets]


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
# On the simulated cluster: steps 1-7 over the rows of G
# ---------------------------------------------------------------------------------------------
class SimulatedPowerSGD:
    """torch's powerSGD_hook over the N rows of G, per DDP bucket, as each worker's hook leaves
    its gradient; worker 0's :class:`CommStats` filled as :func:`accounted_powersgd_hook` fills it.

    ``state`` is a torch ``PowerSGDState`` with the run's settings: its ``rng`` draws the seeds of
    Q's random starts and its ``iter`` counts the steps, as in the hook. ``parameters`` are the
    model's trainable parameters (the simulated cluster's): their gradients' ready order in
    worker 0's first backward gives DDP's rebuilt buckets (module docstring); without them the
    reverse model order stands in for it (a warning says so).
    """

    def __init__(self, state: PowerSGDState, stats: CommStats, nodes: int, shapes: Sequence[torch.Size],
                 device: torch.device, bucket_cap_mb: float, parameters: Sequence[nn.Parameter] | None = None) -> None:
        self.state, self.stats, self.nodes = state, stats, nodes
        self.group_size = nodes
        stats.world_size, stats.rank = nodes, 0
        self.shapes = [tuple(s) for s in shapes]
        sizes = [math.prod(s) for s in self.shapes]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.sizes = sizes
        self.numel = sum(sizes)
        self.device = device
        self.bucket_cap_mb = bucket_cap_mb
        self.error = torch.zeros(nodes, self.numel, device=device) if state.use_error_feedback else None  # e_w
        self.q_memory: dict[int, list[Tensor]] = {}  # bucket index -> its Qs (warm start)
        self.encode_s = 0.0
        self.steps = self.dense_steps = 0
        self.sent = {"p": 0, "q": 0, "uncompressed": 0}  # elements per worker, summed over compressed steps
        self._plans: dict[tuple[int, ...], tuple[BucketPlan, Tensor]] = {}  # per bucket layout
        self._ready: list[int] = []
        self._handles = []
        if parameters is not None:
            for i, p in enumerate(parameters):
                self._handles.append(p.register_post_accumulate_grad_hook(self._ready_hook(i)))
        else:
            log.warning("PowerSGD simulation: the model's parameters are unknown; DDP's rebuilt bucket order is taken "
                        "as the reverse model order (Q's random start may differ from real processes)")
        self.rebuilt: list[list[int]] | None = None

    def _ready_hook(self, index: int) -> Any:
        def hook(_: Tensor) -> None:
            if len(self._ready) < len(self.shapes) and index not in self._ready:
                self._ready.append(index)
        return hook

    def buckets(self) -> list[list[int]]:
        """This step's buckets: DDP's first layout at step 0, its rebuilt one afterwards."""
        if self.steps == 0:
            return ddp_buckets(self.shapes, None, self.bucket_cap_mb)
        if self.rebuilt is None:
            for handle in self._handles:
                handle.remove()
            order = self._ready if len(self._ready) == len(self.shapes) else list(reversed(range(len(self.shapes))))
            self.rebuilt = ddp_buckets(self.shapes, order, self.bucket_cap_mb)
        return self.rebuilt

    def plan(self, index: Sequence[int]) -> tuple[BucketPlan, Tensor]:
        """Step 3 for the bucket of parameters `index` (bucket order), and its uncompressed columns of G."""
        key = tuple(index)
        if key not in self._plans:
            plan = plan_bucket([self.shapes[i] for i in index], self.state.matrix_approximation_rank,
                               self.state.min_compression_rate)
            kept = [index[k] for k in plan.uncompressed]
            cols = (torch.cat([torch.arange(self.offsets[i], self.offsets[i] + self.sizes[i]) for i in kept])
                    if kept else torch.zeros(0, dtype=torch.long))
            self._plans[key] = plan, cols.to(self.device)
        return self._plans[key]

    @torch.no_grad()
    def exchange(self, grads: Tensor, step: int) -> None:
        buckets = self.buckets()
        state, N = self.state, self.nodes
        compressing = state.iter >= state.start_powerSGD_iter
        if not compressing:  # step 1: the hook's default all-reduce, x / N summed
            grads.div_(N)
            grads.copy_(grads.sum(0, keepdim=True).expand_as(grads))
        else:
            _synchronize(self.device)
            t0 = time.perf_counter()
            if self.error is not None:  # step 2
                grads.add_(self.error)
                before = grads.clone()
            for b, index in enumerate(buckets):
                self._compress_bucket(grads, b, index)
            if self.error is not None:  # step 7: e_w = input - what w applies
                torch.sub(before, grads, out=self.error)
            _synchronize(self.device)
            self.encode_s += time.perf_counter() - t0
        for index in buckets:
            plan = self.plan(index)[0]
            record_bucket(self.stats, plan, sum(self.sizes[i] for i in index), N, compressing)
            if compressing:
                self.sent["p"] += plan.p_elements
                self.sent["q"] += plan.q_elements
                self.sent["uncompressed"] += plan.uncompressed_elements
        self.stats.step()
        state.iter += 1
        self.steps += 1
        self.dense_steps += not compressing

    def _compress_bucket(self, grads: Tensor, b: int, index: Sequence[int]) -> None:
        """Steps 3-7 for bucket `b` (parameter indices in bucket order) over every worker's row."""
        state, N = self.state, self.nodes
        plan, cols = self.plan(index)
        if cols.numel():  # step 3: the uncompressed tensors' mean
            grads.index_copy_(1, cols, grads.index_select(1, cols).sum(0, keepdim=True).div_(N).expand(N, -1))
        eps = state.orthogonalization_epsilon
        if not state.warm_start or b not in self.q_memory:  # step 4: a random start (one seed per bucket)
            qs = random_qs(int(state.rng.randint(SEED_LIMIT)), plan.matrices, eps, grads.dtype, grads.device)
        else:
            qs = self.q_memory[b]
            for q in qs:
                _orthogonalize(q, eps)
        for k, q, (n, m, _) in zip(plan.compressed, qs, plan.matrices):
            i = index[k]
            block = grads[:, self.offsets[i]:self.offsets[i] + self.sizes[i]]
            P, Q = power_step(block.reshape(N, n, m), q, eps)  # steps 5-6
            q.copy_(Q)
            block.copy_(decompress(P, Q).reshape(1, -1).expand(N, -1))  # step 7
        if state.warm_start:
            self.q_memory[b] = qs

    def cost_stats(self) -> dict[str, float]:
        """Per worker per compressed step: bytes of the Ps, Qs and uncompressed tensors all-reduced;
        and the fraction of steps all-reduced dense (the warm-up)."""
        compressed = self.steps - self.dense_steps
        if compressed:
            per_step = {k: v / compressed for k, v in self.sent.items()}
        else:  # never compressed: what a compressed step of the current layout would send
            plans = [self.plan(index)[0] for index in self.buckets()]
            per_step = {"p": sum(p.p_elements for p in plans), "q": sum(p.q_elements for p in plans),
                        "uncompressed": sum(p.uncompressed_elements for p in plans)}
        return {"powersgd_p_bytes": per_step["p"] * FP32_BYTES, "powersgd_q_bytes": per_step["q"] * FP32_BYTES,
                "powersgd_uncompressed_bytes": per_step["uncompressed"] * FP32_BYTES,
                "powersgd_dense_step_fraction": self.dense_steps / max(self.steps, 1)}


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
