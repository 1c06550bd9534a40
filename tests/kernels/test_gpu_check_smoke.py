"""The one-shot GPU script runs end to end on CPU (``--smoke``: interpret mode, tiny shapes).

A GPU session gets one try at ``experiments/gpu_check.py``; a script error found there wastes
device time.  This runs every row of it here and fails on any row that errors.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_row(tmp_path):
    # Budgets far above the smoke's needs: a row skipped for time here would hide its errors.
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               GPU_CHECK_BUDGET_S="3000", GPU_MODELS_BUDGET_S="3000")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "experiments/gpu_check.py", "--smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "correctness: ALL PASS" in out, out[-3000:]
    rows = [line for line in out.splitlines() if line.startswith("| (")]
    assert rows, out[-3000:]
    bad = [line for line in rows if "error" in line or "skipped" in line]
    assert not bad, "\n".join(bad)
    assert (tmp_path / "bench_kernels_gpu.md").exists()
    models = (tmp_path / "bench_models_gpu.md").read_text()
    assert "error" not in models and "skipped" not in models, models
