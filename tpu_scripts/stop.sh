#!/usr/bin/env bash
# Stop the run on every worker of every node: SIGTERM, so each host saves a checkpoint at the
# same step before exiting (the trainer's preemption path); relaunching with the same RUN
# resumes.  FORCE=1 sends SIGKILL instead (no save; the last committed checkpoint is kept).
#   BUCKET=gs://my-bucket tpu_scripts/stop.sh
set -euo pipefail
source "$(dirname "$0")/env.sh"
signal=TERM
[ "${FORCE:-0}" = 1 ] && signal=KILL
on_all_workers "pkill -${signal} -f 'nested_jax.cli train' || true
  for i in \$(seq 60); do pgrep -f 'nested_jax.cli train' >/dev/null || exit 0; sleep 5; done
  echo 'still running after 300 s; FORCE=1 tpu_scripts/stop.sh kills it' >&2; exit 1"
echo "stopped on $(tpu_nodes | tr '\n' ' ')"
