# Shared settings for the tpu_scripts; override any of them in the environment.
#   source tpu_scripts/env.sh   (the other scripts do this themselves)
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${ZONE:=us-west4-a}"                      # v5e: us-west4-a, us-east5-b; v5p: us-east5-a
: "${TPU_NAME:=nested-jax}"
: "${ACCELERATOR:=v5litepod-16}"             # v5e 16 chips / 4 hosts; v5p: v5p-32 (16 chips)
: "${RUNTIME:=v2-alpha-tpuv5-lite}"          # v5e; v5p: v2-alpha-tpuv5; v6e: v2-alpha-tpuv6e
: "${NUM_SLICES:=1}"                         # >1: multislice through queued resources
: "${SPOT:=0}"                               # 1: Spot capacity (preemptible: SIGTERM -> checkpoint)
: "${BUCKET:?set BUCKET=gs://your-bucket (checkpoints, logs and metrics go there)}"

# Nodes to address: one TPU VM, or the slices of a multislice queued resource.
tpu_nodes() {
  if [ "${NUM_SLICES}" -gt 1 ]; then
    for i in $(seq 0 $((NUM_SLICES - 1))); do echo "${TPU_NAME}-${i}"; done
  else
    echo "${TPU_NAME}"
  fi
}

# Run a shell command on every worker of every node.
on_all_workers() {
  for node in $(tpu_nodes); do
    gcloud compute tpus tpu-vm ssh "${node}" --project="${PROJECT}" --zone="${ZONE}" \
      --worker=all --command="$1" &
  done
  wait
}
