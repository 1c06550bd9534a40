"""tpu_scripts dry-run against a stub ``gcloud`` on PATH that records every call.

The stub answers ``describe`` with the next line of a scripted state file, so the scripts'
control flow (a failed queued resource, a preempted Spot slice, a finished run) is exercised
without a cloud project.  The flags used are the current gcloud reference's:
``tpus tpu-vm create --accelerator-type --version [--spot]``, ``tpus queued-resources create
--accelerator-type --runtime-version --node-count --node-prefix [--spot]``, ``ssh/scp
--worker=all``.
"""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tpu_scripts"

STUB = r"""#!/usr/bin/env bash
# Record the call; answer describes from $STUB_DIR/states, worker-0 status from $STUB_DIR/exit.
printf '%s\036' "$*" >> "$STUB_DIR/calls"  # record separator: commands span lines
case "$*" in
  "config get-value project") echo stub-project ;;
  *" describe "*|*"tpu-vm describe"*|*"queued-resources describe"*)
    if [[ "$*" == *"buckets describe"* ]]; then exit 0; fi
    state="$(head -n 1 "$STUB_DIR/states")"
    # the last state repeats once the script runs out
    [ "$(wc -l < "$STUB_DIR/states")" -gt 1 ] && sed -i 1d "$STUB_DIR/states"
    [ "$state" = MISSING ] && exit 1
    echo "$state" ;;
  *"--worker=0"*) cat "$STUB_DIR/exit" ;;
esac
exit 0
"""


@pytest.fixture
def stub(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(STUB)
    (bin_dir / "gcloud").chmod(0o755)
    (tmp_path / "calls").write_text("")
    (tmp_path / "exit").write_text("running\n")
    wheel = tmp_path / "nested_jax-0.0.0-py3-none-any.whl"
    wheel.write_text("")

    def run(script, *args, states=("READY",), timeout=60, **env):
        (tmp_path / "states").write_text("\n".join(states) + "\n")
        full = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_DIR=str(tmp_path),
                    BUCKET="gs://stub-bucket", WHEEL=str(wheel), POLL_SECONDS="0", **env)
        proc = subprocess.run(["bash", str(SCRIPTS / script), *args], env=full,
                              capture_output=True, text=True, timeout=timeout)
        calls = (tmp_path / "calls").read_text().split("\x1e")[:-1]
        return proc, calls

    run.dir = tmp_path
    return run


def test_install_makes_a_py311_venv_and_checks_the_chip_count(stub):
    proc, calls = stub("install.sh", ACCELERATOR="v5p-64")
    assert proc.returncode == 0, proc.stderr
    scp = [c for c in calls if "tpu-vm scp" in c]
    ssh = [c for c in calls if "tpu-vm ssh" in c]
    assert scp and all("--worker=all" in c for c in scp + ssh)
    cmd = ssh[0]
    assert "uv python install 3.11" in cmd and "venv --allow-existing --python 3.11" in cmd
    assert "$HOME/nested-jax-venv/bin/python" in cmd  # expanded on the worker, not here
    assert "python3 -m pip install" not in cmd.split("uv")[-1]  # jax goes into the venv
    assert "expected 32" in cmd  # v5p-64 counts TensorCores: 32 chips


def test_unknown_accelerator_fails_before_any_gcloud_call(stub):
    proc, calls = stub("install.sh", ACCELERATOR="tpu9-8")
    assert proc.returncode != 0
    assert "unknown ACCELERATOR=tpu9-8" in proc.stderr
    assert not [c for c in calls if "tpus" in c]


def test_create_stops_on_a_failed_queued_resource(stub):
    proc, calls = stub("create.sh", states=("WAITING_FOR_RESOURCES", "FAILED"), NUM_SLICES="2",
                       timeout=120)
    assert proc.returncode == 1
    assert "is FAILED" in proc.stderr and "teardown.sh" in proc.stderr
    create = [c for c in calls if "queued-resources create" in c][0]
    for flag in ("--accelerator-type=", "--runtime-version=", "--node-count=2", "--node-prefix="):
        assert flag in create


def test_launch_runs_the_venv_python_on_every_worker_and_records_the_exit(stub):
    proc, calls = stub("launch.sh", "--steps", "10", "--set", "optim.lr=1e-3", RUN="r1")
    assert proc.returncode == 0, proc.stderr
    cmd = [c for c in calls if "tpu-vm ssh" in c][0]
    assert "--worker=all" in cmd
    assert "$HOME/nested-jax-venv/bin/python" in cmd and "-m nested_jax.cli train" in cmd
    assert "--workdir gs://stub-bucket/runs/r1" in cmd and "--steps 10" in cmd
    assert "echo $? > ~/logs/r1.exit" in cmd


def test_stop_sends_sigterm_so_every_host_saves(stub):
    proc, calls = stub("stop.sh")
    assert proc.returncode == 0, proc.stderr
    cmd = [c for c in calls if "tpu-vm ssh" in c][0]
    assert "pkill -TERM -f 'nested_jax.cli train'" in cmd and "--worker=all" in cmd


def test_spot_loop_recreates_a_preempted_slice_and_ends_when_train_exits_0(stub):
    (stub.dir / "exit").write_text("0\n")
    # missing at start -> create; the first poll finds it preempted -> delete and recreate;
    # the next poll finds it READY with train's exit status 0
    states = ("MISSING", "PREEMPTED", "PREEMPTED", "READY")
    proc, calls = stub("spot_loop.sh", "--steps", "5", states=states, RUN="r2", SPOT="1",
                       timeout=120)
    assert proc.returncode == 0, proc.stderr
    creates = [c for c in calls if "tpu-vm create" in c]
    assert len(creates) == 2 and all("--spot" in c for c in creates)
    assert sum("tpu-vm delete" in c for c in calls) == 2
    assert sum("-m nested_jax.cli train" in c for c in calls) == 2  # launched, relaunched
    assert "finished" in proc.stdout


def test_spot_loop_stops_on_a_failing_run_instead_of_relaunching(stub):
    (stub.dir / "exit").write_text("2\n")
    proc, calls = stub("spot_loop.sh", states=("READY",), RUN="r3")
    assert proc.returncode == 1
    assert "exited with status 2" in proc.stderr
    assert sum("-m nested_jax.cli train" in c for c in calls) == 1
