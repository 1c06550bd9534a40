# Shared settings for the tpu_scripts; override any of them in the environment.
#   source tpu_scripts/env.sh   (the other scripts do this themselves)
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${ZONE:=us-west4-a}"                      # v5e: us-west4-a, us-east5-b; v5p: us-east5-a
: "${TPU_NAME:=nested-jax}"
: "${ACCELERATOR:=v5litepod-16}"             # v5e 16 chips / 4 hosts; v5p: v5p-32 (16 chips)
: "${RUNTIME:=v2-alpha-tpuv5-lite}"          # v5e; v5p: v2-alpha-tpuv5; v6e: v2-alpha-tpuv6e
: "${NUM_SLICES:=1}"                         # >1: multislice through queued resources
: "${SPOT:=0}"                               # 1: Spot capacity (preemptible: SIGTERM -> checkpoint)
: "${PYTHON_VERSION:=3.11}"                  # the workers' venv Python (the image's may be older)
# The literal $HOME is expanded by each worker's shell, not here.
: "${VENV:=\$HOME/nested-jax-venv}"
: "${BUCKET:?set BUCKET=gs://your-bucket (checkpoints, logs and metrics go there)}"

# Nodes to address: one TPU VM, or the slices of a multislice queued resource.
tpu_nodes() {
  if [ "${NUM_SLICES}" -gt 1 ]; then
    for i in $(seq 0 $((NUM_SLICES - 1))); do echo "${TPU_NAME}-${i}"; done
  else
    echo "${TPU_NAME}"
  fi
}

# Chips of one slice of ${ACCELERATOR}: v2-v4 and v5p names count TensorCores (2 per chip),
# v5e (v5litepod-N) and v6e names count chips.
chips_per_slice() {
  local kind="${ACCELERATOR%-*}" n="${ACCELERATOR##*-}"
  case "${kind}" in
    v2|v3|v4|v5p) echo $((n / 2)) ;;
    v5litepod|v5e|v6e) echo "${n}" ;;
    *) echo "unknown ACCELERATOR=${ACCELERATOR}: expected v4-N, v5p-N, v5litepod-N or v6e-N" >&2
       return 2 ;;
  esac
}

# Run a shell command on every worker of every node; fails if any worker fails.
on_all_workers() {
  local pids=() rc=0
  for node in $(tpu_nodes); do
    gcloud compute tpus tpu-vm ssh "${node}" --project="${PROJECT}" --zone="${ZONE}" \
      --worker=all --command="$1" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "${pid}" || rc=$?; done
  return "${rc}"
}

# Run a shell command on worker 0 of the first node (status checks).
on_worker0() {
  gcloud compute tpus tpu-vm ssh "$(tpu_nodes | head -1)" --project="${PROJECT}" \
    --zone="${ZONE}" --worker=0 --command="$1"
}
