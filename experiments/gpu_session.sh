#!/usr/bin/env bash
# One prepared GPU session (lead only): kernel correctness + timings, then memory-engine timings.
# Usage on the device machine, from the repo root:  OUT=/tmp/out bash experiments/gpu_session.sh
export PYTHONPATH=.
python -c "import jax; print('jax', jax.__version__, jax.devices())"
GPU_CHECK_BUDGET_S=${KERNEL_BUDGET_S:-170} timeout $(( ${KERNEL_BUDGET_S:-170} + 40 )) \
  python experiments/gpu_check.py 2>&1 | tail -70
timeout ${MEMORY_BUDGET_S:-100} python experiments/bench_memory.py --shapes big \
  --levels "linear DGD+mom" --repeats 3 --out "$OUT/bench_memory_gpu.md" 2>&1 | tail -12
