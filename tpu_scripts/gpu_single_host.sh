#!/usr/bin/env bash
# Single-host multi-GPU: one process drives every local GPU (no jax.distributed needed),
# FSDP over all of them, bf16 compute (the lm:125M config). Arguments are appended, e.g.
#   tpu_scripts/gpu_single_host.sh --model hope --data /data/train.jsonl --workdir runs/hope-125m
# For the Transformer++ add --set model.attention_impl=cudnn (flash attention).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python -m pip install -q "${root}[cuda,sentencepiece]"
exec python -m nested_jax.cli train --config lm:125M --set mesh.data=1 --set mesh.fsdp=-1 "$@"
