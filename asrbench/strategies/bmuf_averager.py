"""BMUF's core (Chen & Huo 2016; see :mod:`asrbench.strategies.bmuf` for the symbols and the two
forms): the configuration and its CNTK conversions, the block-momentum filter (and an outer
torch optimizer in its place, DiLoCo's), and :class:`BMUFAverager`, the averager over a process
group. Plain tensors and a process group: no Lightning.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _unflatten_dense_tensors
from torch.distributed.algorithms.model_averaging.averagers import ModelAverager
from torch.optim import Optimizer

from asrbench.strategies.accounting import CommStats
from asrbench.strategies.comm import is_rank_zero

NESTEROV_FORMS = ("paper", "cntk")
STATE_DTYPE = torch.float32  # the filter's state and the wire format of the parameter all-reduce


def _optimizer_classes() -> dict[str, type[Optimizer]]:
    classes = (getattr(torch.optim, n) for n in dir(torch.optim))
    return {c.__name__.lower(): c for c in classes if isinstance(c, type) and issubclass(c, Optimizer)
            and c is not Optimizer}


def steps_per_block(block_size_samples: int, batch_size: int, num_workers: int) -> int:
    """K in optimizer steps from CNTK's block size in samples over all workers (nearest step)."""
    per_step = batch_size * num_workers
    steps = round(block_size_samples / per_step)
    if steps < 1:
        raise ValueError(f"Arg `block_size_samples` ({block_size_samples}) is less than one step of all "
                         f"workers (batch_size * N = {per_step} samples); raise it")
    if steps * per_step != block_size_samples:
        warnings.warn(f"block_size_samples={block_size_samples} is not a multiple of batch_size * N = "
                      f"{per_step}; using K = {steps} steps ({steps * per_step} samples)", stacklevel=2)
    return steps


def momentum_from_time_constant(time_constant: float, block_size_samples: float) -> float:
    """η = exp(-block_size_samples / time_constant) (CNTK's TimeConstant2Momentum, both in samples)."""
    return math.exp(-block_size_samples / time_constant)


def block_lr_from_cntk(cntk_block_lr: float, block_momentum: float, num_workers: int) -> float:
    """ζ on the mean equal to CNTK's gain (1 - η)·block_lr on the sum of N workers' deltas."""
    return num_workers * (1.0 - block_momentum) * cntk_block_lr


@dataclass(frozen=True)
class BMUFConfig:
    """BMUF knobs (conf/strategy/bmuf.yaml). Checks that need N wait for `resolve`."""

    block_size: int | None = None  # K, optimizer steps per block; fairseq `global_sync_iter`
    block_size_samples: int | None = None  # K in samples over all workers; CNTK globalModelAggregationBlockSize
    batch_size: int | None = None  # samples per worker per step; converts the two *_samples knobs
    block_momentum: float | None = None  # η; None -> 1 - 1/N (CNTK's default)
    block_momentum_time_constant: float | None = None  # η as CNTK blockMomentumAsTimeConstant, samples
    block_lr: float = 1.0  # ζ; fairseq `block_lr`, CNTK blockLearningRate (see block_lr_from_cntk)
    nesterov: bool = True  # NBM (fairseq `use_nbm`, CNTK useNesterovMomentum); False is CBM
    nesterov_form: str = "paper"  # paper | cntk, see the module docstring
    outer_optimizer: str = "filter"  # filter (the paper's) or a torch.optim name stepped on S - W̄
    outer_optimizer_kwargs: Mapping[str, Any] | None = None  # e.g. {lr: 0.7, momentum: 0.9, nesterov: true}
    reset_momentum: bool = False  # CNTK resetSGDMomentum: clear the local optimizer state after a sync
    warmup_steps: int = 0  # fairseq warmup_iterations: local training, then one plain average
    average_sync: bool = False  # fairseq average_sync: average the local optimizer state at a sync

    def __post_init__(self) -> None:
        if (self.block_size is None) == (self.block_size_samples is None):
            raise ValueError("Give one of `block_size` (K, optimizer steps per block) and "
                             "`block_size_samples` (samples over all workers)")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"Arg `block_size` must be a positive value (steps per block), got {self.block_size}")
        if self.block_size_samples is not None and self.block_size_samples < 1:
            raise ValueError(f"Arg `block_size_samples` must be a positive value, got {self.block_size_samples}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"Arg `batch_size` must be a positive value (samples per step), got {self.batch_size}")
        if self.block_momentum is not None and self.block_momentum_time_constant is not None:
            raise ValueError("Args `block_momentum` and `block_momentum_time_constant` are both set; "
                             "give η directly or as CNTK's time constant in samples, not both")
        if self.block_momentum is not None and not 0.0 <= self.block_momentum < 1.0:
            raise ValueError(f"Arg `block_momentum` must be in [0, 1), got {self.block_momentum}")
        if self.block_momentum_time_constant is not None and self.block_momentum_time_constant <= 0:
            raise ValueError("Arg `block_momentum_time_constant` must be a positive value (samples), "
                             f"got {self.block_momentum_time_constant}")
        needs_batch = self.block_size_samples is not None or self.block_momentum_time_constant is not None
        if needs_batch and self.batch_size is None:
            raise ValueError("Args `block_size_samples` and `block_momentum_time_constant` count samples; "
                             "set `batch_size` (samples per worker per step) to convert them")
        if not self.block_lr > 0:
            raise ValueError(f"Arg `block_lr` must be a positive value, got {self.block_lr}")
        if self.nesterov_form not in NESTEROV_FORMS:
            raise ValueError(f"Arg `nesterov_form` must be one of {', '.join(NESTEROV_FORMS)}, "
                             f"got {self.nesterov_form!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"Arg `warmup_steps` must be a non-negative number, got {self.warmup_steps}")
        if self.outer_optimizer != "filter":
            if self.outer_optimizer.lower() not in _optimizer_classes():
                raise ValueError(f"Arg `outer_optimizer` must be `filter` or a torch.optim optimizer "
                                 f"name (sgd, adam, ...), got {self.outer_optimizer!r}")
            if self.block_momentum is not None or self.block_momentum_time_constant is not None:
                raise ValueError(f"Arg `block_momentum` applies to outer_optimizer=filter; with "
                                 f"outer_optimizer={self.outer_optimizer} set momentum in `outer_optimizer_kwargs`")
        if self.reset_momentum and self.average_sync:
            raise ValueError("Args `reset_momentum` and `average_sync` exclude each other; set one")

    def resolve(self, num_workers: int) -> tuple[int, float]:
        """(K in steps, η) for N = `num_workers`, warning on degenerate settings."""
        assert num_workers >= 1
        if self.block_size is not None:
            block_size = self.block_size
            block_samples = None if self.batch_size is None else block_size * self.batch_size * num_workers
        else:
            assert self.batch_size is not None and self.block_size_samples is not None
            block_size = steps_per_block(self.block_size_samples, self.batch_size, num_workers)
            block_samples = self.block_size_samples
        if self.block_momentum is not None:
            eta = self.block_momentum
        elif self.block_momentum_time_constant is not None:
            assert block_samples is not None
            eta = momentum_from_time_constant(self.block_momentum_time_constant, block_samples)
        else:
            eta = 1.0 - 1.0 / num_workers
        if self.outer_optimizer == "filter" and block_size == 1 and eta == 0.0 and self.block_lr == 1.0:
            warnings.warn("block_size=1, block_momentum=0, block_lr=1 averages the models after every step: "
                          "plain model averaging; sync SGD (strategy=sync) communicates no more", stacklevel=2)
        return block_size, eta


class BlockMomentumFilter:
    """Chen & Huo 2016, Sec. 2: the blockwise model-update filter on flat fp32 vectors.

    `update(W̄)` takes the mean of the workers' models at the end of block t and returns the
    next block start S(t):

        G(t)   = W̄(t) - S(t-1)                       block gradient
        Δ(t)   = η Δ(t-1) + ζ G(t)                    block momentum filter
        W_g(t) = W_g(t-1) + Δ(t)     (paper)          global model
               = S(t-1)   + Δ(t)     (cntk)
        S(t)   = W_g(t) + η Δ(t)     (NBM)            next block start
               = W_g(t)              (CBM)

    Pure tensor math with no communication, so a simulated cluster can drive it with the
    mean over a worker dimension of stacked models.
    """

    def __init__(self, start: torch.Tensor, *, block_momentum: float, block_lr: float,
                 nesterov: bool = True, nesterov_form: str = "paper") -> None:
        assert start.dim() == 1 and nesterov_form in NESTEROV_FORMS
        self.block_momentum, self.block_lr = block_momentum, block_lr
        self.nesterov, self.nesterov_form = nesterov, nesterov_form
        self.start = start.detach().to(STATE_DTYPE).clone()  # S
        self.global_model = self.start.clone()  # W_g
        self.delta = torch.zeros_like(self.start)  # Δ
        self.num_blocks = 0

    def reset(self, start: torch.Tensor) -> None:
        """Start afresh from `start` (W_g = S = start, Δ = 0), e.g. after fairseq's warm-up."""
        self.start.copy_(start)
        self.global_model.copy_(start)
        self.delta.zero_()

    @torch.no_grad()
    def update(self, mean: torch.Tensor) -> torch.Tensor:
        """One block: W̄(t) in, S(t) out (the returned tensor is the filter's own `start`)."""
        block_grad = mean.to(STATE_DTYPE) - self.start
        self.delta.mul_(self.block_momentum).add_(block_grad, alpha=self.block_lr)
        if self.nesterov_form == "cntk":
            self.global_model.copy_(self.start)
        self.global_model.add_(self.delta)
        if self.nesterov:
            torch.add(self.global_model, self.delta, alpha=self.block_momentum, out=self.start)
        else:
            self.start.copy_(self.global_model)
        self.num_blocks += 1
        return self.start

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start.clone(), "global_model": self.global_model.clone(),
                "delta": self.delta.clone(), "num_blocks": self.num_blocks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name in ("start", "global_model", "delta"):
            getattr(self, name).copy_(state[name])
        self.num_blocks = int(state["num_blocks"])


class OuterOptimizerFilter:
    """DiLoCo's outer step (Douillard et al. 2023, Alg. 1): any torch.optim optimizer stepped on
    the pseudo-gradient S(t-1) - W̄(t). SGD(lr=ζ, momentum=η, nesterov) equals the paper form."""

    def __init__(self, start: torch.Tensor, optimizer: str, optimizer_kwargs: Mapping[str, Any] | None = None) -> None:
        assert start.dim() == 1
        self._param = torch.nn.Parameter(start.detach().to(STATE_DTYPE).clone())
        self.optimizer = _optimizer_classes()[optimizer.lower()]([self._param], **dict(optimizer_kwargs or {}))
        self.start = self._param.data  # S, shares storage with the optimized parameter
        self.num_blocks = 0

    @property
    def global_model(self) -> torch.Tensor:
        return self.start

    def reset(self, start: torch.Tensor) -> None:
        self.start.copy_(start)
        self.optimizer.state.clear()

    @torch.no_grad()
    def update(self, mean: torch.Tensor) -> torch.Tensor:
        self._param.grad = self.start - mean.to(STATE_DTYPE)
        self.optimizer.step()
        self._param.grad = None
        self.num_blocks += 1
        return self.start

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start.clone(), "num_blocks": self.num_blocks, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.start.copy_(state["start"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_blocks = int(state["num_blocks"])


def _tensors(params: Iterable[torch.Tensor] | Iterable[Mapping[str, Any]]) -> list[torch.Tensor]:
    """Parameters, or an optimizer's param_groups, as a list (kept whole: the flat layout is fixed)."""
    out: list[torch.Tensor] = []
    for p in params:
        out.extend(p["params"] if isinstance(p, Mapping) else [p])
    return out


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One flat fp32 copy of `tensors`."""
    return torch.cat([t.detach().reshape(-1).to(STATE_DTYPE) for t in tensors])


@torch.no_grad()
def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy the flat vector back into `tensors` in place (casting to each one's dtype)."""
    torch._foreach_copy_(tensors, list(_unflatten_dense_tensors(flat, tensors)))


def _optimizer_state_tensors(optimizer: Optimizer) -> list[torch.Tensor]:
    """The local optimizer's floating-point state (momentum buffers, Adam moments), step counts excluded."""
    return [v for group in optimizer.param_groups for p in group["params"]
            for k, v in sorted(optimizer.state.get(p, {}).items())
            if k != "step" and torch.is_tensor(v) and v.is_floating_point()]


class BMUFAverager(ModelAverager):
    """Averages parameters every K optimizer steps through the block momentum filter.

    Call `average_parameters(params)` after every optimizer step, as with PyTorch's
    `PeriodicModelAverager`; it counts steps and, at the end of each block, all-reduces the
    mean of the flat parameters once over `process_group`, applies the filter and writes the
    next block start S(t) into `params`. Knobs are `BMUFConfig`'s fields. The start is
    broadcast from the group's first rank at construction so every replica begins the same.
    Each collective of a sync is counted in `comm_stats` when one is given.

    State (`state_dict`) is replicated: every worker holds the same S, W_g, Δ and counters.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[Mapping[str, Any]],
                 config: BMUFConfig | None = None, *, process_group: dist.ProcessGroup | None = None,
                 comm_stats: CommStats | None = None, **knobs: Any) -> None:
        super().__init__(process_group)
        self.comm_stats = comm_stats
        if config is None:
            config = BMUFConfig(**knobs)
        elif knobs:
            raise TypeError(f"give BMUFAverager a config or keyword knobs, not both: {sorted(knobs)}")
        self.config = config
        self.num_workers = self._num_workers()
        with warnings.catch_warnings():
            if not is_rank_zero():  # every rank resolves the same K and η; rank 0 warns for them
                warnings.simplefilter("ignore")
            self.block_size, self.block_momentum = config.resolve(self.num_workers)
        self.block_lr = config.block_lr
        tensors = _tensors(params)
        start = flatten(tensors)
        self._broadcast_start(start)
        unflatten_into(start, tensors)
        self.numel = start.numel()
        self.filter: BlockMomentumFilter | OuterOptimizerFilter
        if config.outer_optimizer == "filter":
            self.filter = BlockMomentumFilter(start, block_momentum=self.block_momentum, block_lr=self.block_lr,
                                              nesterov=config.nesterov, nesterov_form=config.nesterov_form)
        else:
            self.filter = OuterOptimizerFilter(start, config.outer_optimizer, config.outer_optimizer_kwargs)

    # The communication, in three small methods a hierarchical or simulated variant overrides.
    def _num_workers(self) -> int:
        return dist.get_world_size(self.process_group)

    def _broadcast_start(self, flat: torch.Tensor) -> None:
        dist.broadcast(flat, group=self.process_group, group_src=0)

    def _mean_over_workers(self, flat: torch.Tensor) -> torch.Tensor:
        """W̄ = mean over the N workers, in place: the one all-reduce of a block."""
        flat.div_(self.num_workers)
        dist.all_reduce(flat, group=self.process_group)
        if self.comm_stats is not None:
            self.comm_stats.record_all_reduce(flat, self.num_workers)
        return flat

    @property
    def bytes_per_sync(self) -> int:
        """Bytes of the flat parameter vector all-reduced at each block end."""
        return self.numel * STATE_DTYPE.itemsize

    @property
    def global_model(self) -> torch.Tensor:
        """W_g, the model the filter trains (S without the Nesterov look-ahead)."""
        return self.filter.global_model

    def is_sync_step(self, step: int) -> bool:
        """Whether optimizer step number `step` (1-based) ends warm-up or a block."""
        after = step - self.config.warmup_steps
        return (after == 0 and self.config.warmup_steps > 0) or (after > 0 and after % self.block_size == 0)

    @torch.no_grad()
    def average_parameters(self, params: Iterable[torch.Tensor] | Iterable[Mapping[str, Any]],
                           optimizer: Optimizer | None = None) -> bool:
        """Count one optimizer step; at a block end, filter and write S(t). True when it synced.

        `optimizer` (the local one) is needed for `reset_momentum` and `average_sync`.
        """
        self.step += 1
        if not self.is_sync_step(self.step):
            return False
        tensors = _tensors(params)
        mean = self._mean_over_workers(flatten(tensors))
        assert mean.numel() == self.numel, "the parameters averaged must be the same at every call"
        if self.step == self.config.warmup_steps:
            self.filter.reset(mean)
            start = mean
        else:
            start = self.filter.update(mean)
        unflatten_into(start, tensors)
        self._sync_local_optimizer(optimizer)
        return True

    @torch.no_grad()
    def finalize(self, params: Iterable[torch.Tensor] | Iterable[Mapping[str, Any]]) -> None:
        """End of training: close a partial block, then write W_g (no look-ahead) into `params`.

        Its one collective is not counted in `comm_stats`: per-step bytes are those of training
        steps, and this happens once per run (like DDP's start broadcast).
        """
        tensors = _tensors(params)
        stats, self.comm_stats = self.comm_stats, None
        try:
            if self.step > self.config.warmup_steps and not self.is_sync_step(self.step):
                self.filter.update(self._mean_over_workers(flatten(tensors)))
            elif self.step < self.config.warmup_steps:
                self.filter.reset(self._mean_over_workers(flatten(tensors)))
        finally:
            self.comm_stats = stats
        unflatten_into(self.filter.global_model, tensors)

    def _sync_local_optimizer(self, optimizer: Optimizer | None) -> None:
        if not (self.config.reset_momentum or self.config.average_sync):
            return
        if optimizer is None:
            raise ValueError("reset_momentum/average_sync act on the local optimizer: pass it to average_parameters")
        if self.config.reset_momentum:
            optimizer.state.clear()
            return
        state = _optimizer_state_tensors(optimizer)
        if state:
            unflatten_into(self._mean_over_workers(flatten(state)), state)

    def state_dict(self) -> dict[str, Any]:
        """Replicated state: step counter, filter tensors (S, W_g, Δ) and block counter."""
        return {"step": self.step, "numel": self.numel, "filter": self.filter.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["numel"]) != self.numel:
            raise ValueError(f"BMUF state holds {state['numel']} parameters but the model has {self.numel}; "
                             "resume with the model the checkpoint was written by")
        self.step = int(state["step"])
        self.filter.load_state_dict(state["filter"])
