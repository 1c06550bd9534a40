"""Exact resume: SIGKILL mid-run, SIGTERM (preemption), and a corrupt latest checkpoint.

Each run is a real `nested-jax train` subprocess on one CPU device. The learning-rate
schedule is constant so a long run (to be killed) and a short reference run share
every step; the resumed loss curve must equal the uninterrupted one bitwise.
"""

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.subprocess_env import cpu_env

from .conftest import write_corpus

REF_STEPS = 40


def _args(data, workdir, steps):
    return [sys.executable, "-m", "nested_jax.cli", "train", "--workdir", str(workdir),
            "--data", str(data), "--steps", str(steps), "--preset", "tiny", "--seq-len", "32",
            "--batch-size", "4", "--no-progress",
            "--set", "log_every=1", "--set", "checkpoint_every=4", "--set", "eval_every=0",
            "--set", "eval_batches=1", "--set", "optim.schedule=constant",
            "--set", "optim.warmup_steps=0", "--set", "optim.learning_rate=3e-3"]


def _train(data, workdir, steps):
    out = subprocess.run(_args(data, workdir, steps), env=cpu_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


def _losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    losses = {}
    for rec in map(json.loads, lines):
        if "train/loss" in rec:
            assert rec["step"] not in losses, f"step {rec['step']} logged twice"
            losses[rec["step"]] = rec["train/loss"]
    return losses


def _stop(proc) -> str:
    """Kill a run and return its stderr; every wait is bounded, so a stuck run fails the test
    instead of hanging the session."""
    proc.kill()
    return proc.communicate(timeout=60)[1][-3000:]


def _communicate(proc, timeout=120):
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the run did not exit within {timeout} s:\n{_stop(proc)}") from None


def _wait_until(proc, ready, limit=240):
    """Poll `ready()` while the run lives; a run that exits or outlives `limit` is an error."""
    deadline = time.time() + limit
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"the run {'exited' if proc.poll() is not None else 'timed out'}"
                                 f" before it was ready:\n{_stop(proc)}")
        time.sleep(0.01)


def _start_and_wait(data, workdir, min_step):
    """Launch a long run; return the process once it has logged `min_step`."""
    proc = subprocess.Popen(_args(data, workdir, 100_000), env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_until(proc, lambda: (workdir / "metrics.jsonl").exists()
                and len(_losses_safe(workdir)) >= min_step)
    return proc


def _losses_safe(workdir):
    try:
        return _losses(workdir)
    except (json.JSONDecodeError, AssertionError):
        return {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = write_corpus(root / "data")
    _train(data, root / "ref", REF_STEPS)
    losses = _losses(root / "ref")
    assert sorted(losses) == list(range(1, REF_STEPS + 1))
    return data, losses, root


def test_sigkill_then_restart_gives_the_same_loss_curve(reference):
    data, want, root = reference
    workdir = root / "killed"
    proc = _start_and_wait(data, workdir, min_step=9)
    proc.send_signal(signal.SIGKILL)
    _communicate(proc, 60)
    killed_at = max(_losses_safe(workdir))
    assert killed_at < REF_STEPS
    log = _train(data, workdir, REF_STEPS)
    assert "resumed from the checkpoint at step" in log
    assert _losses(workdir) == want


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(reference):
    data, want, root = reference
    workdir = root / "preempted"
    proc = _start_and_wait(data, workdir, min_step=6)
    proc.send_signal(signal.SIGTERM)
    out, err = _communicate(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM at step" in out
    stopped = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert (workdir / "checkpoints" / str(stopped)).is_dir()
    assert stopped < REF_STEPS
    log = _train(data, workdir, REF_STEPS)
    assert f"resumed from the checkpoint at step {stopped}" in log
    assert _losses(workdir) == want


def test_corrupt_latest_checkpoint_falls_back_and_stays_exact(reference):
    data, want, root = reference
    workdir = root / "corrupt"
    _train(data, workdir, 12)  # checkpoints at 4, 8, 12
    for f in (workdir / "checkpoints" / "12" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"not a checkpoint")
    log = _train(data, workdir, REF_STEPS)
    assert "step 12 could not be read" in log and "falling back" in log
    assert "resumed from the checkpoint at step 8" in log
    assert _losses(workdir) == want


def test_sigint_saves_like_sigterm_and_quiet_shows_no_info(tmp_path):
    """Ctrl-C checkpoints and exits 130 (no traceback); -q keeps INFO off the console."""
    data = write_corpus(tmp_path / "data")
    workdir = tmp_path / "run"
    args = _args(data, workdir, 100_000)
    args.insert(args.index("train"), "-q")
    proc = subprocess.Popen(args, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_until(proc, lambda: (workdir / "metrics.jsonl").exists()
                and len(_losses_safe(workdir)) >= 3)
    proc.send_signal(signal.SIGINT)
    out, err = _communicate(proc)
    assert proc.returncode == 130, err[-3000:]
    stopped = int(out.split("stopped by SIGINT at step ")[1].split(";")[0])
    assert "checkpoint saved" in out and (workdir / "checkpoints" / str(stopped)).is_dir()
    assert " INFO " not in err and "Traceback" not in err, err[-3000:]
    assert "resumed" not in err and "INFO" in (workdir / "train.log").read_text()


@pytest.mark.slow
def test_eval_and_generate_never_disturb_a_live_run(tmp_path):
    """The issue's case 2: eval/generate against a run saving every step, keeping one."""
    from nested_jax import cli

    data = write_corpus(tmp_path / "data")
    workdir = tmp_path / "run"
    args = _args(data, workdir, 100_000)
    args[args.index("checkpoint_every=4")] = "checkpoint_every=1"
    args += ["--set", "keep_checkpoints=1"]
    proc = subprocess.Popen(args, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_until(proc, lambda: bool(list((workdir / "checkpoints").glob("[0-9]*"))))
        for _ in range(4):
            assert cli.main(["eval", "--workdir", str(workdir), "--batches", "1"]) == 0
            assert cli.main(["generate", "--workdir", str(workdir), "--max-new-tokens", "4"]) == 0
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
    out, err = _communicate(proc)
    assert proc.returncode == 0, err[-3000:]
    assert not (workdir / "checkpoints.corrupt").exists()


def test_packed_documents_resume_bitwise(tmp_path):
    """data.pack_documents (Titans: documents at multiples of its chunk, 8): a run resumed
    from a checkpoint, the data iterator's state included, continues the uninterrupted loss
    curve bit for bit."""
    data = write_corpus(tmp_path / "data")
    workdir = tmp_path / "packed"
    packed = ["--model", "titans", "--set", "data.pack_documents=true"]
    _run = lambda: subprocess.run(_args(data, workdir, 8) + packed, env=cpu_env(),
                                  capture_output=True, text=True, timeout=300)
    out = _run()  # checkpoints at 4 and 8
    assert out.returncode == 0, out.stderr[-3000:]
    want = _losses(workdir)
    assert sorted(want) == list(range(1, 9)) and all(math.isfinite(v) for v in want.values())
    shutil.rmtree(workdir / "checkpoints" / "8")  # as if killed after saving step 4
    out = _run()
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from the checkpoint at step 4" in out.stderr
    assert _losses(workdir) == want
