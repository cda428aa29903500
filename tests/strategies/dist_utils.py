"""Run a function in N real gloo processes and get each rank's result back.

    results = run_workers(fn, 2, arg1, arg2)        # [fn(0, 2, arg1, arg2), fn(1, 2, arg1, arg2)]

`fn(rank, world_size, *args)` must be importable (module level). Each worker joins a fresh gloo
group on a free port with a short collective timeout, runs one torch thread, and sends back
`fn`'s return value (through torch.save, so tensors come back whole). A worker that raises is
reported with its rank and traceback; one that dies, with its exit code; the whole run is
bounded by `timeout` (workers still running then are killed and named).

Workers start from a fork server that has already imported torch, Lightning and the asrbench
strategies, so a test pays the imports once, not once per process. Lightning tests can use the
same server with ``start_method="forkserver"`` on an asrbench strategy (they give each worker its
own CPU weights; Lightning's own DDPStrategy does so for "spawn" only, and its "forkserver"
workers would share one set of parameters).
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import shutil
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

PRELOAD = ["torch", "torch.distributed", "lightning.pytorch", "asrbench.strategies.sync",
           "asrbench.strategies.gtc"]


def context() -> Any:
    """The fork-server context (preloading PRELOAD the first time it starts)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerError(RuntimeError):
    """A worker raised, died or ran out of time; the message names the rank(s)."""


@dataclass
class WorkerResult:
    rank: int
    ok: bool
    value: Any = None
    error: str | None = None  # traceback of a worker that raised; "exit code N"; or "timed out"
    exitcode: int | None = None


def _dumps(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _worker(fn: Callable[..., Any], rank: int, world_size: int, store_file: str, args: tuple,
            collective_timeout_s: float, results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        # a file rendezvous: no port to pick, so no race with another process taking it meanwhile
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=collective_timeout_s))
        value = fn(rank, world_size, *args)
        results.put((rank, True, _dumps(value)))
    except BaseException as exc:  # report everything, SystemExit included
        from asrbench.strategies.comm import publish_failure

        publish_failure(exc)
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_workers_outcomes(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0,
                         collective_timeout_s: float = 20.0) -> list[WorkerResult]:
    """Run `fn` on `world_size` ranks and return every rank's outcome, failures included."""
    import torch

    ctx = context()
    results = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="asrbench-dist-")
    store_file = os.path.join(store_dir, "store")
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, store_file, args, collective_timeout_s, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes: dict[int, WorkerResult] = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) < world_size and time.monotonic() < deadline:
        try:
            rank, ok, payload = results.get(timeout=0.1)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break  # some died without a word
            continue
        value = torch.load(io.BytesIO(payload), weights_only=False) if ok else None
        outcomes[rank] = WorkerResult(rank, ok, value=value, error=None if ok else payload)
    for rank, p in enumerate(procs):
        p.join(max(0.0, min(5.0, deadline - time.monotonic())))
        if p.is_alive():
            p.kill()
            p.join(5)
            outcomes.setdefault(rank, WorkerResult(rank, False, error=f"timed out after {timeout:.0f} s"))
        outcomes.setdefault(rank, WorkerResult(rank, False, error=f"exit code {p.exitcode}"))
        outcomes[rank].exitcode = p.exitcode
    results.close()
    shutil.rmtree(store_dir, ignore_errors=True)
    return [outcomes[r] for r in range(world_size)]


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0,
                collective_timeout_s: float = 20.0) -> list[Any]:
    """`[fn(rank, world_size, *args) for each rank]`, run in parallel; raises WorkerError naming failed ranks."""
    outcomes = run_workers_outcomes(fn, world_size, *args, timeout=timeout,
                                    collective_timeout_s=collective_timeout_s)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise WorkerError("\n".join(f"rank {o.rank} failed: {o.error}" for o in failed))
    return [o.value for o in outcomes]
