"""Soak test: run `asrbench train ...` and record the resident memory of every process of the run.

    python -m asrbench.soak --out DIR [--interval S] [--warmup S] -- <asrbench train overrides>

Samples each process of the run's tree (rank 0 and the worker processes it starts) every
`interval` seconds into DIR/soak.jsonl and writes DIR/soak.json: RSS per process at the first
sample after `warmup` (when data and model are loaded) and at the last, the growth between them,
and the run's exit status. A run that holds steady memory shows growth near zero; a leak grows
with the steps. Use trainer.max_time=00:00:30:00 for a 30-minute soak.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def tree(root: int) -> list[int]:
    """`root` and its descendants (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parents.get(pid, [])
    return sorted(out)


def rss_bytes(pid: int) -> int | None:
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None
    return rss or None  # an exited, not yet reaped process (zombie) has no pages


def summarize(samples: list[dict], warmup_s: float) -> dict:
    """Per process: RSS at the first sample after the warm-up and at the last one, and the growth."""
    settled = [s for s in samples if s["t"] >= warmup_s] or samples[-1:]
    if not settled:
        return {"processes": {}, "total_start": 0, "total_end": 0, "growth": 0.0}
    # the start: the first sample after the warm-up in which every worker process runs
    most = max(len(s["rss"]) for s in settled)
    first = next(s for s in settled if len(s["rss"]) == most)
    # the end: the last sample where every process of the start sample still runs (training, not
    # the evaluation after the worker processes have exited)
    last = next((s for s in reversed(settled)
                 if first["rss"].keys() <= {p for p, r in s["rss"].items() if r}), first)
    procs = {}
    for pid, start in first["rss"].items():
        end = last["rss"].get(pid)
        if end is not None:
            procs[pid] = {"start": start, "end": end, "growth": (end - start) / start if start else 0.0}
    t_start, t_end = sum(p["start"] for p in procs.values()), sum(p["end"] for p in procs.values())
    return {"processes": procs, "t_start": first["t"], "t_end": last["t"], "total_start": t_start,
            "total_end": t_end, "growth": (t_end - t_start) / t_start if t_start else 0.0,
            "max_process_growth": max((p["growth"] for p in procs.values()), default=0.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asrbench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for soak.jsonl and soak.json")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=120.0, help="seconds before the start sample")
    parser.add_argument("overrides", nargs="*", help="asrbench train overrides (after --)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "asrbench.cli", "train", *args.overrides]
    if not any(o.startswith("hydra.run.dir=") for o in args.overrides):
        cmd.append(f"hydra.run.dir={args.out / 'run'}")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd)
    samples = []
    with open(args.out / "soak.jsonl", "w") as log:
        while True:
            done = proc.poll() is not None
            sample = {"t": round(time.monotonic() - t0, 1),
                      "rss": {str(p): r for p in tree(proc.pid) if (r := rss_bytes(p)) is not None}}
            if sample["rss"]:
                samples.append(sample)
                log.write(json.dumps(sample) + "\n")
                log.flush()
            if done:
                break
            deadline = time.monotonic() + args.interval
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.2)
    summary = summarize(samples, args.warmup) | {"returncode": proc.returncode, "wall_s": time.monotonic() - t0,
                                                 "samples": len(samples), "command": cmd}
    (args.out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    mib = 2**20
    print(f"soak: {len(summary['processes'])} processes, RSS {summary['total_start'] / mib:.0f} MiB at "
          f"{summary.get('t_start', 0):.0f} s -> {summary['total_end'] / mib:.0f} MiB at {summary.get('t_end', 0):.0f} s "
          f"({summary['growth'] * 100:+.1f}%; largest per process {summary.get('max_process_growth', 0) * 100:+.1f}%), "
          f"exit {proc.returncode}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
