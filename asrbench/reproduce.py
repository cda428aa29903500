"""`asrbench reproduce`: the paper's table on a simulated cluster, next to the paper's figures.

Runs the single-worker baseline and every (strategy, workers) pair of the chosen scale, each
as an ordinary `train` run in its own directory (finished runs are reused, so an interrupted
reproduce picks up where it stopped), then writes report.md with PNG plots and logs both to
W&B.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.utils import to_absolute_path
from omegaconf import OmegaConf

from asrbench import analysis, experiment, report, runinfo, stats, strategies
from asrbench.errors import ConfigError, RunFailed
from asrbench.jobs import Job, Runner  # noqa: F401 (Runner: imported from here too)
from asrbench.model.module import scaled_lr
from asrbench.reproduce_projection import (FP32_BYTES, model_parameters, paper_projection,  # noqa: F401 (re-exported)
                                           project, size_keys)
from asrbench.reproduce_setup import describe_setup  # noqa: F401 (re-exported: the report's setup paragraph)

log = logging.getLogger(__name__)


def run_name(strategy: str, nodes: int) -> str:
    return f"{strategy}_n{nodes}"


# ---------------------------------------------------------------------------------------------
# Finished experiments
# ---------------------------------------------------------------------------------------------
def earlier_invocations(out: Path) -> list[dict]:
    """What earlier invocations in this directory did (its reproduce.json, if any): their wall times,
    commits and how many runs each trained, so that a report re-rendered over finished runs still
    names the invocation that trained them."""
    p = Path(out) / "reproduce.json"
    try:
        old = json.loads(p.read_text())
    except (OSError, ValueError):
        return []
    if old.get("invocations"):
        return list(old["invocations"])
    return [{"wall_s": old.get("wall_s"), "trained": None, "git_commit": old.get("git_commit")}]


def load_reproduce(path: str | Path) -> dict:
    """A finished reproduce's reproduce.json (the file, or the directory holding it)."""
    p = Path(path)
    p = p / "reproduce.json" if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"compare_with: {path} holds no reproduce.json; name the directory of a finished "
                          f"asrbench reproduce")
    return json.loads(p.read_text())


def finished_seeds(out: Path) -> list[int]:
    """Seeds whose baseline an earlier invocation in `out` finished (``seed<k>/single/results.json``):
    rerunning a reproduce with other seeds adds to them, and the report pools every seed found."""
    found = []
    for d in Path(out).glob("seed*"):
        tail = d.name[len("seed"):]
        if tail.isdigit() and (d / strategies.BASELINE / "results.json").is_file():
            found.append(int(tail))
    return sorted(found)


def peak_lr(config: Mapping) -> float | None:
    """The learning rate a run's optimizer started from after its lr scaling (optim.lr_scaling by N,
    or by the workers one exchange combines), before warm-up and decay: what the report prints per cell."""
    try:
        cfg = OmegaConf.create(dict(config))
        optim = experiment.inner_optim(cfg)
        return scaled_lr(float(optim["lr"]), str(optim.get("lr_scaling", "none")), int(cfg.nodes))
    except (KeyError, TypeError, ValueError, ConfigError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# Running it: warm starts, the knob search, the grid over strategies x workers x seeds
# ---------------------------------------------------------------------------------------------
def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def pick_winner(candidates: Sequence[Mapping], max_density: float | None = None) -> int | None:
    """The candidate with the lowest dev WER (the first of equals) among those that finished (a
    diverged one has no dev WER) and sent at most `max_density` of the gradient elements per step (a
    compressor sending more is not compressing: GTC at 15% density sends 1.8x a dense all-reduce's
    bytes at 16 workers); when none finished within the cap, the finished one that sent the least;
    None when every candidate diverged. Test sets are never looked at."""
    finished = [i for i, c in enumerate(candidates) if c.get("dev_wer") is not None]
    if not finished:
        return None
    eligible = [i for i in finished
                if max_density is None or candidates[i].get("density") is None or candidates[i]["density"] <= max_density]
    if not eligible:
        return min(finished, key=lambda i: (candidates[i]["density"], i))
    return min(eligible, key=lambda i: (candidates[i]["dev_wer"], i))


def candidate_row(job: Job, overrides: Sequence[str], res: Mapping | None, failed: str | None) -> dict:
    """One search candidate as search.json and lr_search.json keep it: its dev and test WER, steps, peak
    lr, density and wall time, or, when it diverged (no results), None for each and the reason."""
    if res is None:
        return {"overrides": list(overrides), "dev_wer": None, "test_wer": None, "steps": None, "run": str(job.path),
                "lr": None, "density": None, "wall_s": None, "eligible": False, "reason": f"diverged: {failed}"}
    return {"overrides": list(overrides), "dev_wer": res["eval"]["dev"]["wer"], "test_wer": res["wer"],
            "steps": res["steps"], "run": str(job.path), "lr": peak_lr(res.get("config") or {}),
            "density": _density(res), "wall_s": res.get("wall_s"), "eligible": True, "reason": None}


def no_winner(what: str, rows: Sequence[Mapping]) -> RunFailed:
    """The one line that stops an invocation whose every candidate of one search diverged."""
    return RunFailed(f"every candidate of the {what} diverged ({len(rows)} runs; the first: "
                     f"{rows[0]['reason'].removeprefix('diverged: ')}); give it smaller learning rates or more warm-up")


def _load_finished(path: str | Path, name: str) -> dict:
    """A finished search's <name>.json: the file, or the reproduce directory holding <name>/<name>.json."""
    p = Path(path)
    p = p / name / f"{name}.json" if (p / name / f"{name}.json").is_file() else p
    if not p.is_file():
        raise ConfigError(f"reproduce.{name}.reuse={path}: no {name}.json there; point it at a finished "
                          f"reproduce directory or its {name}/{name}.json")
    return json.loads(p.read_text())


def load_search(path: str | Path) -> dict:
    """A finished knob search (search.json, or the reproduce directory holding search/search.json)."""
    return _load_finished(path, "search")


def load_lr_search(path: str | Path) -> dict:
    """A finished lr search (lr_search.json, or the reproduce directory holding lr_search/lr_search.json)."""
    return _load_finished(path, "lr_search")


def check_config(rc: Any) -> None:
    """Refuse, in one line naming the key, a reproduce configuration the steps below cannot run."""
    epochs, warm = int(rc.epochs), int(rc.get("warm_start_epochs") or 0)
    if not 0 <= warm < epochs:
        raise ConfigError(f"reproduce.warm_start_epochs={warm} must be in [0, reproduce.epochs={epochs})")
    for key, ok, what in (("mde_target", lambda v: v > 0, "a positive fraction (0.02 = 2 points)"),
                          ("plateau_tolerance", lambda v: v >= 0, "a fraction >= 0 (0.02 = 2%)"),
                          ("plateau_points", lambda v: v >= 3 and v == int(v), "a whole number >= 3")):
        value = rc.get(key)
        if value is None:
            continue
        try:
            good = ok(float(value))
        except (TypeError, ValueError):
            good = False
        if not good:
            raise ConfigError(f"reproduce.{key}={value} must be {what}")
    for name in rc.strategies:  # any registered strategy; the baseline runs anyway
        if strategies.spec(name).name == strategies.BASELINE:
            raise ConfigError(f"reproduce.strategies lists {name}, the baseline every seed runs anyway; remove it")
    control = rc.get("control")
    if control is not None and control not in rc.strategies:
        raise ConfigError(f"reproduce.control={control} must be one of reproduce.strategies={list(rc.strategies)}: "
                          f"the control runs at every worker count beside the strategies it controls")
    for cand in (rc.get("lr_search") or {}).get("base_candidates") or []:
        if not any(_key(str(o)) == "optim.lr" for o in cand):
            raise ConfigError(f"reproduce.lr_search.base_candidates: {list(cand)} sets no optim.lr; each candidate is "
                              f"the baseline's learning rate, e.g. [optim.lr=0.001]")
    select = lr_select(rc.get("lr_search"))
    if select not in ("each_n", "one_rule"):
        raise ConfigError(f"reproduce.lr_search.select={select} is unknown; use each_n (each worker count's own "
                          f"best candidate) or one_rule (the candidate best on average over them, for every N)")
    if rc.get("lr_search") and not control:
        raise ConfigError("reproduce.lr_search needs reproduce.control (the strategy whose lr is searched at each N, "
                          "e.g. sync); set it, or lr_search: null")
    search_epochs = rc.get("search_epochs")
    if search_epochs is not None and not (int(search_epochs) >= 1 and int(search_epochs) <= epochs - warm):
        raise ConfigError(f"reproduce.search_epochs={search_epochs} must be a whole number in [1, reproduce.epochs - "
                          f"warm_start_epochs = {epochs - warm}], or null for the grid's")
    if fer_kind(rc) not in (None, False, "phones", "alignment"):
        raise ConfigError(f"reproduce.fer={rc.get('fer')} is unknown; use phones (a phone probe against the "
                          f"synthesiser's timings), alignment (forced alignment with each seed's warm start) or false")


def fer_kind(rc: Any) -> Any:
    """reproduce.fer: phones, alignment, or none (true: the older name of alignment)."""
    return "alignment" if rc.get("fer") is True else rc.get("fer")


SINGLE = [f"strategy={strategies.BASELINE}", "nodes=1"]


@dataclass
class Plan:
    """What the steps of one invocation share: its configuration and directory, the job runner, the
    seeds, and the overrides each kind of job is built from."""

    rc: Any  # cfg.reproduce
    out: Path
    runner: Runner
    seeds: list[int]
    common: list[str]  # every job's overrides
    logger: str  # cfg.run_logger
    warm: int  # warm-start epochs (0: none)
    warm_dir: dict[int, Path]  # seed -> its warm start's run dir
    start: dict[int, list[str]]  # seed -> what its runs continue from (init_from=, and data.alignments=)
    rest: list[str]  # the grid's epochs after the warm start
    search_rest: list[str]  # the searches' epochs
    same_budget: bool  # the searches train as long as the grid: a winner stands in for its grid run
    control: str | None
    fer: Any
    fixed: dict[str, list[str]] = field(default_factory=dict)  # strategy -> reproduce.strategy_overrides
    baselines: list[Job] = field(default_factory=list)
    lr_winners: dict[int, list[str]] = field(default_factory=dict)  # N -> the control's winning lr overrides
    inherit_lr: set[str] = field(default_factory=set)  # the strategies that take them
    inherit_group: set[str] = field(default_factory=set)  # ... that take them applied to one exchange's workers
    base_lr: list[str] = field(default_factory=list)  # the baseline's winning lr overrides (warm-up included)
    reused_paths: dict[tuple[str, int, int], Path] = field(default_factory=dict)  # a search winner's grid run

    def job_type(self, kind: str) -> list[str]:
        """W&B's job_type of a run: warm_start, lr_search, search, baseline, grid."""
        return [f"logger.job_type={kind}"] if self.logger == "wandb" else []

    def lr_at(self, strategy: str, n: int) -> list[str]:
        """The learning-rate overrides `strategy` runs with at `n` workers: the control's winner there, or
        (lr_search.inherit_group) its scaling rule applied to the workers one exchange combines
        (`optim.lr_scaling=linear` -> `linear_group`: GTC-BMUF's group, asrbench.experiment.inner_optim)."""
        won = list(self.lr_winners.get(int(n), []))
        if strategy in self.inherit_lr:
            return won
        if strategy in self.inherit_group:
            return [f"{o}_group" if _key(o) == "optim.lr_scaling" and not o.endswith(("=none", "_group")) else o
                    for o in won]
        return []

    def set_baselines(self) -> None:
        """Each seed's single-worker baseline: the grid's budget from its warm start, at the baseline's
        searched lr (with the warm-up it was searched with) when there was a search."""
        self.baselines = [Job(f"seed{s} single", [*self.common, *SINGLE, f"seed={s}", *self.rest, *self.start[s],
                                                  *self.base_lr, *self.job_type("baseline")],
                              self.reused_paths.get((strategies.BASELINE, 1, s),
                                                    self.out / f"seed{s}" / strategies.BASELINE))
                          for s in self.seeds]

    def search_seed(self) -> int:
        search = self.rc.get("search")
        seed = int(search.seed) if search else self.seeds[0]
        if seed not in self.seeds:
            raise ConfigError(f"reproduce.search.seed={seed} must be one of reproduce.seeds={self.seeds}")
        return seed


def make_plan(cfg: Any, out: Path, conf_dir: str | Path) -> Plan:
    """Check the configuration, pool the seeds finished here before, hold the directory, and read the
    corpus and features once, before any run."""
    rc = cfg.reproduce
    check_config(rc)
    seeds = [int(s) for s in rc.get("seeds") or [0]]
    pooled = [s for s in finished_seeds(out) if s not in seeds] if rc.get("pool_seeds", True) else []
    if pooled:  # seeds an earlier invocation here trained: reused, and pooled with this invocation's
        log.info("seeds %s finished in %s before: pooled with reproduce.seeds=%s", pooled, out, seeds)
        seeds += pooled
    epochs, warm = int(rc.epochs), int(rc.get("warm_start_epochs") or 0)
    search_epochs = rc.get("search_epochs")
    # one W&B group per invocation (its directory's name): runs of different invocations stay apart
    common = [*rc.overrides, f"logger={cfg.run_logger}", f"experiment=reproduce-{out.name}",
              "trainer.enable_progress_bar=false",
              "cluster=simulated", f"cluster.network={cfg.network}"]
    threads = rc.get("threads_per_run")
    runner = Runner(conf_dir, int(rc.get("parallel") or os.cpu_count() or 1), int(threads) if threads else None, lock=out)
    experiment.load_features(compose("train", overrides=common))  # corpus and features once, before any run
    fer = fer_kind(rc)
    if fer == "phones":  # every run, the warm starts included, trains the probe beside its CTC model
        common.append("data.phone_labels=true")
    warm_dir = {s: out / f"seed{s}" / "warm_start" for s in seeds}
    rest = [f"trainer.max_epochs={epochs - warm}"]
    # the searches' budget: the grid's, or `search_epochs` of it (then no search run stands in for a grid run)
    same_budget = search_epochs is None or int(search_epochs) == epochs - warm
    return Plan(rc=rc, out=out, runner=runner, seeds=seeds, common=common, logger=str(cfg.run_logger), warm=warm,
                warm_dir=warm_dir, start={s: [f"init_from={warm_dir[s]}"] if warm else [] for s in seeds}, rest=rest,
                search_rest=rest if same_budget else [f"trainer.max_epochs={int(search_epochs)}"],
                same_budget=same_budget, control=rc.get("control"), fer=fer)


def train_warm_starts(plan: Plan) -> dict[str, dict]:
    """Step 1: one single-worker warm start per seed; every run of that seed continues from it. With
    fer=alignment, each seed's runs are then scored against the forced alignment of that seed's own
    warm start (one reference per seed: a run and its baseline share it). Returns the warm starts' results."""
    if not plan.warm:
        return {}
    warm_over = [str(o) for o in plan.rc.get("warm_start_overrides") or []]
    results = plan.runner.run([Job(f"seed{s} warm start", [*plan.common, *SINGLE, f"seed={s}",
                                                           f"trainer.max_epochs={plan.warm}", *warm_over,
                                                           *plan.job_type("warm_start")], plan.warm_dir[s])
                               for s in plan.seeds])
    if plan.fer == "alignment":
        for s in plan.seeds:
            align_dir = plan.out / "align" / f"seed{s}"
            if not (align_dir / "align.json").is_file():
                log.info("== frame labels: forced alignment with %s", plan.warm_dir[s])
                env = os.environ | {"OMP_NUM_THREADS": str(plan.runner.parallel)}
                subprocess.run([sys.executable, "-m", "asrbench.cli", "align", f"run={plan.warm_dir[s]}",
                                f"hydra.run.dir={align_dir}"], check=True, env=env, stdout=subprocess.DEVNULL)
            plan.start[s].append(f"data.alignments={align_dir}")
    return results


def lr_search_step(plan: Plan) -> dict[str, Any]:
    """Step 3: the control's learning rate at each N (e.g. base, base sqrt(N), base N, with warm-up), on
    dev; the strategies of lr_search.inherit take the control's winner at the same N (plan.lr_winners).
    A candidate that diverged is not eligible; every candidate at one N diverged stops the invocation.
    Returns lr_search.json's content ({} without a search)."""
    lr_cfg, control = plan.rc.get("lr_search"), plan.control
    lr_search: dict[str, Any] = {}
    if lr_cfg and lr_cfg.get("reuse"):
        lr_search = load_lr_search(to_absolute(lr_cfg.reuse))
        plan.lr_winners = {int(n): list(v["winner_overrides"]) for n, v in lr_search.get("nodes", {}).items()}
        use_base_lr(plan, list((lr_search.get("base") or {}).get("winner_overrides") or []))
    elif lr_cfg:
        seed_s = plan.search_seed()
        shared = [str(o) for o in lr_cfg.get("overrides") or []]
        t_lr = time.perf_counter()
        base = base_lr_search(plan, lr_cfg, shared, seed_s)
        cands = [[str(o) for o in c] for c in lr_cfg.candidates]
        lr_jobs = {int(n): [Job(f"lr search {control} x{n} #{i}: {' '.join(c)}",
                                [*plan.common, f"strategy={control}", f"nodes={n}", f"seed={seed_s}", *plan.search_rest,
                                 *plan.start[seed_s], *plan.fixed.get(control, []), *shared, *c,
                                 *plan.job_type("lr_search")],
                                plan.out / "lr_search" / f"{control}_n{n}_{i}") for i, c in enumerate(cands)]
                   for n in plan.rc.nodes}
        candidates = [j for js in lr_jobs.values() for j in js]
        done = plan.runner.run(candidates + plan.baselines, may_fail={j.name for j in candidates})
        lr_search = {"strategy": control, "seed": seed_s, "inherit": list(lr_cfg.get("inherit") or []),
                     "inherit_group": list(lr_cfg.get("inherit_group") or []), "nodes": {}}
        if base:
            lr_search["base"] = base
        judged = {n: judge_lr(plan, f"{control} x{n}", [[*shared, *c] for c in cands], js, done)
                  for n, js in lr_jobs.items()}
        select = lr_select(lr_cfg)
        lr_search["select"] = select
        if select == "one_rule":
            lr_search["one_rule"] = one_rule({n: rows for n, (rows, _) in judged.items()})
        for n, (rows, best) in judged.items():
            best = lr_search["one_rule"]["winner"] if select == "one_rule" else best
            plan.lr_winners[n] = rows[best]["overrides"]
            if plan.same_budget:
                plan.reused_paths[(control, n, seed_s)] = Path(rows[best]["run"])
            lr_search["nodes"][n] = {"candidates": rows, "winner": best, "winner_overrides": plan.lr_winners[n]}
        lr_search["wall_s"] = time.perf_counter() - t_lr
        every = lr_candidates(lr_search)
        lr_search["runs"] = len(every)
        lr_search["run_s"] = sum(c.get("wall_s") or 0.0 for c in every)
        runinfo.write_json_atomic(plan.out / "lr_search" / "lr_search.json", lr_search)
    plan.inherit_lr = {control, *(lr_search.get("inherit") or [])} if plan.lr_winners else set()
    plan.inherit_group = set(lr_search.get("inherit_group") or []) - plan.inherit_lr if plan.lr_winners else set()
    return lr_search


def lr_select(lr_cfg: Any) -> str:
    """reproduce.lr_search.select: each_n (each worker count's own best candidate) unless set."""
    return str((lr_cfg or {}).get("select") or "each_n")


def one_rule(rows_at: Mapping[int, Sequence[Mapping]]) -> dict[str, Any]:
    """lr_search.select=one_rule: the one candidate (scaling rule) every N takes, the lowest mean dev WER
    over the worker counts; a candidate that diverged at any N is not eligible. Each N's own pick rests on
    one dev set's noise (a 0.7-point margin picked no scaling at 8 workers between sqrt(N) at 4 and 16 in
    the 2026-12-07 default); the mean over the N tiers has a third of its variance."""
    count = len(next(iter(rows_at.values())))
    mean = [None if any(rows[i]["dev_wer"] is None for rows in rows_at.values())
            else sum(rows[i]["dev_wer"] for rows in rows_at.values()) / len(rows_at) for i in range(count)]
    best = pick_winner([{"dev_wer": m} for m in mean])
    if best is None:
        raise RunFailed("reproduce.lr_search.select=one_rule: no candidate finished at every worker count (each "
                        "diverged somewhere: lr_search.json lists where); give it smaller learning rates or more "
                        "warm-up, or select=each_n")
    return {"winner": best, "mean_dev_wer": mean}


def lr_candidates(lr_search: Mapping) -> list[dict]:
    """Every candidate of an lr search (lr_search.json's content): the baseline's first, then the control's."""
    searches = [*filter(None, [lr_search.get("base")]), *(lr_search.get("nodes") or {}).values()]
    return [c for v in searches for c in v["candidates"]]


def base_lr_search(plan: Plan, lr_cfg: Any, shared: Sequence[str], seed_s: int) -> dict[str, Any] | None:
    """Step 3a: the baseline's (one worker's) learning rate on dev, before the control's at each N
    (lr_search.base_candidates, each with lr_search.overrides' warm-up). The winner's optim.lr becomes every
    later run's (the control's candidates scale it by N; BMUF's workers step at it); the baseline also keeps
    the warm-up it won with. None without base candidates."""
    cands = [[str(o) for o in c] for c in lr_cfg.get("base_candidates") or []]
    if not cands:
        return None
    jobs = [Job(f"lr search {strategies.BASELINE} x1 #{i}: {' '.join(c)}",
                [*plan.common, *SINGLE, f"seed={seed_s}", *plan.search_rest, *plan.start[seed_s], *shared, *c,
                 *plan.job_type("lr_search")], plan.out / "lr_search" / f"{strategies.BASELINE}_{i}")
            for i, c in enumerate(cands)]
    done = plan.runner.run(jobs, may_fail={j.name for j in jobs})
    rows, best = judge_lr(plan, f"the {strategies.BASELINE} baseline", [[*shared, *c] for c in cands], jobs, done)
    if plan.same_budget:
        plan.reused_paths[(strategies.BASELINE, 1, seed_s)] = Path(rows[best]["run"])
    use_base_lr(plan, rows[best]["overrides"])
    return {"candidates": rows, "winner": best, "winner_overrides": rows[best]["overrides"]}


def judge_lr(plan: Plan, what: str, overrides: Sequence[Sequence[str]], jobs: Sequence[Job],
             done: Mapping[str, dict]) -> tuple[list[dict], int]:
    """One lr search's candidates as lr_search.json keeps them, and the winner's index; every candidate
    diverged stops the invocation in one line."""
    rows = [candidate_row(j, o, done.get(j.name), plan.runner.failed.get(j.name)) for o, j in zip(overrides, jobs)]
    for row in rows:
        row.pop("density")
    best = pick_winner(rows)
    if best is None:
        raise no_winner(f"learning-rate search of {what}", rows)
    return rows, best


def use_base_lr(plan: Plan, winner: Sequence[str]) -> None:
    """The baseline's searched lr: every later run's optim.lr, and the baseline's whole winner (warm-up too)."""
    if not winner:
        return
    plan.base_lr = list(winner)
    plan.common += [o for o in winner if _key(o) == "optim.lr"]
    plan.set_baselines()


def knob_search_step(plan: Plan) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Step 4: the knob search at one worker count and seed, on dev; winners kept for every N. Strategies
    that inherit a knob from another's winner are searched after it. Returns search.json's content ({}
    without a search) and each strategy's winning overrides."""
    search_cfg = plan.rc.get("search")
    winners: dict[str, list[str]] = {s: [] for s in plan.rc.strategies}
    if not search_cfg:
        return {}, winners
    if search_cfg.get("reuse"):
        search = load_search(to_absolute(search_cfg.reuse))
        winners |= {s: list(v["winner_overrides"]) for s, v in search["strategies"].items() if s in winners}
        return search, winners
    n_s, seed_s = int(search_cfg.nodes), plan.search_seed()
    grid = {s: [list(c) for c in search_cfg.grid.get(s, []) or []] for s in plan.rc.strategies}
    inherit = {s: dict(v) for s, v in (search_cfg.get("inherit") or {}).items()}
    search: dict[str, Any] = {"nodes": n_s, "seed": seed_s, "strategies": {}}
    t_search = time.perf_counter()
    tuned = [s for s in plan.rc.strategies if s != plan.control or grid.get(s)]  # the control: by lr_search
    phases = [[s for s in tuned if s not in inherit], [s for s in tuned if s in inherit]]
    for k, phase in enumerate(phases):
        jobs, cands, jobs_of = [], {}, {}
        for s in phase:
            inherited = [o for src, keys in inherit.get(s, {}).items() for o in winners.get(src, [])
                         if _key(o) in set(keys)]
            cands[s] = [inherited + c for c in grid[s]] or [inherited]
            jobs_of[s] = [Job(f"search {s} x{n_s} #{i}: {' '.join(cand) or 'defaults'}",
                              [*plan.common, f"strategy={s}", f"nodes={n_s}", f"seed={seed_s}", *plan.search_rest,
                               *plan.start[seed_s], *plan.fixed[s], *plan.lr_at(s, n_s), *cand,
                               *plan.job_type("search")],
                              plan.out / "search" / f"{s}_{i}") for i, cand in enumerate(cands[s])]
            jobs += jobs_of[s]
        done = plan.runner.run(jobs + (plan.baselines if k == 0 else []), may_fail={j.name for j in jobs})
        for s in phase:
            search["strategies"][s] = judge_candidates(plan, s, n_s, cands[s], jobs_of[s], done,
                                                     search_cfg.get("max_density"))
            winners[s] = search["strategies"][s]["winner_overrides"]
            if plan.same_budget:
                best = search["strategies"][s]["winner"]
                plan.reused_paths[(s, n_s, seed_s)] = Path(search["strategies"][s]["candidates"][best]["run"])
    search["wall_s"] = time.perf_counter() - t_search  # of this invocation: reused runs cost nothing
    search["runs"] = sum(len(v["candidates"]) for v in search["strategies"].values())
    search["run_s"] = sum(c.get("wall_s") or 0.0 for v in search["strategies"].values() for c in v["candidates"])
    runinfo.write_json_atomic(plan.out / "search" / "search.json", search)
    return search, winners


def judge_candidates(plan: Plan, strategy: str, nodes: int, cands: Sequence[Sequence[str]], jobs: Sequence[Job],
                     done: Mapping[str, dict], cap: Any) -> dict[str, Any]:
    """One strategy's knob-search entry: its candidates (a diverged one, or one over the density cap, not
    eligible, with the reason) and the winner; every candidate diverged stops the invocation."""
    rows = [candidate_row(j, cand, done.get(j.name), plan.runner.failed.get(j.name)) for cand, j in zip(cands, jobs)]
    for row in rows:
        row.pop("lr")
    best = pick_winner(rows, None if cap is None else float(cap))
    if best is None:
        raise no_winner(f"knob search of {strategy} x{nodes}", rows)
    for row in rows:
        row["over_density_cap"] = cap is not None and (row["density"] or 0.0) > float(cap)
        if row["over_density_cap"]:
            row["eligible"], row["reason"] = False, f"sends more than max_density={float(cap):g}"
    return {"candidates": rows, "winner": best, "winner_overrides": rows[best]["overrides"], "max_density": cap}


def grid_jobs(plan: Plan, winners: Mapping[str, list[str]]) -> list[Job]:
    """Step 5: every strategy x workers x seed, continuing from its seed's warm start (a search winner's
    run stands in for its grid run when the search trained as long)."""
    jobs = []
    for seed in plan.seeds:
        for s in plan.rc.strategies:
            for n in plan.rc.nodes:
                path = plan.reused_paths.get((s, int(n), seed), plan.out / f"seed{seed}" / run_name(s, int(n)))
                jobs.append(Job(f"seed{seed} {s} x{n}", [*plan.common, f"strategy={s}", f"nodes={n}", f"seed={seed}",
                                                         *plan.rest, *plan.start[seed], *plan.fixed[s],
                                                         *plan.lr_at(s, n), *winners[s], *plan.job_type("grid")], path))
    return jobs


def score_runs(plan: Plan, done: Mapping[str, dict], jobs: Sequence[Job],
               warm_results: Mapping[str, dict]) -> tuple[dict[int, list[dict]], list]:
    """Step 6: per run, the relative changes against its seed's baseline, the plateau test of its dev
    curve, its peak lr, its change from the warm start and its time to target; and every run's history."""
    rc = plan.rc
    points, tolerance = int(rc.get("plateau_points", 6)), float(rc.get("plateau_tolerance", 0.02))
    within = float(rc.get("target_within", 0.05))
    rows_by_seed: dict[int, list[dict]] = {}
    histories = []
    for seed in plan.seeds:
        base_job = next(j for j in plan.baselines if j.name == f"seed{seed} single")
        base = done[base_job.name]
        rows = []
        for job in [base_job, *(j for j in jobs if j.name.startswith(f"seed{seed} "))]:
            res = report.with_relative(done[job.name], base)
            history = report.read_history(job.path)
            res |= {"plateau": stats.plateau(report.dev_curve(history), points, tolerance),
                    "dev_wer": res["eval"]["dev"]["wer"], "run_dir": str(job.path),
                    "lr": peak_lr(res.get("config") or {})}
            if warm_results.get(f"seed{seed} warm start"):
                w = warm_results[f"seed{seed} warm start"]
                res["from_warm_start"] = {sp: res["eval"][sp]["wer"] - w["eval"][sp]["wer"]
                                          for sp in res["eval"] if sp in w.get("eval", {})}
            report.add_time_to_target(res, history, base, within)
            rows.append(res)
            histories.append((res, history))
        rows_by_seed[seed] = rows
    return rows_by_seed, histories


def run_reproduce(cfg: Any, out: Path, conf_dir: str | Path) -> dict:
    """The whole experiment, step by step; returns reproduce.json's content, from which report.md is written."""
    t0 = time.perf_counter()
    earlier = earlier_invocations(out)
    plan = make_plan(cfg, out, conf_dir)
    rc = plan.rc
    warm_results = train_warm_starts(plan)  # 1. and 2.
    plan.fixed = {s: list(rc.strategy_overrides.get(s, []) or []) for s in rc.strategies}
    plan.set_baselines()
    lr_search = lr_search_step(plan)  # 3.
    search, winners = knob_search_step(plan)  # 4.
    # (without a search of its own, the baselines run beside the grid below, not one by one before it)
    jobs = grid_jobs(plan, winners)  # 5.
    done = plan.runner.run(jobs + plan.baselines)
    rows_by_seed, histories = score_runs(plan, done, jobs, warm_results)  # 6.
    # 7. the paired statistics over seeds (asrbench.analysis) on the scored split and the others
    seeds = plan.seeds
    split = str(rc.get("score_split") or next(iter(rows_by_seed[seeds[0]][0]["eval"].keys() - {"dev"})))
    splits = [split, *(s for s in rows_by_seed[seeds[0]][0]["eval"] if s not in (split, "dev"))]
    nodes = [int(n) for n in rc.nodes]
    evidence = {sp: analysis.analyse(rows_by_seed, sp, nodes, list(rc.strategies),
                                     claim_metric=str(rc.get("claim_metric", "wer")),
                                     resamples=int(rc.get("bootstrap_resamples", 1000)),
                                     mde_target=float(rc.get("mde_target", 0.02)), control=plan.control,
                                     warm_starts={s: plan.warm_dir[s] for s in seeds} if plan.warm else None)
                for sp in splits}
    # what this experiment trained: the warm starts, the grid, and the search runs (when it searched
    # itself rather than reusing another's) that the grid did not take over
    grid_paths = {j.path for j in [*jobs, *plan.baselines]}
    search_cfg, lr_cfg = rc.get("search"), rc.get("lr_search")
    searched = [c for v in search.get("strategies", {}).values() for c in v["candidates"]
                if search_cfg and not search_cfg.get("reuse") and Path(c["run"]) not in grid_paths]
    searched += [c for c in lr_candidates(lr_search)
                 if lr_cfg and not lr_cfg.get("reuse") and Path(c["run"]) not in grid_paths]
    every = [*warm_results.values(), *(done[j.name] for j in [*jobs, *plan.baselines])]
    wall = time.perf_counter() - t0
    return {"runs": len(every) + len(searched),
            "run_s": sum(r.get("wall_s") or 0.0 for r in every) + sum(c.get("wall_s") or 0.0 for c in searched),
            "seeds": seeds, "nodes": nodes, "rows_by_seed": rows_by_seed, "cells": analysis.cell_means(rows_by_seed),
            "split": split, "evidence": evidence, "claims": evidence[split]["claims"], "search": search,
            "winners": winners, "lr_search": lr_search, "lr_winners": plan.lr_winners, "control": plan.control,
            "histories": histories,
            "first_seed_rows": [r for r in rows_by_seed[seeds[0]] if r["strategy"] != strategies.BASELINE],
            "warm_starts": {s: {k: r.get(k) for k in ("steps", "wer", "eval", "wall_s")} for s, r in
                            zip(seeds, [warm_results.get(f"seed{s} warm start") or {} for s in seeds])},
            "baseline": rows_by_seed[seeds[0]][0], "wall_s": wall, "fer": plan.fer,
            "invocations": [*earlier, {"wall_s": wall, "trained": len(plan.runner.trained),
                                       "git_commit": runinfo.git_commit()}],
            "target_within": float(rc.get("target_within", 0.05))}


def to_absolute(path: Any) -> Path:
    return Path(to_absolute_path(str(path)))


def _density(res: Mapping) -> float | None:
    sent, total = res.get("elements_sent_per_step"), res.get("elements_total_per_step")
    return sent / total if sent is not None and total else None
