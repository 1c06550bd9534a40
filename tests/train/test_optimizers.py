"""Optimizers by name, the schedule, and the clipping in front of every optimizer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nested_jax.train import optimizers
from nested_jax.train.config import OptimConfig

PARAMS = {"embed": {"embedding": jnp.ones((16, 8))}, "mlp": {"kernel": jnp.ones((8, 8))},
          "norm": {"scale": jnp.ones((8,))}}


def _one_update(cfg):
    tx = optimizers.build(cfg, total_steps=10)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)
    updates, _ = jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS)
    return updates


@pytest.mark.parametrize("name", ["adamw", "adam", "lion", "sgd", "muon", "adafactor",
                                  "optax:adamw"])
def test_named_optimizers_build_and_update(name):
    updates = _one_update(OptimConfig(name=name, warmup_steps=0))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", optimizers.NESTED_OPTIMIZERS)
def test_deep_optimizers_from_nested_jax_optim(name):
    updates = _one_update(OptimConfig(name=name, warmup_steps=0))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_m3_orthogonalizes_hidden_matrices_only():
    """As for Muon, the embedding (tied LM head) and vectors skip Newton-Schulz under M3: the
    trainer's M3 equals nested_jax.optim.m3 with dimension numbers on the hidden matrix only."""
    from nested_jax import optim

    dims = optimizers._ns_dimensions(PARAMS)
    assert dims["embed"]["embedding"] is None and dims["norm"]["scale"] is None
    assert dims["mlp"]["kernel"] == optim.DimensionNumbers(0, 1)
    cfg = OptimConfig(name="m3", warmup_steps=0, schedule="constant", grad_clip=0.0,
                      weight_decay=0.0)
    got = _one_update(cfg)
    tx = optim.m3(optimizers.schedule(cfg, 10), weight_decay=0.0,
                  weight_dimension_numbers={"embed": {"embedding": None},
                                            "mlp": {"kernel": optim.DimensionNumbers(0, 1)},
                                            "norm": {"scale": None}})
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)
    want, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


def test_unknown_names_are_reported():
    with pytest.raises(ValueError, match="optim.name='nadamax_x'"):
        optimizers.build(OptimConfig(name="nadamax_x"), 10)
    with pytest.raises(ValueError, match="cannot import"):
        optimizers.build(OptimConfig(name="no_such_module:f"), 10)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(kind):
    cfg = OptimConfig(learning_rate=1.0, warmup_steps=10, schedule=kind, min_lr_ratio=0.1)
    lr = optimizers.schedule(cfg, total_steps=100)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    end = 1.0 if kind == "constant" else 0.1
    assert float(lr(100)) == pytest.approx(end, abs=1e-6)


def test_gradients_are_clipped_first():
    cfg = OptimConfig(name="sgd", learning_rate=1.0, warmup_steps=0, schedule="constant",
                      grad_clip=1.0, b1=0.0)
    tx = optimizers.build(cfg, 10)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0), PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(float(optax.tree.norm(updates)), 1.0, rtol=1e-5)
    unclipped = optimizers.build(dataclasses.replace(cfg, grad_clip=0.0), 10)
    updates, _ = unclipped.update(grads, unclipped.init(PARAMS), PARAMS)
    assert float(optax.tree.norm(updates)) > 100


@pytest.mark.parametrize("name,field,value", [
    ("m3", "b1", 0.5), ("delta_momentum", "b2", 0.9), ("deep_momentum", "eps", 1e-6),
    ("sgd", "eps", 1e-6), ("lion", "eps", 1e-6),
])
def test_a_shared_field_the_optimizer_ignores_is_refused(name, field, value):
    """optim.b1 / b2 / eps used to be dropped silently by optimizers that do not take them."""
    with pytest.raises(ValueError, match=rf"optim\.{field}.*does not take it.*optim\.kwargs"):
        optimizers.build(OptimConfig(name=name, **{field: value}), total_steps=10)


def test_shared_fields_still_reach_the_optimizers_that_take_them():
    a = _one_update(OptimConfig(name="adam", warmup_steps=0, b1=0.5, eps=1e-3))
    b = _one_update(OptimConfig(name="adam", warmup_steps=0))
    assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                      strict=True))
    optimizers.build(OptimConfig(name="m3"), total_steps=10)  # defaults are never refused
