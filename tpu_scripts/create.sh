#!/usr/bin/env bash
# Create a TPU VM / pod slice, or NUM_SLICES slices for multislice training.
#   BUCKET=gs://my-bucket tpu_scripts/create.sh
#   BUCKET=gs://b ACCELERATOR=v5p-32 RUNTIME=v2-alpha-tpuv5 ZONE=us-east5-a tpu_scripts/create.sh
#   BUCKET=gs://b NUM_SLICES=2 tpu_scripts/create.sh      # multislice (queued resource)
set -euo pipefail
source "$(dirname "$0")/env.sh"
spot=()
[ "${SPOT}" = 1 ] && spot=(--spot)

if [ "${NUM_SLICES}" -gt 1 ]; then
  gcloud compute tpus queued-resources create "${TPU_NAME}" --project="${PROJECT}" \
    --zone="${ZONE}" --accelerator-type="${ACCELERATOR}" --runtime-version="${RUNTIME}" \
    --node-count="${NUM_SLICES}" --node-prefix="${TPU_NAME}" "${spot[@]}"
  echo "waiting for the queued resource ${TPU_NAME} to become ACTIVE ..."
  while :; do
    state="$(gcloud compute tpus queued-resources describe "${TPU_NAME}" --project="${PROJECT}" \
             --zone="${ZONE}" --format='value(state.state)')"
    case "${state}" in
      ACTIVE) break ;;
      FAILED|SUSPENDED|SUSPENDING)  # never turns ACTIVE by itself: stop instead of waiting forever
        echo "queued resource ${TPU_NAME} is ${state}; see: gcloud compute tpus queued-resources" \
             "describe ${TPU_NAME} --zone=${ZONE}; delete it with tpu_scripts/teardown.sh and" \
             "retry (another ZONE or SPOT=1 if capacity is short)" >&2
        exit 1 ;;
    esac
    sleep "${POLL_SECONDS:-30}"
  done
else
  gcloud compute tpus tpu-vm create "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" \
    --accelerator-type="${ACCELERATOR}" --version="${RUNTIME}" "${spot[@]}"
fi
gcloud storage buckets describe "${BUCKET}" >/dev/null 2>&1 || \
  gcloud storage buckets create "${BUCKET}" --project="${PROJECT}" --location="${ZONE%-*}"
echo "created: $(tpu_nodes | tr '\n' ' ')"
