#!/usr/bin/env bash
# The demo recipe on the embedded synthetic corpus, in numbered stages (icefall style):
#   0  generate the corpus with eSpeak NG and cache its features
#   1  train the single-worker baseline (CTC)
#   2  forced-align every subset with the baseline (frame labels for FER)
#   3  train GTC-BMUF with $NODES worker processes
#   4  evaluate both against the alignment and print the table with relative WER/FER
# Each finished stage leaves $EXP/.stageN.done; re-running skips it. Usage:
#   recipes/synth/run.sh [--stage N] [--stop-stage M] [--exp DIR] [--nodes N] [--minutes M]
#                        [--parallel-minutes M] [extra train overrides...]
# --minutes is the baseline's training budget, --parallel-minutes GTC-BMUF's (wall clock).
set -euo pipefail
cd "$(dirname "$0")/../.."

stage=0; stop_stage=4; exp=outputs/demo; nodes=4; minutes=8; pminutes=3
data=${DATA:-synth}; model=${MODEL:-lstm_small}; logger=${LOGGER:-wandb}
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage=$2; shift 2;;
    --stop-stage) stop_stage=$2; shift 2;;
    --exp) exp=$2; shift 2;;
    --nodes) nodes=$2; shift 2;;
    --minutes) minutes=$2; shift 2;;
    --parallel-minutes) pminutes=$2; shift 2;;
    *) extra+=("$1"); shift;;
  esac
done
mkdir -p "$exp"
# Batches of 8: on 2 CPU cores the LSTM trains as many frames/s at 8 utterances as at 16 or 32, so
# small batches buy twice the updates in the same 8 minutes (dev WER 0.56 against 0.60 at 16).
common=(data=$data model=$model logger=$logger experiment=demo trainer.max_epochs=1000 bucket_by_length=true
        batch_size=8 optim.lr=0.002 optim.lr_decay_per_epoch=0.8)

. recipes/stages.sh  # run_stage

run_stage 0 "corpus + features" asrbench prepare data=$data hydra.run.dir=$exp/prepare
run_stage 1 "single-worker baseline" asrbench train "${common[@]}" strategy=single nodes=1 \
  "trainer.max_time=$(printf '00:00:%02d:00' "$minutes")" \
  hydra.run.dir=$exp/single "${extra[@]}"
run_stage 2 "forced alignment" asrbench align run=$exp/single hydra.run.dir=$exp/align
run_stage 3 "gtc_bmuf x$nodes" asrbench train "${common[@]}" strategy=gtc_bmuf nodes=$nodes \
  strategy.group_size=2 strategy.block_size=8 "trainer.max_time=$(printf '00:00:%02d:00' "$pminutes")" \
  hydra.run.dir=$exp/gtc_bmuf "${extra[@]}"
run_stage 4 "evaluation" bash -c "
  asrbench eval run=$exp/single data.alignments=$exp/align hydra.run.dir=$exp/single/eval > /dev/null &&
  asrbench eval run=$exp/gtc_bmuf baseline=$exp/single/eval data.alignments=$exp/align hydra.run.dir=$exp/report"
