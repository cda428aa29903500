"""PowerSGD's steps on plain shapes and tensors (Vogels et al. 2019; see
:mod:`asrbench.strategies.powersgd` for the steps, the symbols and the buckets): the bucket plan
(step 3 and the sizes) and the bytes, shared by the real hook and the simulation, the power step,
and :class:`SimulatedPowerSGD`, steps 1-7 batched over the N worker rows of the simulated cluster.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, _orthogonalize, _should_compress

from asrbench.strategies.accounting import CommStats
from asrbench.strategies.contract import synchronize as _synchronize
from asrbench.strategies.contract import FP32_BYTES

log = logging.getLogger("asrbench.strategies.powersgd")  # PowerSGD's messages under one logger name

SEED_LIMIT = 1_000_000_000  # the hook's rng.randint bound for the seed of Q's random start
MIN_WARMUP = 2  # torch: error feedback and warm start need 2 dense steps (DDP rebuilds its buckets after the first)


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
