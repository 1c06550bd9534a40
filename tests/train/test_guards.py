"""The NaN/Inf guard and gradient accumulation, at the step and at the trainer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nested_jax.train import step as step_lib
from nested_jax.train import trainer

from .conftest import tiny_config


@pytest.fixture
def run(corpus, tmp_path):
    return trainer.prepare(tiny_config(corpus), tmp_path, devices=jax.devices()[:1])


def _batch(seed=0, a=1):
    tokens = np.random.default_rng(seed).integers(0, 256, size=(8, 33), dtype=np.int32)
    return jnp.asarray(tokens.reshape(a, 8 // a, 33))


def _poison(state):
    """A copy of the state with one NaN in the first MLP weight."""
    state = jax.tree.map(lambda x: x, state)
    kernel = state["params"]["blocks"][0]["mlp"]["up"]["kernel"]
    kernel.set_value(kernel.get_value().at[0, 0].set(jnp.nan))
    return state


def test_non_finite_step_is_skipped_and_counted(run):
    step = jax.jit(step_lib.make_train_step(run.graphdef, run.tx))
    good = run.init_state()
    bad = _poison(good)
    after, m = step(bad, _batch())
    assert not bool(m["finite"]) and int(m["bad_streak"]) == 1 and int(m["bad_total"]) == 1
    for x, y in zip(jax.tree.leaves(bad), jax.tree.leaves(after), strict=True):
        if jnp.issubdtype(x.dtype, jnp.floating):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # untouched
    after, m = step(after, _batch(1))
    assert int(m["bad_streak"]) == 2
    after = dict(after, params=good["params"])
    after, m = step(after, _batch(2))
    assert bool(m["finite"]) and int(m["bad_streak"]) == 0 and int(m["bad_total"]) == 2
    assert int(after["step"]) == 3


def test_gradient_accumulation_matches_the_full_batch(corpus, tmp_path):
    cfg = tiny_config(corpus)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, name="sgd"))
    run = trainer.prepare(cfg, tmp_path, devices=jax.devices()[:1])
    step = jax.jit(step_lib.make_train_step(run.graphdef, run.tx))
    state = run.init_state()
    one, m1 = step(state, _batch(a=1))
    two, m2 = step(run.init_state(), _batch(a=2))
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(two["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)


def test_trainer_aborts_after_max_bad_steps(corpus, tmp_path):
    """A learning rate of 1e30 blows the weights up; every later step is non-finite."""
    cfg = tiny_config(corpus, steps=40, max_bad_steps=3, checkpoint_every=0)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, learning_rate=1e30,
                                                             grad_clip=0.0))
    with pytest.raises(trainer.NonFiniteError, match=r"3 consecutive steps.*max_bad_steps=3"):
        trainer.train(cfg, tmp_path / "run", devices=jax.devices()[:1], progress=False)
