"""The common edge of every asrbench strategy: Lightning's DDPStrategy with byte accounting.

:class:`AccountedDDPStrategy` gives ``comm_metrics()`` (last step, for logging), ``comm_summary()``
(per-step means, for results.json), a collective ``timeout`` that also takes seconds, errors that
name the rank at fault when a worker raises, dies or hangs (:mod:`asrbench.strategies.comm`), and
weights of its own for every worker when Lightning launches them through a fork server on CPU.
"""
from __future__ import annotations

import itertools
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import _register_ddp_comm_hook
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from asrbench.checkpoint import describe_last_checkpoint
from asrbench.errors import CheckpointError
from asrbench.strategies.accounting import CommStats
from asrbench.strategies.comm import (
    CollectiveError,
    as_timedelta,
    collective_error,
    is_collective_failure,
    naming_launcher,
    publish_failure,
)


log = logging.getLogger(__name__)


HOOK_KEYS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")


def refuse_hook_keywords(kwargs: dict[str, Any], why: str) -> None:
    """A ValueError when DDPStrategy keywords that set a communication hook or averager are given to
    a strategy that sets its own (`why` says so)."""
    for key in HOOK_KEYS:
        if kwargs.get(key) is not None:
            raise ValueError(f"{why}; remove `{key}`")


def gather_rank_states(local: dict[str, Any], world: int, is_zero: bool, device: torch.device) -> dict[str, Any]:
    """Every rank's `local` state dict as ``{"world_size", "ranks": {rank: state}}`` on rank 0 (which
    writes the checkpoint; {} elsewhere): its tensors by ``dist.gather``, the rest as objects."""
    if world == 1 or not dist.is_initialized():
        return {"world_size": world, "ranks": {0: local}}
    tensors = sorted(k for k, v in local.items() if torch.is_tensor(v))
    gathered: dict[str, list[torch.Tensor] | None] = {}
    for key in tensors:
        value = local.pop(key).to(device)
        gathered[key] = [torch.empty_like(value) for _ in range(world)] if is_zero else None
        dist.gather(value, gathered[key], dst=0)
    others: list[Any] = [None] * world if is_zero else None  # type: ignore[assignment]
    dist.gather_object(local, others, dst=0)
    if not is_zero:
        return {}
    return {"world_size": world, "ranks": {r: {**others[r], **{k: gathered[k][r].cpu() for k in tensors}}
                                           for r in range(world)}}


class AccountedDDPStrategy(DDPStrategy):
    """DDPStrategy with :class:`CommStats` and failures that name the rank; subclasses fill the stats."""

    registry_name: str | None = None

    def __init__(self, timeout: timedelta | float | None = None, **kwargs: Any) -> None:
        timeout = as_timedelta(timeout)
        if timeout is not None:
            kwargs["timeout"] = timeout
        super().__init__(**kwargs)
        self._comm_stats = CommStats(world_size=1)

    @property
    def comm_stats(self) -> CommStats:
        return self._comm_stats

    def setup_distributed(self) -> None:
        super().setup_distributed()
        self.comm_stats.world_size = self.world_size
        self.comm_stats.rank = self.global_rank

    def model_to_device(self) -> None:
        """Also give each worker its own copy of the weights when launched through a fork server on CPU.

        The spawn and fork-server launchers pass the model through torch.multiprocessing, which
        puts CPU tensors in shared memory; Lightning copies them back for "spawn" only, so with
        "forkserver" every worker would update one shared set of parameters.
        """
        super().model_to_device()
        if self.root_device.type == "cpu" and self._start_method == "forkserver":
            with torch.no_grad():
                for tensor in itertools.chain(self.model.parameters(), self.model.buffers()):
                    tensor.data = tensor.data.clone()

    checkpoint_dir: str | None = None  # where the run's checkpoints go: named when a worker dies

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        describe = None
        if self.checkpoint_dir:
            directory = Path(self.checkpoint_dir)
            describe = lambda: describe_last_checkpoint(directory)  # noqa: E731
        self._launcher = naming_launcher(self._launcher, describe)

    def comm_metrics(self) -> dict[str, float]:
        """The last step of this worker: bytes sent/received, dense equivalent, ratio, density."""
        last = self.comm_stats.last_step()
        return {"bytes_sent": last["bytes_sent_per_worker_per_step"],
                "bytes_received": last["bytes_received_per_worker_per_step"],
                "dense_bytes": last["dense_bytes_per_worker_per_step"],
                "compression_ratio": last["compression_ratio"],
                "density": last["density"],
                "elements_sent": last["elements_sent_per_step"]}

    def comm_summary(self) -> dict[str, float]:
        """Means over this worker's steps (keys of :meth:`CommStats.per_step`); no collective."""
        return self.comm_stats.per_step()

    def _current_step(self) -> int | None:
        module = self.lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        return None if trainer is None else int(trainer.global_step)

    def on_exception(self, exception: BaseException) -> None:
        """Publish this rank's own failure for the others, or name the failed rank in a collective's error."""
        super().on_exception(exception)
        if isinstance(exception, CollectiveError):
            return
        if is_collective_failure(exception):
            named = collective_error(exception, "a collective", self._current_step())
            exception.args = (str(named),)
        else:
            publish_failure(exception, self._current_step())

    def register_comm_hook(self, hook: Any, state: Any = None) -> None:
        """Register a DDP communication hook on every device type: Lightning's DDPStrategy registers
        one only on CUDA and silently skips it on CPU (gloo). Call from ``_register_ddp_hooks``."""
        assert isinstance(self.model, DistributedDataParallel)
        _register_ddp_comm_hook(model=self.model, ddp_comm_state=state, ddp_comm_hook=hook)

    # -- checkpoints: rank-local state (residuals, errors), gathered to rank 0 --------------------
    rank_state_key: str | None = None  # checkpoint entry holding every rank's rank_local_state()
    rank_state_what: str = "rank-local state"  # what it is, for messages (e.g. "GTC residuals")

    def rank_local_state(self) -> Any | None:
        """This rank's state that a checkpoint must keep per rank (``state_dict()`` of tensors and
        numbers, ``load_state_dict()``): error-feedback memory; None for a strategy without any."""
        return None

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        state = self.rank_local_state()
        if state is not None and self.rank_state_key:
            entry = gather_rank_states(state.state_dict(), self.world_size, self.is_global_zero, self.root_device)
            if self.is_global_zero:
                checkpoint = {**checkpoint, self.rank_state_key: entry}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        state = self.rank_local_state()
        if state is None or not self.rank_state_key:
            return checkpoint
        entry = checkpoint.get(self.rank_state_key)
        if entry is None:
            if self.is_global_zero:
                log.warning("%s holds no %s (written by another strategy?): they start at 0", checkpoint_path,
                            self.rank_state_what)
            return checkpoint
        if entry["world_size"] != self.world_size:
            raise CheckpointError(f"{checkpoint_path} holds {self.rank_state_what} of {entry['world_size']} workers "
                                  f"but this run has {self.world_size}; resume with nodes={entry['world_size']}")
        state.load_state_dict(entry["ranks"][self.global_rank])
        return checkpoint

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        if cls.registry_name and cls.registry_name not in strategy_registry:
            strategy_registry.register(cls.registry_name, cls, description=(cls.__doc__ or "").split("\n")[0])


