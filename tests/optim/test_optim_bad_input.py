"""Bad input fails at once with a ValueError that names the argument and the fix."""

import math

import jax.numpy as jnp
import pytest
from optim_cases import CASES

import nested_jax.optim as no

BAD_HYPERPARAMS = [
    (no.momentum_memory, "learning_rate", -1e-3),
    (no.momentum_memory, "alpha", -0.1),
    (no.momentum_memory, "alpha", 1.5),
    (no.momentum_memory, "weight_decay", -1e-4),
    (no.preconditioned_momentum, "b2", 1.0),
    (no.preconditioned_momentum, "eps", -1e-8),
    (no.delta_momentum, "beta", -0.5),
    (no.delta_momentum, "alpha", 1.1),
    (no.deep_momentum, "eta_mlp", -0.1),
    (no.deep_momentum, "hidden", 0),
    (no.newton_schulz_momentum, "beta", -0.95),
    (no.newton_schulz_momentum, "ns_steps", 0),
    (no.newton_schulz_momentum, "eps", -1.0),
    (no.adam_memory, "b1", -0.9),
    (no.adam_memory, "b2", 1.2),
    (no.m3, "beta3", -0.1),
    (no.m3, "alpha", -1.0),
    (no.m3, "every", 0),
    (no.m3, "eps", -1e-8),
    (no.dgd, "learning_rate", -0.1),
]


@pytest.mark.parametrize(
    ("factory", "name", "value"), BAD_HYPERPARAMS, ids=lambda v: str(getattr(v, "__name__", v))
)
def test_negative_or_out_of_range_hyperparameters_raise(factory, name, value):
    with pytest.raises(ValueError, match=rf"`{name}` must be .*got {value!r}"):
        factory(**{"learning_rate": 1e-3, name: value})


@pytest.mark.parametrize(
    ("factory", "name", "_"), BAD_HYPERPARAMS, ids=lambda v: str(getattr(v, "__name__", v))
)
def test_nan_hyperparameters_raise(factory, name, _):
    if name in ("hidden", "ns_steps", "every"):
        match = rf"`{name}` must be a concrete int"
    else:
        match = rf"`{name}` must be a finite number .*got nan"
    with pytest.raises(ValueError, match=match):
        factory(**{"learning_rate": 1e-3, name: math.nan})


@pytest.mark.parametrize("seed", [math.nan, 1.5, "0", True, jnp.float32(2.0)])
def test_deep_momentum_seed_must_be_an_integer(seed):
    # Before the check these reached jax.random.key at init as a TypeError.
    with pytest.raises(ValueError, match=r"scale_by_deep_momentum: `seed` must be an integer"):
        no.deep_momentum(1e-3, seed=seed)


@pytest.mark.parametrize("seed", [0, -1, 2**40, jnp.int32(3)])
def test_deep_momentum_integer_seeds_are_accepted(seed):
    state = no.deep_momentum(1e-3, seed=seed).init({"w": jnp.ones((3, 4))})
    assert state[0].w_in["w"].shape == (4, 16)


def test_unknown_choices_raise():
    with pytest.raises(ValueError, match=r"`form` must be one of \('neurips', 'arxiv'\)"):
        no.delta_momentum(1e-3, form="icml")
    with pytest.raises(ValueError, match=r"`moments` must be one of"):
        no.m3(1e-3, moments="adagrad")
    with pytest.raises(ValueError, match=r"`objective` must be one of"):
        no.deep_momentum(1e-3, objective="cosine")
    with pytest.raises(
        ValueError, match=r"`preconditioner` must be an optax.GradientTransformation"
    ):
        no.scale_by_preconditioned_momentum(preconditioner=lambda g: g)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_mismatched_trees_raise(case):
    opt = case.build()
    params = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 2))}
    state = opt.init(params)
    other_structure = {"a": jnp.ones((4, 4)), "c": jnp.ones((4, 2))}
    with pytest.raises(ValueError, match="tree structure"):
        opt.update(other_structure, state, params)
    other_shape = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 3))}
    with pytest.raises(ValueError, match=r"leaf \['b'\] of `updates` has shape \(4, 3\)"):
        opt.update(other_shape, state, params)


def test_orthogonalize_needs_dimension_numbers_for_non_matrices():
    # The transforms default to matrix_dimension_numbers; the matrix function does not guess.
    with pytest.raises(
        ValueError, match=r"shape \(2, 3, 4\); Newton–Schulz needs a matrix.*dimension_numbers"
    ):
        no.orthogonalize(jnp.ones((2, 3, 4)))
    with pytest.raises(
        ValueError, match="reduction axes .* and output axes .* must be non-empty and disjoint"
    ):
        no.orthogonalize(jnp.ones((2, 3, 4)), dimension_numbers=no.DimensionNumbers(1, 1))
    with pytest.raises(ValueError, match="out of range"):
        no.orthogonalize(jnp.ones((3, 4)), dimension_numbers=no.DimensionNumbers(0, 2))
    with pytest.raises(
        ValueError, match="`weight_dimension_numbers` must be a tree with the structure"
    ):
        no.scale_by_newton_schulz(weight_dimension_numbers={"x": None}).init(
            {"w": jnp.ones((2, 2))}
        )


def test_structural_ints_under_inject_hyperparams_name_static_args():
    # hidden shapes DMGD's state and axis picks array axes: given as ints, the arrays
    # inject_hyperparams makes of them cannot work, and the error says what to do.
    import jax
    import optax

    params = {"w": jnp.ones((3, 4))}
    tx = optax.inject_hyperparams(no.deep_momentum)(1e-3, hidden=8)
    with pytest.raises(ValueError, match=r"`hidden`.*traced.*static_args=\('hidden',\)"):
        jax.jit(tx.init)(params)
    tx = optax.inject_hyperparams(no.deep_momentum, static_args="hidden")(1e-3, hidden=8)
    assert jax.jit(tx.init)(params).inner_state[0].w_in["w"].shape == (4, 8)
    tx = optax.inject_hyperparams(no.delta_momentum)(1e-3, axis=0)
    with pytest.raises(ValueError, match=r"`axis` must be an int or None.*static_args"):
        tx.update(params, tx.init(params), params)
    tx = optax.inject_hyperparams(no.delta_momentum, static_args="axis")(1e-3, axis=0)
    tx.update(params, tx.init(params), params)
