#!/usr/bin/env bash
# Install this checkout of nested_jax (with jax[tpu]) on every worker of every node, in a
# Python ${PYTHON_VERSION} venv at ${VENV}: TPU VM images ship an older system python3 (and
# newer ones refuse system-wide pip installs), while the project needs Python >= 3.11.  uv
# (itself a pip package) provides the interpreter whatever the image has.  Ends by checking
# that every worker sees the slice's chips (jax.device_count()).
#   BUCKET=gs://my-bucket tpu_scripts/install.sh
#   WHEEL=dist/nested_jax-0.1.0-py3-none-any.whl tpu_scripts/install.sh   # a wheel built before
set -euo pipefail
source "$(dirname "$0")/env.sh"
root="$(cd "$(dirname "$0")/.." && pwd)"
chips="$(chips_per_slice)"
wheel="${WHEEL:-}"
if [ -z "${wheel}" ]; then
  rm -rf "${root}/dist"
  python3 -m pip wheel --no-deps "${root}" -w "${root}/dist"
  wheel="$(ls "${root}"/dist/nested_jax-*.whl)"
fi
for node in $(tpu_nodes); do
  gcloud compute tpus tpu-vm scp "${wheel}" "${node}:~/" --project="${PROJECT}" \
    --zone="${ZONE}" --worker=all &
done
wait
# pip --user for uv: --break-system-packages on images with an externally managed Python,
# plain --user on older pips that do not know the flag.
# gcsfs lets etils.epath read and write gs:// paths (config, metrics, tokenizer files).
on_all_workers "set -e
  python3 -m pip install -q --user --break-system-packages uv 2>/dev/null || \
    python3 -m pip install -q --user uv
  uv=\$HOME/.local/bin/uv
  \$uv python install ${PYTHON_VERSION}
  \$uv venv --allow-existing --python ${PYTHON_VERSION} ${VENV}
  \$uv pip install -q --python ${VENV}/bin/python \
    \"\$(ls ~/nested_jax-*.whl)[tpu,sentencepiece]\" gcsfs google-cloud-storage
  ${VENV}/bin/python - <<'PY'
import jax
n = jax.device_count()
print(f'worker {jax.process_index()}: {n} devices, expected ${chips}')
raise SystemExit(0 if n == ${chips} else f'jax.device_count() = {n}, expected ${chips} chips')
PY"
echo "installed on $(tpu_nodes | tr '\n' ' ')(${chips} chips per slice, venv ${VENV})"
