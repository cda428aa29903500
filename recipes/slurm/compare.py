"""Whether runs of `asrbench train` trained the same thing: `compare.py REF RUN...` compares each RUN dir
with REF exactly, results.json's numbers (timings and paths aside; the counts, train_frames, comm_steps and
the bytes per step, included) and every tensor of checkpoints/last.ckpt, prints one line per RUN and exits
1 when any differs. recipes/slurm/check.sh uses it to hold srun and sbatch runs to the launcher's run, and a
requeued run to the uninterrupted one."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

# results.json keys that say when, where or how fast a run was, not what it trained
NOT_COMPARED = {"fit_wall_s", "train_time_s", "train_frames_per_s", "wall_s", "checkpoint", "config", "git_commit",
                "versions", "host"}


def flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def differences(ref: Path, run: Path) -> list[str]:
    """`key: ref -> run` for every compared number or tensor that is not bit-for-bit the same."""
    a, b = (json.loads((p / "results.json").read_text()) for p in (ref, run))
    fa, fb = (flatten({k: v for k, v in r.items() if k not in NOT_COMPARED}) for r in (a, b))
    out = [f"{k}: {fa.get(k)} -> {fb.get(k)}" for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)]
    pa, pb = (torch.load(p / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
              for p in (ref, run))
    for k in sorted(pa.keys() | pb.keys()):
        if k not in pa or k not in pb or not torch.equal(pa[k], pb[k]):
            diff = (pa[k] - pb[k]).abs().max().item() if k in pa and k in pb and pa[k].shape == pb[k].shape else "?"
            out.append(f"parameter {k}: max |difference| {diff}")
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: compare.py REF_RUN_DIR RUN_DIR...", file=sys.stderr)
        return 2
    ref, failed = Path(argv[0]), 0
    for run in map(Path, argv[1:]):
        diffs = differences(ref, run)
        summary = json.loads((run / "results.json").read_text())
        what = f"steps {summary['steps']}, dev loss {summary['eval']['dev'].get('loss')}, WER {summary['wer']}"
        if diffs:
            failed += 1
            print(f"DIFFERENT {run} vs {ref} ({what}): {'; '.join(diffs[:6])}{' ...' if len(diffs) > 6 else ''}")
        else:
            print(f"same      {run} = {ref} ({what}; every parameter bit-for-bit)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
