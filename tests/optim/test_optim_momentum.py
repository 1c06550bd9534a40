"""Momentum as memory and preconditioned momentum (paper §2, rows 1-2)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optim_helpers import assert_close, randn, run_updates

import nested_jax.optim as no


def _grads(n, shape=(3, 4), seed=0):
    return [
        {"w": randn(shape, seed + 2 * i), "b": randn(shape[-1:], seed + 2 * i + 1)}
        for i in range(n)
    ]


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_memory_equals_optax_trace(x64, nesterov):
    grads = _grads(6)
    got = run_updates(no.scale_by_momentum_memory(0.9, nesterov=nesterov), grads)
    ref = run_updates(optax.trace(0.9, nesterov=nesterov), grads)
    assert_close(got, ref, rtol=1e-14)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_memory_alias_equals_sgd_with_momentum(x64, nesterov):
    params = jax.tree.map(lambda g: g + 1.0, _grads(1, seed=3)[0])
    grads = _grads(6)
    got = run_updates(no.momentum_memory(0.05, 0.8, nesterov=nesterov), grads, params)
    ref = run_updates(optax.sgd(0.05, momentum=0.8, nesterov=nesterov), grads, params)
    assert_close(got, ref, rtol=1e-14)


def test_recurrence_is_a_gd_step_on_the_memory_objective(x64):
    # m <- alpha m - eta grad_m <m, g>-objective, computed by autodiff (the oracle).
    alpha, eta = 0.7, 0.3
    tx = no.scale_by_momentum_memory(alpha, eta)
    g1, g2 = (x["w"] for x in _grads(2))
    state = tx.init(g1)
    _, state = tx.update(g1, state)
    mu = state.mu
    _, state = tx.update(g2, state)
    oracle = alpha * mu - eta * jax.grad(no.momentum_memory_loss)(mu, g2)
    np.testing.assert_allclose(state.mu, oracle, rtol=1e-15)


def test_debiased_ema_of_a_constant_gradient_is_that_gradient(x64):
    g = _grads(1)[0]
    tx = no.scale_by_momentum_memory(0.95, 0.05, debias=True)
    for u in run_updates(tx, [g] * 5):
        assert_close(u, g, rtol=1e-13)


def test_identity_preconditioner_is_plain_momentum(x64):
    grads = _grads(5)
    tx = no.scale_by_preconditioned_momentum(0.9, preconditioner=optax.identity())
    assert_close(
        run_updates(tx, grads), run_updates(no.scale_by_momentum_memory(0.9), grads), 1e-14
    )


def test_diagonal_second_moment_matches_its_formula(x64):
    grads = [g["w"] for g in _grads(4)]
    b2, eps = 0.99, 1e-3
    got = run_updates(no.scale_by_diagonal_second_moment(b2, eps), grads)
    nu = np.zeros_like(grads[0])
    for t, (g, u) in enumerate(zip(grads, got, strict=True), start=1):
        nu = b2 * nu + (1 - b2) * np.asarray(g) ** 2
        np.testing.assert_allclose(u, g / (np.sqrt(nu / (1 - b2**t)) + eps), rtol=1e-13)


def test_preconditioned_momentum_is_invariant_to_coordinate_scaling(x64):
    # The point of a diagonal P: per-coordinate scales of the gradient cancel.
    grads = _grads(5)
    scale = jax.tree.map(lambda g: jnp.exp(randn(g.shape, 9) * 3), grads[0])
    scaled = [jax.tree.map(jnp.multiply, g, scale) for g in grads]
    tx = no.preconditioned_momentum(0.1, eps=0.0)
    assert_close(run_updates(tx, scaled), run_updates(tx, grads), rtol=1e-12)
    # Plain momentum is not invariant.
    plain = no.momentum_memory(0.1)
    assert not np.allclose(run_updates(plain, scaled)[-1]["w"], run_updates(plain, grads)[-1]["w"])


def test_pluggable_preconditioner_receives_extra_args(x64):
    def scale_by_extra():
        def update(updates, state, params=None, *, gain=1.0, **_):
            return jax.tree.map(lambda g: gain * g, updates), state

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

    tx = no.scale_by_preconditioned_momentum(0.5, preconditioner=scale_by_extra())
    g = jnp.ones(3)
    state = tx.init(g)
    _, state = tx.update(g, state, gain=2.0)
    u, state = tx.update(g, state, gain=3.0)
    np.testing.assert_allclose(u, 0.5 * 2.0 + 3.0, rtol=1e-15)
