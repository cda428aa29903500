#!/usr/bin/env bash
# A real SLURM check (docs/slurm.md): the same tiny training run started four ways must train the same
# model, bit for bit, and a requeued job must finish where the uninterrupted run does.
#   0  a SLURM that answers (recipes/slurm/setup_local.sh makes one on this machine) and the tiny corpus
#   1  per strategy (sync, gtc_bmuf, topk) at nodes=$NODES: (a) Lightning's own launcher, (a') torchrun
#      --standalone, (b) srun --ntasks-per-node=$NODES, (c) sbatch of the same srun; (b) and (c) keep
#      the default hydra.run.dir, which must be one dir per job (outputs/train/slurm<job id>_...);
#      results.json's numbers and every parameter of last.ckpt are compared with (a) by compare.py
#   2  srun -n $NODES (no --ntasks-per-node) stops before training with one line naming the fix
#   3  an sbatch --requeue job of recipes/slurm/requeue.sbatch (srun ... resume=auto), stopped mid-run twice:
#      (USR1) `scancel --signal=USR1`: the run saves interrupted.ckpt and exits 138, the script requeues the
#      job; (TERM) plain `scancel`, what preemption sends: interrupted.ckpt, exit 143, the job CANCELLED,
#      then `scontrol requeue` (what PreemptMode=REQUEUE does). Each requeued start continues with
#      resume=auto in the same run dir and must end as the uninterrupted run does, train_frames, comm_steps
#      and the bytes per step included (checkpoints carry the run's counts: asrbench.checkpoint.RunCounts)
# Each check prints PASS or FAIL with its reason; the script exits 1 when any failed. Runs go to $EXP.
# Usage: recipes/slurm/check.sh   (env: EXP=outputs/slurm_check NODES=2 STEPS=12 PYTHON=.venv/bin/python
#        STAGES="1 2 3": the checks to run; 0 always runs)
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
exp=${EXP:-outputs/slurm_check}; nodes=${NODES:-2}; steps=${STEPS:-12}
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo "$root/.venv/bin/python" || command -v python3 )}
asrbench=("$python" -m asrbench.cli)  # this checkout's asrbench, whatever `asrbench` on PATH is
export WANDB_MODE=offline OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
unset ASRBENCH_COMMAND
mkdir -p "$exp"; exp=$(cd "$exp" && pwd)
failed=0
pass() { echo "PASS  $*"; }
fail() { echo "FAIL  $*"; failed=$((failed + 1)); }
stage() { [[ " ${STAGES:-1 2 3} " == *" $1 "* ]]; }

# ---------------------------------------------------------------- 0
if ! sinfo -h >/dev/null 2>&1; then
  echo "error: no SLURM answers here (sinfo failed); start one with recipes/slurm/setup_local.sh" >&2
  exit 2
fi
echo "== 0: SLURM $(sinfo -V | cut -d' ' -f2), node $(sinfo -h -o '%n %t %c CPUs' | head -1); commit $(git rev-parse --short HEAD)"
"${asrbench[@]}" prepare data=synth_tiny data.root="$exp/corpus" hydra.run.dir="$exp/prepare" >"$exp/prepare.log" 2>&1 \
  || { echo "error: asrbench prepare failed, see $exp/prepare.log" >&2; exit 2; }

common=(data=synth_tiny data.root="$exp/corpus" model=lstm_tiny batch_size=2 eval_batch_size=16 logger=csv
        accelerator=cpu nodes="$nodes" trainer.max_epochs=1000 trainer.enable_progress_bar=false
        trainer.log_every_n_steps=1 collective_timeout_s=120)
declare -A knobs=(
  [sync]="strategy=sync"
  [gtc_bmuf]="strategy=gtc_bmuf strategy.group_size=$((nodes / 2)) strategy.block_size=4"  # BMUF over 2 groups
  [topk]="strategy=topk"
)

result_dir() {  # result_dir LOG: the run dir rank 0 printed ("results: DIR/results.json")
  sed -n 's/^results: \(.*\)\/results\.json$/\1/p' "$1" | tail -1
}

job_dir() {  # job_dir JOB STRATEGY LOG: the one default run dir of a job; fails (with why) otherwise
  local dirs
  dirs=$(ls -d "$root"/outputs/train/slurm"$1"_* 2>/dev/null | wc -l)
  local dir; dir=$(result_dir "$3")
  if [ "$dirs" != 1 ] || [ "$dir" != "$root/outputs/train/slurm$1_$2_n$nodes" ]; then
    echo "job $1 wrote $dirs run dirs (${dir:-no results}), not one outputs/train/slurm$1_$2_n$nodes" >&2
    return 1
  fi
  echo "$dir"
}

# ---------------------------------------------------------------- 1
stage 1 && for s in sync gtc_bmuf topk; do
  echo "== 1: $s, nodes=$nodes, $steps steps"
  # shellcheck disable=SC2086  # knobs are words
  args=("${common[@]}" ${knobs[$s]} trainer.max_steps="$steps")
  rm -rf "$exp/launcher_$s" "$exp/torchrun_$s" "$exp/srun_$s" "$exp/sbatch_$s"
  "${asrbench[@]}" train "${args[@]}" hydra.run.dir="$exp/launcher_$s" >"$exp/launcher_$s.log" 2>&1 \
    || { fail "$s (a) launcher: exit $?, see $exp/launcher_$s.log"; continue; }
  runs=()
  if "$python" -m torch.distributed.run --standalone --nproc-per-node "$nodes" -m asrbench.cli train "${args[@]}" \
       hydra.run.dir="$exp/torchrun_$s" >"$exp/torchrun_$s.log" 2>&1; then runs+=("$exp/torchrun_$s")
  else fail "$s (a') torchrun: exit $?, see $exp/torchrun_$s.log"; fi

  srun --ntasks-per-node="$nodes" "${asrbench[@]}" train "${args[@]}" >"$exp/srun_$s.log" 2>&1
  rc=$?
  dir=$(result_dir "$exp/srun_$s.log"); job=${dir##*/slurm}; job=${job%%_*}
  if [ $rc = 0 ] && [ -n "$dir" ] && dir=$(job_dir "$job" "$s" "$exp/srun_$s.log"); then
    mv "$dir" "$exp/srun_$s"; runs+=("$exp/srun_$s")
  else fail "$s (b) srun: exit $rc, run dir '${dir:-none}', see $exp/srun_$s.log"; fi

  job=$(sbatch --parsable --wait --ntasks-per-node="$nodes" -o "$exp/sbatch_$s.log" \
        --wrap "srun $(printf '%q ' "${asrbench[@]}" train "${args[@]}")")
  rc=$?
  if [ $rc = 0 ] && dir=$(job_dir "$job" "$s" "$exp/sbatch_$s.log"); then
    mv "$dir" "$exp/sbatch_$s"; runs+=("$exp/sbatch_$s")
  else fail "$s (c) sbatch job ${job:-?}: exit $rc, see $exp/sbatch_$s.log"; fi

  [ ${#runs[@]} -gt 0 ] || continue
  while read -r line; do
    case "$line" in same*) pass "$s: $line";; *) fail "$s: $line";; esac
  done < <("$python" recipes/slurm/compare.py "$exp/launcher_$s" "${runs[@]}" 2>&1)
done

# ---------------------------------------------------------------- 2
if stage 2; then
  echo "== 2: srun -n $nodes without --ntasks-per-node"
  srun -n "$nodes" "${asrbench[@]}" train "${common[@]}" strategy=sync trainer.max_steps=1 >"$exp/srun_n.log" 2>&1
  rc=$?; lines=$(grep -c '^error: srun -n' "$exp/srun_n.log")
  if [ $rc != 0 ] && [ "$lines" = "$nodes" ] && ! grep -q Traceback "$exp/srun_n.log"; then
    pass "srun -n $nodes stops before training, each task: $(grep -m1 '^error:' "$exp/srun_n.log")"
  else fail "srun -n $nodes: exit $rc, $lines 'error: srun -n' lines, see $exp/srun_n.log"; fi
fi

# ---------------------------------------------------------------- 3
requeue_check() {  # requeue_check SIGNAL TAG WHAT: stop an sbatch --requeue job of recipes/slurm/requeue.sbatch mid-run
  local sig=$1 tag=$2 name=$3 job run code stopped at resumed signalled restarts ckpt line i
  local log=$exp/requeue_$tag.log
  rm -rf "$exp/requeued_$tag" "$log"
  job=$(sbatch --parsable --requeue --open-mode=append --ntasks-per-node="$nodes" -o "$log" \
        recipes/slurm/requeue.sbatch "${asrbench[@]}" train "${args[@]}")
  run=$root/outputs/train/slurm${job}_${s}_n$nodes
  state() { scontrol show job "$job" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }
  trained() { grep -c '"train/loss"' "$run/metrics.jsonl" 2>/dev/null || echo 0; }
  for _ in $(seq 1500); do
    [ "$(trained)" -ge "$stop_at" ] && break
    case "$(state)" in RUNNING|PENDING) ;; *) break;; esac
    sleep 0.2
  done
  signalled=$(trained)
  if [ "$sig" = TERM ]; then scancel "$job"; else scancel --signal="$sig" "$job"; fi
  # the job's first start ends: SIGUSR1 (138), the script requeues it; SIGTERM (plain scancel), CANCELLED, 143
  for _ in $(seq 300); do
    grep -q '^== srun exit' "$log" 2>/dev/null && break
    sleep 0.2
  done
  code=$(sed -n 's/^== srun exit \([0-9]*\).*/\1/p' "$log" | head -1)
  stopped=$(grep -m1 "stopped by SIG$sig after step" "$log")
  ckpt=$(ls "$run"/checkpoints/interrupted.ckpt 2>/dev/null)
  if [ "$sig" = TERM ]; then  # what preemption with PreemptMode=REQUEUE (or an operator) does next
    for _ in $(seq 100); do [ "$(state)" = CANCELLED ] && break; sleep 0.2; done
    scontrol requeue "$job"
  fi
  for i in $(seq 900); do  # a requeued job waits for its BeginTime (about 2 min); start it at once
    case "$(state)" in
      PENDING) scontrol update JobId="$job" StartTime=now 2>/dev/null;;
      COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|"") [ "$i" -gt 5 ] && break;;
    esac
    sleep 1
  done
  restarts=$(scontrol show job "$job" | grep -o 'Restarts=[0-9]*' | cut -d= -f2)
  # a fresh start would end the same: the requeued start must have continued from the stop's checkpoint
  at=$(sed -n 's/.*stopped by SIG[A-Z0-9]* after step \([0-9]*\):.*/\1/p' <<<"$stopped")
  resumed=$(grep -m1 "resume=auto: continuing from $run/checkpoints/interrupted.ckpt (step ${at:-?})" "$log")
  if [ "$code" = "$((128 + $(kill -l "$sig")))" ] && [ -n "$stopped" ] && [ -n "$ckpt" ] && [ -n "$resumed" ] \
     && [ "$(state)" = COMPLETED ] && [ "${restarts:-0}" -ge 1 ] && [ -f "$run/results.json" ]; then
    mv "$run" "$exp/requeued_$tag"
    line=$("$python" recipes/slurm/compare.py "$exp/uninterrupted" "$exp/requeued_$tag" 2>&1)
    case "$line" in
      same*) pass "requeue after $name: job $job signalled after step $signalled, exit $code, interrupted.ckpt at step $at, requeued $restarts time(s), continued from it with resume=auto: $line";;
      *) fail "requeue after $name: job $job stopped after step $at, resumed from interrupted.ckpt, but trained something else: $line";;
    esac
  else
    fail "requeue after $name: job $job $(state), first start's exit ${code:-?} (want $((128 + $(kill -l "$sig")))), stop line ${stopped:+found}${stopped:-missing}, interrupted.ckpt ${ckpt:-missing}, resumed from it: ${resumed:+yes}${resumed:-no}, restarts ${restarts:-0}, results.json $([ -f "$run/results.json" ] && echo written || echo missing); see $log"
  fi
}

if stage 3; then
  s=gtc_bmuf; long=$((steps * 3)); stop_at=$((steps + 2))
  echo "== 3: sbatch --requeue recipes/slurm/requeue.sbatch, $s, $long steps, stopped after step $stop_at by scancel --signal=USR1 and by plain scancel (SIGTERM)"
  # shellcheck disable=SC2086
  args=("${common[@]}" ${knobs[$s]} trainer.max_steps="$long" checkpoint_every_n_steps=4)
  rm -rf "$exp/uninterrupted"
  if "${asrbench[@]}" train "${args[@]}" hydra.run.dir="$exp/uninterrupted" >"$exp/uninterrupted.log" 2>&1; then
    requeue_check USR1 usr1 "scancel --signal=USR1"
    requeue_check TERM term "scancel (SIGTERM)"
  else fail "requeue: the uninterrupted run failed (exit $?), see $exp/uninterrupted.log"; fi
fi

echo "== $([ $failed = 0 ] && echo 'all checks passed' || echo "$failed check(s) failed") (runs in $exp)"
[ $failed = 0 ]
