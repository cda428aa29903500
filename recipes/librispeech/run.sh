#!/usr/bin/env bash
# The paper's comparison on your LibriSpeech copy, on a GPU cluster, in numbered stages:
#   0  scan the corpus and cache its features (one process; every rank reuses the cache)
#   1  train the single-GPU baseline (lstm_paper)
#   2  train every strategy at every worker count, one torch.distributed job each
#   3  evaluate every run against the baseline: report.md per run, and a summary table
# Each finished stage leaves $EXP/.stageN.done; re-running skips it. Usage:
#   recipes/librispeech/run.sh --root /data/LibriSpeech [--launcher slurm|torchrun|local]
#       [--gpus-per-machine 8] [--workers "32 64 128"] [--strategies "gtc bmuf gtc_bmuf"]
#       [--stage N] [--stop-stage M] [--exp DIR] [extra overrides...]
# Extra overrides come last in every stage, so the user's word wins over the recipe's defaults;
# stage 0 takes those of data.* and features.*. `data=kaldi` or `data=lhotse` (with --root at the
# data dirs or manifests) runs the same stages on a corpus in those forms (see README).
# launcher=slurm runs each job with srun inside your allocation (salloc/sbatch); torchrun needs
# HEAD=<host:port of the rendezvous> and is started on every machine by you (MACHINE_RANK set);
# local runs nodes processes on this machine: on its GPUs when CUDA is visible, else on CPU (gloo).
set -euo pipefail
cd "$(dirname "$0")/../.."

root=""; data=librispeech; launcher=slurm; gpm=8; workers="32 64 128"; strategies="gtc bmuf gtc_bmuf"
stage=0; stop_stage=3; exp=outputs/librispeech
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=$2; shift 2;;
    --launcher) launcher=$2; shift 2;;
    --gpus-per-machine) gpm=$2; shift 2;;
    --workers) workers=$2; shift 2;;
    --strategies) strategies=$2; shift 2;;
    --stage) stage=$2; shift 2;;
    --stop-stage) stop_stage=$2; shift 2;;
    --exp) exp=$2; shift 2;;
    data=*) data=${1#data=}; shift;;  # the config group goes first; its keys may follow
    *) extra+=("$1"); shift;;
  esac
done
if [ -z "$root" ]; then echo "error: --root /path/to/LibriSpeech is required" >&2; exit 2; fi
mkdir -p "$exp"
asrbench=.venv/bin/asrbench
python=.venv/bin/python
data_args=("data=$data" "data.root=$root")
common=("${data_args[@]}" model=lstm_paper logger=wandb experiment=librispeech
        batch_size=16 trainer.max_epochs=8 checkpoint_every_n_steps=1000)
prepare_extra=()  # prepare has no model or trainer: it takes the data and feature overrides
for o in "${extra[@]}"; do
  case "$o" in data.*|features=*|features.*|+data.*|++data.*|+features.*|++features.*) prepare_extra+=("$o");; esac
done
case "$launcher" in local) accel=accelerator=auto;; *) accel=accelerator=gpu;; esac
# The same knobs as conf/reproduce/paper.yaml
declare -A knobs=([gtc]="optim.lr_scaling=sqrt optim.warmup_steps=500" [bmuf]="strategy.block_size=16"
                  [gtc_bmuf]="strategy.block_size=16 strategy.group_size=$gpm")

. recipes/stages.sh  # run_stage

distributed() {  # distributed NODES overrides...: one training job of NODES workers
  local nodes=$1; shift
  local machines=$(( (nodes + gpm - 1) / gpm )); local per=$(( nodes < gpm ? nodes : gpm ))
  case "$launcher" in
    slurm) srun --nodes "$machines" --ntasks-per-node "$per" --gpus-per-node "$per" \
             "$asrbench" train "${common[@]}" nodes="$nodes" num_machines="$machines" "$accel" "$@" "${extra[@]}";;
    torchrun) torchrun --nnodes "$machines" --nproc-per-node "$per" --node-rank "${MACHINE_RANK:?set MACHINE_RANK}" \
             --rdzv-backend c10d --rdzv-endpoint "${HEAD:?set HEAD=host:port}" \
             "$asrbench" train "${common[@]}" nodes="$nodes" num_machines="$machines" "$accel" "$@" "${extra[@]}";;
    local) "$asrbench" train "${common[@]}" nodes="$nodes" "$accel" "$@" "${extra[@]}";;
    *) echo "error: --launcher must be slurm, torchrun or local (got $launcher)" >&2; exit 2;;
  esac
}

stage2() {
  local s n
  for s in $strategies; do
    for n in $workers; do
      local dir="$exp/${s}_n$n"
      if [ -f "$dir/results.json" ]; then echo "$dir: finished before"; continue; fi
      # a run that stopped (fault, Ctrl-C, time limit) continues from its newest checkpoint
      local resume=(); ck=$(ls -t "$dir"/checkpoints/*.ckpt 2>/dev/null | head -1 || true)
      [ -n "$ck" ] && resume=("resume=$ck")
      # shellcheck disable=SC2086
      distributed "$n" strategy="$s" ${knobs[$s]} "hydra.run.dir=$dir" "${resume[@]}"
    done
  done
}

stage3() {
  local s n
  for s in $strategies; do
    for n in $workers; do
      "$asrbench" eval "run=$exp/${s}_n$n" "baseline=$exp/single"
    done
  done
  "$python" - "$exp" <<'PY'
import json, sys
from pathlib import Path
from asrbench import report
exp = Path(sys.argv[1])
base = report.load_results(exp / "single")
rows = [report.with_relative(base, base)]
rows += [report.with_relative(report.load_results(p.parent), base)
         for p in sorted(exp.glob("*_n*/eval/results.json"))]
print(report.markdown_table(rows))
PY
}

run_stage 0 "features" "$asrbench" prepare "${data_args[@]}" "${prepare_extra[@]}"
run_stage 1 "single-GPU baseline" "$asrbench" train "${common[@]}" strategy=single "$accel" \
  "hydra.run.dir=$exp/single" "${extra[@]}"
run_stage 2 "strategies x workers" stage2
run_stage 3 "evaluation" stage3
