# Sourced by every recipe: run_stage, the numbered-stage runner (icefall style). Expects $stage,
# $stop_stage and $exp; a finished stage leaves $exp/.stageN.done and is skipped on a re-run.
run_stage() {  # run_stage N description command...
  # the stage's own names: a command's loop over a global-looking `n` must not move the marker
  local _stage_n=$1 _stage_what=$2; shift 2
  if [ "$_stage_n" -lt "$stage" ] || [ "$_stage_n" -gt "$stop_stage" ]; then return; fi
  if [ -f "$exp/.stage$_stage_n.done" ]; then
    echo "== stage $_stage_n ($_stage_what): done before, skipped"; return
  fi
  echo "== stage $_stage_n: $_stage_what"
  "$@"
  touch "$exp/.stage$_stage_n.done"
}
