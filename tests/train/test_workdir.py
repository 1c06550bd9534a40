"""The working directory: lock, no silent restart, restores that keep every checkpoint,
the guard before the damage, --reschedule, exit codes and the failure line in train.log."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from nested_jax import cli

TINY = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "8", "--no-progress",
        "--set", "eval_batches=1", "--set", "log_every=1", "--set", "optim.warmup_steps=0",
        "--set", "optim.schedule=constant", "--set", "checkpoint_every=2"]


def _train(workdir, corpus, *extra):
    return cli.main(["train", "--workdir", str(workdir), "--data", str(corpus), *TINY, *extra])


def _snapshot(directory):
    return {str(f.relative_to(directory)): f.read_bytes() for f in sorted(directory.rglob("*"))
            if f.is_file()}


def _steps_logged(workdir):
    steps = [r["step"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text()
                                    .splitlines()) if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return steps


def _last_log_line(workdir):
    return (workdir / "train.log").read_text().splitlines()[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run (checkpoint at 2) to copy from."""
    from .conftest import write_corpus

    root = tmp_path_factory.mktemp("workdir")
    corpus = write_corpus(root / "data")
    assert _train(root / "run", corpus, "--steps", "2") == 0
    return root / "run", corpus


def _copy(src, dst):
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def test_other_preset_without_config_json_is_refused_and_moves_nothing(trained, tmp_path,
                                                                      caplog):
    """The issue's case 1: config.json gone, another model shape: before, all three
    checkpoints were moved into checkpoints.corrupt/ and config.json overwritten."""
    run, corpus = trained
    workdir = _copy(run, tmp_path / "copy")
    (workdir / "config.json").unlink()
    before = _snapshot(workdir / "checkpoints")
    assert _train(workdir, corpus, "--steps", "4", "--set", "model.n_layers=1") == 2
    assert re.search(r"checkpoint .*/checkpoints/2 belongs to another run:\n  model.n_layers: "
                     r"checkpoint \d+, this run 1", caplog.text), caplog.text
    assert _snapshot(workdir / "checkpoints") == before
    assert not (workdir / "checkpoints.corrupt").exists()
    assert not (workdir / "config.json").exists()
    assert "belongs to another run" in (workdir / "train.log").read_text()
    # the checkpoint's own config names a changed non-resumable field, too
    caplog.clear()
    assert _train(workdir, corpus, "--steps", "4", "--seed", "5") == 2
    assert "seed: saved 0, now 5" in caplog.text and "config.json is missing" in caplog.text
    # and the right config resumes it
    caplog.clear()
    assert _train(workdir, corpus, "--steps", "3") == 0
    assert "resumed from the checkpoint at step 2" in caplog.text
    assert (workdir / "config.json").exists() and _steps_logged(workdir) == [1, 2, 3]


def test_config_without_checkpoint_is_refused_unless_restart(trained, tmp_path, caplog):
    run, corpus = trained
    workdir = _copy(run, tmp_path / "copy")
    (workdir / "checkpoints").rename(tmp_path / "elsewhere")
    assert _train(workdir, corpus, "--steps", "3") == cli.EXIT_CONFIG
    assert "no checkpoint" in caplog.text and "--restart" in caplog.text
    assert _steps_logged(workdir) == [1, 2]
    assert _train(workdir, corpus, "--steps", "3", "--restart") == 0
    assert _steps_logged(workdir) == [1, 2, 3]  # started over, never twice


def test_guard_saves_nothing_inside_a_bad_streak_and_reschedule_recovers(trained, tmp_path,
                                                                         caplog):
    """The issue's case 5: a huge learning rate blew the parameters up at step 1 (finite
    gradients), and a checkpoint saved inside the streak held them."""
    run, corpus = trained
    workdir = _copy(run, tmp_path / "copy")
    good = _snapshot(workdir / "checkpoints" / "2")
    assert _train(workdir, corpus, "--steps", "3", "--lr", "10") == cli.EXIT_CONFIG
    assert "optim.learning_rate" in caplog.text and "--reschedule" in caplog.text
    caplog.clear()
    rc = _train(workdir, corpus, "--steps", "20", "--lr", "1e4", "--reschedule",
                "--set", "checkpoint_every=1", "--set", "max_bad_steps=3")
    assert rc == cli.EXIT_NUMERIC
    assert "update rejected (parameter norm x" in caplog.text
    assert "rejected the update in 3 consecutive steps" in caplog.text
    assert "newest: step 2" in caplog.text and "--reschedule" in caplog.text
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                  if p.name.isdigit()) == [2]
    assert _snapshot(workdir / "checkpoints" / "2") == good
    caplog.clear()
    assert _train(workdir, corpus, "--steps", "4", "--lr", "3e-3", "--reschedule") == 0
    assert "resumed from the checkpoint at step 2" in caplog.text
    assert _steps_logged(workdir) == [1, 2, 3, 4]


# ---- the lock ---------------------------------------------------------------------------------

HOLD = """
import sys, time
from etils import epath
from nested_jax.train.workdir import WorkdirLock
WorkdirLock(epath.Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_second_train_fails_at_once_naming_the_holder_and_a_stale_lock_is_taken_over(
        corpus, tmp_path, caplog):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _train(workdir, corpus, "--steps", "1") == cli.EXIT_BUSY
        want = (f"is in use by another training run (host {socket.gethostname()}, "
                f"PID {holder.pid}")
        assert want in caplog.text
        assert want in _last_log_line(workdir)
        # refused before any work: nothing written, nothing compiled or trained
        assert not (workdir / "config.json").exists()
        assert not (workdir / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    caplog.clear()
    assert _train(workdir, corpus, "--steps", "1") == 0  # the dead holder's lock is taken over
    assert f"took over the lock left by a run that is no longer running (host " \
           f"{socket.gethostname()}, PID {holder.pid})" in caplog.text


def test_eval_and_generate_read_the_model_and_leave_the_optimizer_state_on_disk(trained):
    """load_run (eval, generate) restores params and model state only, bit for bit what a
    full restore gives."""
    import jax
    import numpy as np

    from nested_jax.train import trainer
    from nested_jax.train.checkpoints import Checkpoints

    run, state, step = trainer.load_run(trained[0])
    assert step == 2 and set(state) == set(run.abstract_state) - {"opt_state"}
    ckpt = Checkpoints(trained[0] / "checkpoints", read_only=True)
    try:
        _, full = ckpt.restore(run.abstract_state)
    finally:
        ckpt.close()
    assert jax.tree.leaves(full["opt_state"])
    for part in ("params", "rest"):
        pairs = zip(jax.tree.leaves(state[part]), jax.tree.leaves(full[part]), strict=True)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs), part


# ---- a checkpoint that cannot be written --------------------------------------------------------


# The child: files may not grow past 128 KiB (a checkpoint's arrays are larger), and such a write
# fails with EFBIG instead of killing the process: a disk full for checkpoints, without mounting
# anything (and without preexec_fn, which forks a multithreaded JAX process).
NO_BIG_FILES = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (128 * 1024, 128 * 1024))
sys.argv[0] = "nested-jax"
runpy.run_module("nested_jax.cli", run_name="__main__")
"""


def test_a_checkpoint_write_that_fails_is_one_io_error_and_keeps_the_committed_steps(
        trained, tmp_path):
    workdir = _copy(trained[0], tmp_path / "run")
    good = _snapshot(workdir / "checkpoints" / "2")
    argv = [sys.executable, "-c", NO_BIG_FILES, "-q", "train", "--workdir", str(workdir),
            "--data", str(trained[1]), *TINY, "--steps", "4"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert out.returncode == cli.EXIT_IO, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"could not write a checkpoint under {workdir / 'checkpoints'}: File too large" \
        in lines[0]
    assert "the committed checkpoints (2) are intact" in lines[0]
    assert lines[0].split(" ERROR ")[1] in _last_log_line(workdir)
    assert _snapshot(workdir / "checkpoints" / "2") == good
    assert "Traceback" in (workdir / "train.log").read_text()  # orbax's report, kept in the log


# ---- early, clear failures --------------------------------------------------------------------


def test_workdir_that_is_a_file_is_an_io_error(corpus, tmp_path, caplog):
    path = tmp_path / "file"
    path.write_text("x")
    assert _train(path, corpus, "--steps", "1") == cli.EXIT_IO
    assert f"--workdir {path} exists and is not a directory" in caplog.text


def test_eval_and_generate_on_a_missing_workdir(tmp_path, caplog):
    for cmd in ("eval", "generate"):
        caplog.clear()
        assert cli.main([cmd, "--workdir", str(tmp_path / "nope")]) == cli.EXIT_CONFIG
        assert "no such directory" in caplog.text


def test_binary_data_is_refused_with_the_offset_and_logged(tmp_path, caplog):
    binary = tmp_path / "prog"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)))
    workdir = tmp_path / "run"
    assert _train(workdir, binary, "--steps", "1") == cli.EXIT_DATA
    assert f"{binary} has a NUL byte (binary data?) at byte offset 7 (line 1)" in caplog.text
    assert "data.decode_errors=replace" in _last_log_line(workdir)


@pytest.mark.parametrize("argv, message", [
    (["train", "--lr", "nan"], "must be a finite number"),
    (["train", "--lr", "inf"], "must be a finite number"),
    (["train", "--lr", "-1"], "must be > 0"),
    (["train", "--steps", "0"], "must be >= 1"),
    (["train", "--batch-size", "-4"], "must be >= 1"),
    (["train", "--seed", "-1"], "must be >= 0"),
    (["generate", "--max-new-tokens", "-5"], "must be >= 0"),
    (["generate", "--temperature", "-1"], "must be >= 0"),
    (["generate", "--temperature", "nan"], "must be a finite number"),
    (["generate", "--top-k", "-3"], "must be >= 0"),
    (["eval", "--batches", "0"], "must be >= 1"),
])
def test_numeric_options_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([argv[0], "--workdir", "unused", *argv[1:]])
    assert e.value.code == cli.EXIT_CONFIG
    assert message in capsys.readouterr().err


def test_non_finite_config_values_are_refused(corpus, tmp_path, caplog):
    assert _train(tmp_path / "run", corpus, "--set", "optim.learning_rate=1e999") == 2
    assert "optim.learning_rate=inf: must be a finite number" in caplog.text
