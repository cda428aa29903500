# Sourced by every recipe: run_stage, the numbered-stage runner (icefall style). Expects $stage,
# $stop_stage and $exp; a finished stage leaves $exp/.stageN.done and is skipped on a re-run.
run_stage() {  # run_stage N description command...
  local n=$1 what=$2; shift 2
  if [ "$n" -lt "$stage" ] || [ "$n" -gt "$stop_stage" ]; then return; fi
  if [ -f "$exp/.stage$n.done" ]; then echo "== stage $n ($what): done before, skipped"; return; fi
  echo "== stage $n: $what"
  "$@"
  touch "$exp/.stage$n.done"
}
