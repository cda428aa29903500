"""What a process needs to know of the launcher that started it (torchrun, SLURM's srun, or
Lightning's own script launcher) before Lightning's Trainer exists: whether it is rank 0, which
run dir every task of a SLURM job step agrees on, and whether srun laid out its tasks the way
Lightning's ``SLURMEnvironment`` reads them. Plain functions on the environment (no torch), so
`asrbench --help` stays fast and the rules are tested without a cluster (docs/slurm.md)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime

RUN_STAMP_RESOLVER = "asrbench.run_stamp"  # conf/train.yaml's hydra.run.dir: ${asrbench.run_stamp:%Y-...}
INTERACTIVE_JOB_NAMES = ("bash", "interactive")  # Lightning ignores SLURM for jobs of these names


def slurm_task(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is a task of a SLURM job step that Lightning trains under (its
    ``SLURMEnvironment``): srun started it, and the job is not named bash/interactive."""
    return ("SLURM_NTASKS" in env and "SLURM_STEP_ID" in env and "SLURM_PROCID" in env
            and env.get("SLURM_JOB_NAME") not in INTERACTIVE_JOB_NAMES)


def is_global_zero(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is global rank 0 (what ``trainer.is_global_zero`` will say), decided from
    the launcher that started it before the Trainer exists: torchrun's RANK; srun's SLURM_PROCID in
    a step Lightning trains under; Lightning's script launcher, which gives the processes it starts
    LOCAL_RANK and NODE_RANK (its first process has neither). SLURM_PROCID comes after RANK because
    torchrun inside srun numbers its own workers, and it is read only in a real step because the
    processes Lightning starts inside an interactive srun inherit the task's SLURM_PROCID."""
    if env.get("RANK"):
        return int(env["RANK"]) == 0
    if slurm_task(env):
        return int(env["SLURM_PROCID"]) == 0
    return int(env.get("LOCAL_RANK") or 0) == 0 and int(env.get("NODE_RANK") or 0) == 0


def run_stamp(pattern: str, env: Mapping[str, str] = os.environ) -> str:
    """The stamp of a run dir: the time now in `pattern` (what Hydra's ``${now:pattern}`` gives),
    or, in a task of a SLURM job step, ``slurm<job id>`` (``slurm<job id>.<step id>`` after the
    job's first step). Every task of a step resolves hydra.run.dir on its own, at its own time;
    the job's ids are the same in all of them, so they write one run dir, and a requeued job,
    whose first step is step 0 again, finds its own checkpoints there."""
    if slurm_task(env) and env.get("SLURM_JOB_ID"):
        step = env.get("SLURM_STEP_ID", "0")
        return f"slurm{env['SLURM_JOB_ID']}" + (f".{step}" if step != "0" else "")
    return datetime.now().strftime(pattern)


def task_layout_problem(env: Mapping[str, str] = os.environ) -> str | None:
    """Why Lightning cannot train in this srun step (one line), or None. Lightning's SLURMEnvironment
    takes the processes per machine from --ntasks-per-node and refuses a bare --ntasks (srun -n N)
    with a traceback; this says the same before anything starts."""
    if not slurm_task(env):
        return None
    ntasks = int(env.get("SLURM_NTASKS") or 1)
    if ntasks > 1 and "SLURM_NTASKS_PER_NODE" not in env:
        nnodes = int(env.get("SLURM_NNODES") or 1)
        per_node = f"{ntasks // nnodes}" if ntasks % nnodes == 0 else "N"
        return (f"srun -n {ntasks} (--ntasks) started this step without --ntasks-per-node, which Lightning "
                f"needs to place the workers; use srun --ntasks-per-node={per_node}"
                f"{f' --nodes={nnodes}' if nnodes > 1 else ''} (nodes=<all tasks> num_machines=<--nodes>)")
    return None


def register_resolvers() -> None:
    """Register the config resolvers asrbench's configs use (before Hydra composes them)."""
    from omegaconf import OmegaConf

    # cached like Hydra's `now`, so one process resolves hydra.run.dir to the same stamp every time
    OmegaConf.register_new_resolver(RUN_STAMP_RESOLVER, run_stamp, use_cache=True, replace=True)
