#!/usr/bin/env bash
# Install this checkout of nested_jax (with jax[tpu]) on every worker of every node.
#   BUCKET=gs://my-bucket tpu_scripts/install.sh
set -euo pipefail
source "$(dirname "$0")/env.sh"
root="$(cd "$(dirname "$0")/.." && pwd)"
rm -rf "${root}/dist"
python -m pip wheel --no-deps "${root}" -w "${root}/dist"
wheel="$(ls "${root}"/dist/nested_jax-*.whl)"
for node in $(tpu_nodes); do
  gcloud compute tpus tpu-vm scp "${wheel}" "${node}:~/" --project="${PROJECT}" \
    --zone="${ZONE}" --worker=all &
done
wait
# gcsfs lets etils.epath read and write gs:// paths (config, metrics, tokenizer files).
on_all_workers "python3 -m pip install -q --upgrade pip && \
  python3 -m pip install -q \"\$(ls ~/nested_jax-*.whl)[tpu,sentencepiece]\" gcsfs google-cloud-storage && \
  python3 -c 'import jax; print(jax.process_index(), jax.device_count())'"
