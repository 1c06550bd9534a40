#!/usr/bin/env bash
# Launch `nested-jax train` on all workers (--worker=all) of every node; logs and
# checkpoints go to ${BUCKET}/runs/${RUN}. Arguments are passed to `nested-jax train`.
#   BUCKET=gs://b RUN=hope-760m tpu_scripts/launch.sh --config lm:760M --model hope \
#       --data /mnt/data/train.array_record-* --steps 60000
# Re-running the same command resumes from the latest checkpoint (e.g. after preemption).
# jax.distributed.initialize() finds the coordinator on TPU pods and multislice by itself.
set -euo pipefail
source "$(dirname "$0")/env.sh"
: "${RUN:?set RUN=<name> (the run directory under ${BUCKET}/runs/)}"
workdir="${BUCKET}/runs/${RUN}"
args=$(printf ' %q' "$@")
# The exit status lands in ~/logs/${RUN}.exit once train ends (spot_loop.sh reads it: 0 is
# done, anything else a failure to report rather than relaunch).
on_all_workers "mkdir -p ~/logs && rm -f ~/logs/${RUN}.exit && nohup sh -c '${VENV}/bin/python \
  -m nested_jax.cli train --workdir ${workdir} --no-progress --distributed on ${args} \
  > ~/logs/${RUN}.log 2>&1; echo \$? > ~/logs/${RUN}.exit' > /dev/null 2>&1 &
  sleep 5; tail -n 5 ~/logs/${RUN}.log"
echo "launched ${RUN} on $(tpu_nodes | tr '\n' ' '); follow it with:"
echo "  gcloud compute tpus tpu-vm ssh $(tpu_nodes | head -1) --zone=${ZONE} --worker=0 \\"
echo "    --command='tail -f ~/logs/${RUN}.log'"
echo "  tensorboard --logdir ${workdir}/tensorboard"
