#!/usr/bin/env bash
# Delete the TPU VM (or the multislice queued resource). Checkpoints stay in ${BUCKET}.
#   BUCKET=gs://my-bucket tpu_scripts/teardown.sh
set -euo pipefail
source "$(dirname "$0")/env.sh"
if [ "${NUM_SLICES}" -gt 1 ]; then
  gcloud compute tpus queued-resources delete "${TPU_NAME}" --project="${PROJECT}" \
    --zone="${ZONE}" --force --quiet
else
  gcloud compute tpus tpu-vm delete "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" --quiet
fi
