"""When a collective fails, say which rank is at fault.

Gloo and NCCL report a lost peer as "Connection closed by peer [addr]:port" or "Timed out
waiting 300000ms": no rank, no step. The workers already share a key-value store (the one
``init_process_group`` rendezvoused through), so:

* a rank that fails on its own (an exception in its training step, a non-finite gradient)
  writes ``failed/<rank>`` with a one-line reason before it exits (:func:`publish_failure`);
* a rank whose collective fails writes ``alive/<rank>`` and waits a few seconds for the
  others to do one or the other (:func:`describe_peer_failures`); a rank that wrote neither
  died or hangs.

The collective that failed then ends the run with a :class:`CollectiveError` naming the step,
the collective and the rank(s) at fault. A collective never waits longer than the process
group's timeout (the strategies' ``timeout``), so a dead or hung worker ends the run in
bounded time.
"""
from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from lightning.fabric.strategies.launchers.subprocess_script import (_ChildProcessObserver,
                                                                    _set_num_threads_if_needed)
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

_PREFIX = "asrbench/failure"
# Messages of lost peers and timeouts from gloo, NCCL and c10d.
_COLLECTIVE_PATTERN = re.compile(
    r"gloo|nccl|connection (closed|reset|refused)|timed out|timeout|broken pipe|peer|socket", re.IGNORECASE)


class CollectiveError(RuntimeError):
    """A collective failed because another rank failed, died or hangs; the message names it."""


def _store() -> dist.Store | None:
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_collective_failure(exc: BaseException) -> bool:
    """True when `exc` comes from a collective losing a peer rather than from this rank's own code."""
    if isinstance(exc, CollectiveError):
        return True
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and bool(_COLLECTIVE_PATTERN.search(str(exc)))


def publish_failure(exc: BaseException, step: int | None = None) -> None:
    """Record in the shared store that this rank failed with `exc` (no-op without a process group)."""
    store = _store()
    if store is None:
        return
    where = f" at step {step}" if step is not None else ""
    try:
        store.set(f"{_PREFIX}/failed/{dist.get_rank()}", f"raised{where} {_one_line(exc)}")
    except (RuntimeError, ValueError):  # the store's host is gone too; nothing more to say
        pass


def published_failure(rank: int) -> str | None:
    """What `rank` published with :func:`publish_failure` (e.g. "raised at step 2 ValueError: boom"),
    or None: nothing published, or no process group or store to ask."""
    store = _store()
    if store is None:
        return None
    try:
        return _failure(store, rank)
    except (RuntimeError, ValueError):
        return None


def _failure(store: dist.Store, rank: int) -> str | None:
    """`rank`'s published failure in `store`, or None; the store's errors propagate."""
    key = f"{_PREFIX}/failed/{rank}"
    return store.get(key).decode() if store.check([key]) else None


def describe_peer_failures(wait_s: float = 3.0, poll_s: float = 0.05) -> str:
    """Which other ranks failed (and how), or went silent, as seen from this rank.

    Checks in as alive, then waits up to `wait_s` for every other rank to have either checked in
    or published a failure. Returns one clause such as "rank 1 raised at step 3 ValueError: boom"
    or "rank 2 did not answer (it died or hangs)".
    """
    store = _store()
    if store is None:
        return "no process group to ask which rank failed"
    rank, world = dist.get_rank(), dist.get_world_size()
    failed: dict[int, str] = {}
    alive: set[int] = {rank}
    try:
        store.set(f"{_PREFIX}/alive/{rank}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            for peer in range(world):
                if peer in failed or peer in alive:
                    continue
                failure = _failure(store, peer)
                if failure is not None:
                    failed[peer] = failure
                elif store.check([f"{_PREFIX}/alive/{peer}"]):
                    alive.add(peer)
            if len(failed) + len(alive) == world or time.monotonic() >= deadline:
                break
            time.sleep(poll_s)
    except (RuntimeError, ValueError) as err:
        return f"the rendezvous store is unreachable ({_one_line(err, 120)}): rank 0, which hosts it, likely died"
    silent = [p for p in range(world) if p not in failed and p not in alive]
    parts = [f"rank {p} {msg}" for p, msg in sorted(failed.items())]
    parts += [f"rank {p} did not answer (it died or hangs)" for p in silent]
    return "; ".join(parts) if parts else "every rank is alive; the collective itself failed"


def collective_error(err: BaseException, what: str, step: int | None = None,
                     wait_s: float = 3.0) -> CollectiveError:
    """A :class:`CollectiveError` for `err` raised by collective `what`, naming the rank(s) at fault."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    where = f" at step {step}" if step is not None else ""
    return CollectiveError(f"{what}{where} failed on rank {rank}: {describe_peer_failures(wait_s)} "
                           f"[{_one_line(err, 160)}]")


def as_timedelta(timeout: timedelta | float | int | None) -> timedelta | None:
    """A collective timeout from seconds (as configs give it) or a timedelta (as Lightning takes it)."""
    if timeout is None or isinstance(timeout, timedelta):
        return timeout
    if timeout <= 0:
        raise ValueError(f"Arg `timeout` must be a positive number of seconds, got {timeout}")
    return timedelta(seconds=float(timeout))



def is_rank_zero() -> bool:
    """Whether this process speaks for the run on the console: global rank 0 once the process group
    exists, else the only process (the launching one, or the simulated cluster's)."""
    return not dist.is_initialized() or dist.get_rank() == 0

# --- a worker process that dies under Lightning's script launcher --------------------------------

class NamingObserver(_ChildProcessObserver):
    """Lightning's watcher of the worker processes it started, which on a death kills every
    process at once (SIGKILL, no message the user can act on). This one first prints one line
    naming the rank, the exception it published (when it raised one), its exit status and the
    run's last checkpoint, and exits with status 2. It may see a rank exit before rank 0's own
    collective fails, so its line carries the cause too."""

    def __init__(self, *args: Any, node_rank: int, num_processes: int,
                 describe: Callable[[], str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._node_rank, self._num_processes, self._describe = node_rank, num_processes, describe

    def _run(self) -> bool:
        for proc in self._child_processes:
            proc.poll()
        codes = [proc.returncode for proc in self._child_processes]
        if all(code == 0 for code in codes):
            return True
        for i, code in enumerate(codes):
            if code:  # local rank i + 1; the launcher itself is local rank 0
                rank = self._node_rank * self._num_processes + i + 1
                how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                cause = published_failure(rank)  # its own exception, when it had time to say so
                tail = f"; {self._describe()}" if self._describe else ""
                print(f"error: rank {rank} {f'{cause} and {how}' if cause else how}{tail}", file=sys.stderr,
                      flush=True)
                for p in self._child_processes:
                    p.send_signal(self._termination_signal)
                os._exit(2)
        return False


class NamingSubprocessLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher (the same processes) with :class:`NamingObserver`."""

    describe: Callable[[], str] | None = None  # the last-checkpoint clause, set by the strategy

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            NamingObserver(main_pid=os.getpid(), child_processes=self.procs,
                           node_rank=self.cluster_environment.node_rank(), num_processes=self.num_processes,
                           describe=self.describe).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


def naming_launcher(launcher: Any, describe: Callable[[], str] | None = None) -> Any:
    """Lightning's _SubprocessScriptLauncher swapped for one that names a dead worker's rank."""
    if type(launcher) is not _SubprocessScriptLauncher:
        return launcher
    named = NamingSubprocessLauncher(launcher.cluster_environment, launcher.num_processes, launcher.num_nodes)
    named.describe = describe
    return named
