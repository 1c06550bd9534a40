#!/usr/bin/env bash
# Keep a Spot (preemptible) run going until it finishes: create the slice if missing, install,
# launch, then poll.  A preempted slice (node PREEMPTED / TERMINATED, or a queued resource
# SUSPENDED / FAILED) is deleted, recreated, reinstalled and relaunched with the same RUN,
# which resumes from the last committed checkpoint.  Ends when train exits 0 on worker 0, and
# stops (exit 1) when it exits non-zero on a healthy slice: a config or data error would fail
# again on every relaunch.
#   SPOT=1 BUCKET=gs://b RUN=hope-340m tpu_scripts/spot_loop.sh --config lm:340M --model hope \
#       --data gs://b/data/train.jsonl --steps 30000
set -euo pipefail
here="$(dirname "$0")"
source "${here}/env.sh"
: "${RUN:?set RUN=<name> (the run directory under ${BUCKET}/runs/)}"
: "${POLL_SECONDS:=120}"
: "${MAX_RELAUNCHES:=50}"

slice_state() {  # READY, GONE (missing or preempted) or WAIT (still provisioning)
  local s
  if [ "${NUM_SLICES}" -gt 1 ]; then
    s="$(gcloud compute tpus queued-resources describe "${TPU_NAME}" --project="${PROJECT}" \
           --zone="${ZONE}" --format='value(state.state)' 2>/dev/null || echo MISSING)"
    case "${s}" in ACTIVE) echo READY ;; MISSING|FAILED|SUSPENDED|SUSPENDING) echo GONE ;;
                   *) echo WAIT ;; esac
  else
    s="$(gcloud compute tpus tpu-vm describe "${TPU_NAME}" --project="${PROJECT}" \
           --zone="${ZONE}" --format='value(state)' 2>/dev/null || echo MISSING)"
    case "${s}" in READY) echo READY ;; MISSING|PREEMPTED|TERMINATED) echo GONE ;;
                   *) echo WAIT ;; esac
  fi
}

start() {
  if [ "$(slice_state)" = GONE ]; then
    "${here}/teardown.sh" 2>/dev/null || true  # a preempted node must be deleted first
    "${here}/create.sh"
  fi
  "${here}/install.sh"
  "${here}/launch.sh" "$@"
}

launches=0
start "$@"
while :; do
  sleep "${POLL_SECONDS}"
  case "$(slice_state)" in
    WAIT) continue ;;
    GONE)
      launches=$((launches + 1))
      if [ "${launches}" -gt "${MAX_RELAUNCHES}" ]; then
        echo "preempted ${launches} times; giving up (raise MAX_RELAUNCHES)" >&2; exit 1
      fi
      echo "$(date -u +%FT%TZ) slice gone (preempted?): relaunch ${launches}"
      start "$@"
      continue ;;
  esac
  # READY: an exit status means train ended; none means it still runs (or the VM restarted).
  status="$(on_worker0 "cat ~/logs/${RUN}.exit 2>/dev/null || \
    (pgrep -f 'nested_jax.cli train' >/dev/null && echo running) || echo none" || echo ssh-failed)"
  case "${status}" in
    running|ssh-failed) ;;
    0) echo "$(date -u +%FT%TZ) ${RUN} finished"; exit 0 ;;
    none) echo "$(date -u +%FT%TZ) ${RUN} not running and no exit status: relaunching"
          "${here}/launch.sh" "$@" ;;
    *) echo "${RUN} exited with status ${status} on a healthy slice; see ~/logs/${RUN}.log on" \
            "worker 0 (not relaunching: the same error would repeat)" >&2
       exit 1 ;;
  esac
done
