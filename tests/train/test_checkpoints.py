"""Checkpoints: state + data iterator round trip, fallback past a corrupt or partial one."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nested_jax.data import pipeline
from nested_jax.data.tokenizers import ByteTokenizer
from nested_jax.train.checkpoints import CheckpointIOError, Checkpoints

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
