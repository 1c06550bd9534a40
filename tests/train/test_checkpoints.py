"""Checkpoints: state + data iterator round trip, fallback past a corrupt or partial one."""

import errno
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nested_jax.data import pipeline
from nested_jax.data.tokenizers import ByteTokenizer
from nested_jax.train import checkpoints
from nested_jax.train.checkpoints import CheckpointIOError, CheckpointMismatchError, Checkpoints

DOCS = [f"document number {i} " * (1 + i % 5) for i in range(50)]


def _iterator():
    return pipeline.train_batches(DOCS, ByteTokenizer(), seq_len=15, batch_size=2, seed=0,
                                  eval_fraction=0.1)


def _state(step):
    return {"w": jnp.full((4, 3), float(step)), "step": jnp.asarray(step, jnp.int32)}


def _abstract():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=x.sharding), _state(0))


@pytest.fixture(params=["grain", "numpy"])
def backend(request, monkeypatch):
    if request.param == "grain" and not pipeline.grain_available():
        pytest.skip("grain is not installed")
    if request.param == "numpy":
        monkeypatch.setattr(pipeline, "grain_available", lambda: False)
    return request.param


def _save_steps(directory, steps=(2, 4, 6)):
    ckpt = Checkpoints(directory, keep=5, use_async=True)
    it = _iterator()
    batches = {}
    for s in range(1, max(steps) + 1):
        next(it)
        if s in steps:
            ckpt.save(s, _state(s), it)
            batches[s] = next(_clone(it))
    ckpt.close()
    return batches


def _clone(it):
    fresh = _iterator()
    fresh.set_state(json.loads(json.dumps(it.get_state())))
    return fresh


def test_round_trip_restores_state_and_data_position(tmp_path, backend):
    want = _save_steps(tmp_path / "ck")
    it = _iterator()
    step, state = Checkpoints(tmp_path / "ck").restore(_abstract(), it)
    assert step == 6 and float(state["w"][0, 0]) == 6.0
    np.testing.assert_array_equal(next(it), want[6])


def test_corrupt_latest_falls_back_with_a_warning(tmp_path, caplog, backend):
    want = _save_steps(tmp_path / "ck")
    for f in (tmp_path / "ck" / "6" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    it = _iterator()
    with caplog.at_level(logging.WARNING, logger="nested_jax"):
        step, state = Checkpoints(tmp_path / "ck").restore(_abstract(), it)
    assert step == 4 and float(state["w"][0, 0]) == 4.0
    np.testing.assert_array_equal(next(it), want[4])
    assert "step 6 could not be read" in caplog.text
    assert (tmp_path / "ck.corrupt" / "6").exists() and not (tmp_path / "ck" / "6").exists()


def test_partial_checkpoint_is_ignored(tmp_path):
    _save_steps(tmp_path / "ck", steps=(2,))
    partial = tmp_path / "ck" / "4.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half_written").write_bytes(b"\x00" * 10)
    step, _ = Checkpoints(tmp_path / "ck").restore(_abstract(), _iterator())
    assert step == 2


def test_all_unreadable_is_an_error(tmp_path):
    _save_steps(tmp_path / "ck", steps=(2,))
    for f in (tmp_path / "ck" / "2").rglob("*"):
        if f.is_file():
            f.write_bytes(b"x")
    with pytest.raises(CheckpointIOError, match="could be read"):
        Checkpoints(tmp_path / "ck").restore(_abstract(), _iterator())


def test_no_checkpoint_returns_none(tmp_path):
    assert Checkpoints(tmp_path / "empty").restore(_abstract(), _iterator()) is None


# ---- restores never lose a good checkpoint ------------------------------------------------------


def _snapshot(directory):
    """{relative path: bytes} of every file below `directory`."""
    return {str(f.relative_to(directory)): f.read_bytes() for f in sorted(directory.rglob("*"))
            if f.is_file()}


def test_shape_mismatch_is_an_error_that_moves_nothing(tmp_path):
    _save_steps(tmp_path / "ck")
    before = _snapshot(tmp_path)
    wide = {"w": jax.ShapeDtypeStruct((4, 5), jnp.float32, sharding=_abstract()["w"].sharding),
            "step": _abstract()["step"]}
    with pytest.raises(CheckpointMismatchError, match=r"w: checkpoint \(4, 3\) float32, this "
                       r"run \(4, 5\) float32"):
        Checkpoints(tmp_path / "ck").restore(wide, _iterator())
    assert _snapshot(tmp_path) == before


def test_metadata_check_runs_before_any_read_and_moves_nothing(tmp_path):
    ckpt = Checkpoints(tmp_path / "ck", use_async=False)
    ckpt.save(2, _state(2), metadata={"model": "hope"})
    ckpt.close()
    before = _snapshot(tmp_path)
    seen = []

    def check(step, saved):
        seen.append((step, saved))
        raise CheckpointMismatchError("other model")

    with pytest.raises(CheckpointMismatchError, match="other model"):
        Checkpoints(tmp_path / "ck").restore(_abstract(), check=check)
    assert seen == [(2, {"model": "hope"})]
    assert _snapshot(tmp_path) == before


def test_io_errors_are_retried_then_reported_with_nothing_moved(tmp_path, monkeypatch):
    _save_steps(tmp_path / "ck")
    before = _snapshot(tmp_path)
    monkeypatch.setattr(checkpoints, "IO_BACKOFF_S", 0.0)
    ckpt = Checkpoints(tmp_path / "ck")
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ckpt.manager, "restore", flaky)
    with pytest.raises(CheckpointIOError, match=r"ck/6: I/O error after 3 attempts"):
        ckpt.restore(_abstract(), _iterator())
    assert len(calls) == checkpoints.IO_RETRIES
    assert _snapshot(tmp_path) == before


def test_read_only_restore_skips_a_corrupt_step_and_touches_nothing(tmp_path):
    _save_steps(tmp_path / "ck")
    for f in (tmp_path / "ck" / "6" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    before = _snapshot(tmp_path)
    step, state = Checkpoints(tmp_path / "ck", read_only=True).restore(_abstract())
    assert step == 4 and float(state["w"][0, 0]) == 4.0
    assert _snapshot(tmp_path) == before and not (tmp_path / "ck.corrupt").exists()


def test_a_step_deleted_while_read_falls_back_to_the_previous_one(tmp_path, monkeypatch):
    """What a reader sees when the training run's keep-N deletes the step it is reading."""
    _save_steps(tmp_path / "ck")
    ckpt = Checkpoints(tmp_path / "ck", read_only=True)
    read = ckpt._read

    def deleted_under_us(step, *args):
        if step == 6:
            shutil.rmtree(tmp_path / "ck" / "6")
        return read(step, *args)

    monkeypatch.setattr(ckpt, "_read", deleted_under_us)
    step, _ = ckpt.restore(_abstract())
    assert step == 4 and not (tmp_path / "ck.corrupt").exists()


def test_corrupt_step_is_set_aside_under_a_new_name_never_deleted(tmp_path):
    _save_steps(tmp_path / "ck")
    (tmp_path / "ck.corrupt" / "6").mkdir(parents=True)
    (tmp_path / "ck.corrupt" / "6" / "earlier").write_text("kept")
    (tmp_path / "ck" / "6" / "state" / "_METADATA").write_bytes(b"{not json")
    step, _ = Checkpoints(tmp_path / "ck").restore(_abstract(), _iterator())
    assert step == 4
    assert (tmp_path / "ck.corrupt" / "6" / "earlier").read_text() == "kept"
    assert (tmp_path / "ck.corrupt" / "6.1" / "state").is_dir()


@pytest.mark.parametrize("error, kind", [
    (OSError(errno.EACCES, "Permission denied"), "io"),
    (ValueError("UNAVAILABLE: try again"), "io"),
    (ValueError("DATA_LOSS: Error decoding manifest"), "corrupt"),
    (ValueError("OUT_OF_RANGE: Requested byte range"), "corrupt"),
    (FileNotFoundError(2, "gone"), "corrupt"),
    (ValueError("User-provided restore item and on-disk value metadata tree structures do "
                "not match"), "unknown"),
])
def test_classify(error, kind):
    assert checkpoints.classify(error) == kind
