#!/usr/bin/env bash
# Why GTC-BMUF trails at 16 workers (docs/results.md): short controlled runs from reproduce=cpu's seed-0
# warm start, each one knob away from the report's GTC-BMUF x16 run (tau 0.016, K 8, zeta 1, groups of 4,
# optim.lr_scaling=sqrt_group: peak lr 0.002 after a 100-step warm-up). Every run trains $steps steps of
# 16 simulated workers (304 = the report's first dev point) and is scored on dev only.
#   recipes/investigate/gtc_bmuf_16.sh WARM_START_DIR DATA_ROOT OUT_DIR [steps] [variant ...]
# A variant whose results.json exists is skipped; `summary` prints dev WER and the train-loss peak of each.
# With ASRBENCH="python recipes/investigate/block_probe.py" each BMUF run also writes <variant>.blocks.jsonl,
# and <variant>_reset runs <variant> with the GTC residuals zeroed at every block end.
set -euo pipefail
warm=$1 data_root=$2 out=$3 steps=${4:-304}
shift $(( $# < 4 ? $# : 4 ))
mkdir -p "$out"
asrbench=${ASRBENCH:-asrbench}
common=(data=synth_requests_shared "data.root=$data_root" model=lstm_cpu batch_size=1 optim.lr=0.001
        optim.lr_decay_per_epoch=0.35 optim.lr_decay_interval=step trainer.val_check_interval=0.25
        logger=csv trainer.enable_progress_bar=false cluster=simulated cluster.network=paper
        data.phone_labels=true "data.test_subsets=[]" nodes=16 seed=0 trainer.max_epochs=2
        "trainer.max_steps=$steps" "init_from=$warm")
hybrid=(strategy=gtc_bmuf optim.warmup_steps=100 optim.lr_scaling=sqrt_group strategy.tau=0.016
        strategy.block_size=8 strategy.block_lr=1.0 strategy.group_size=4)

variant() {  # variant NAME -> the overrides of that run
  case $1 in
    hybrid)         echo "${hybrid[@]}" ;;                                  # the report's run
    hybrid_dense)   echo "${hybrid[@]} strategy.pass_through=true" ;;       # dense all-reduce inside groups
    hybrid_lr1)     echo "${hybrid[@]} optim.lr_scaling=none" ;;            # peak lr 0.001, BMUF's
    hybrid_eta0)    echo "${hybrid[@]} strategy.block_momentum=0" ;;        # plain model averaging
    hybrid_cbm)     echo "${hybrid[@]} strategy.nesterov=false" ;;          # classical block momentum
    hybrid_zeta05)  echo "${hybrid[@]} strategy.block_lr=0.5" ;;            # the preset's zeta
    hybrid_g16)     echo "${hybrid[@]} strategy.group_size=16" ;;           # one group: GTC (eta 0, zeta 1)
    hybrid_tau004)  echo "${hybrid[@]} strategy.tau=0.004" ;;               # GTC's other candidate: ~4x denser
    hybrid_nowarm)  echo "${hybrid[@]} optim.warmup_steps=0" ;;             # no lr warm-up, as BMUF's run
    bmuf)           echo "strategy=bmuf strategy.block_size=8 strategy.block_lr=1.0" ;;  # the report's run
    bmuf_eta75)     echo "strategy=bmuf strategy.block_size=8 strategy.block_lr=1.0 strategy.block_momentum=0.75" ;;
    gtc)            echo "strategy=gtc optim.warmup_steps=100 optim.lr_scaling=sqrt strategy.tau=0.016" ;;
    *) echo "unknown variant $1" >&2; return 1 ;;
  esac
}

summary() {
  for d in "$out"/*/; do
    [ -f "$d/results.json" ] || continue
    python - "$d" <<'EOF'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
loss = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
dev = [(r["step"], r["val/wer"]) for r in rows if "val/wer" in r]
dens = [r["comm/density"] for r in rows if "comm/density" in r]
peak = max(loss, key=lambda x: x[1])
print(f"{d.name:16s} dev WER {dev[-1][1]:.3f} at step {dev[-1][0]}; train loss first {loss[0][1]:.2f}, "
      f"peak {peak[1]:.2f} at {peak[0]}, last {loss[-1][1]:.2f}; mean density "
      f"{sum(dens) / len(dens) if dens else 0:.4f}")
EOF
  done
}

if [ "${1:-}" = summary ]; then summary; exit 0; fi
for name in "$@"; do
  dir=$out/$name
  if [ -f "$dir/results.json" ]; then echo "== $name: done before, skipped"; continue; fi
  base=${name%_reset} reset=0
  [ "$base" != "$name" ] && reset=1  # <variant>_reset: the probe zeroes the GTC residuals at each block end
  echo "== $name: $(variant "$base")"
  # shellcheck disable=SC2046
  BLOCK_PROBE=$out/$name.blocks.jsonl BLOCK_PROBE_RESET_RESIDUALS=$reset \
    $asrbench train "${common[@]}" $(variant "$base") "hydra.run.dir=$dir" > "$out/$name.log" 2>&1
done
summary
