"""Delta momentum (paper §2): gradient-dependent decay, NeurIPS and arXiv forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optim_helpers import assert_close, randn, run_updates

import nested_jax.optim as no
from nested_jax.optim.delta_momentum import FORMS


def _fixed_diagonal(d):
    """A stateless preconditioner ``P g = d * g``."""
    return optax.GradientTransformation(
        lambda p: optax.EmptyState(), lambda u, s, p=None: (jax.tree.map(lambda x: d * x, u), s)
    )


def _one_step(tx, mu0, g):
    state = tx.init(g)
    state = state._replace(mu=mu0)
    _, state = tx.update(g, state)
    return state.mu


def _rows(x, axis):
    return np.moveaxis(np.asarray(x), axis, -1).reshape(-1, x.shape[axis])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("axis", [-1, 0])
def test_step_minimizes_the_stated_objective(x64, form, axis):
    mu0, g, d = randn((4, 6), 0), randn((4, 6), 1), jnp.exp(randn((4, 6), 2))
    alpha, beta = 0.8, 0.3
    tx = no.scale_by_delta_momentum(
        alpha, beta, form=form, axis=axis, preconditioner=_fixed_diagonal(d)
    )
    got = _one_step(tx, mu0, g)
    # Oracle 1: the proximal objective is quadratic; minimize it by a linear solve.
    loss = lambda m: no.delta_momentum_loss(
        m.reshape(mu0.shape), mu0, g, d * g, alpha=alpha, beta=beta, form=form, axis=axis
    )
    zero = jnp.zeros(mu0.size)
    m_star = jnp.linalg.solve(jax.hessian(loss)(zero), -jax.grad(loss)(zero)).reshape(mu0.shape)
    expect = alpha * m_star + d * g if form == "neurips" else m_star
    np.testing.assert_allclose(got, expect, rtol=1e-12)
    # Oracle 2: the matrix form row by row, with an explicit inverse (I + beta g g^T)^-1.
    want = []
    for m, gr, pg in zip(_rows(mu0, axis), _rows(g, axis), _rows(d * g, axis), strict=True):
        inv = np.linalg.inv(np.eye(len(gr)) + beta * np.outer(gr, gr))
        want.append(alpha * inv @ m + pg if form == "neurips" else inv @ (alpha * m + beta * pg))
    np.testing.assert_allclose(_rows(got, axis), np.stack(want), rtol=1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_component_along_the_gradient_is_forgotten_faster(x64, form):
    alpha, beta = 0.9, 0.5
    g = randn((3, 8), 1)
    norm2 = jnp.sum(g**2, -1, keepdims=True)
    g_hat = g / jnp.sqrt(norm2)
    ortho = randn((3, 8), 2)
    ortho = ortho - jnp.sum(ortho * g_hat, -1, keepdims=True) * g_hat
    mu0 = 2.0 * g_hat + ortho
    tx = no.scale_by_delta_momentum(alpha, beta, form=form)
    kept = _one_step(tx, mu0, g) - _one_step(tx, jnp.zeros_like(mu0), g)  # remove the write
    along = jnp.sum(kept * g_hat, -1, keepdims=True)
    np.testing.assert_allclose(along, 2.0 * alpha / (1 + beta * norm2), rtol=1e-13)
    np.testing.assert_allclose(kept - along * g_hat, alpha * ortho, rtol=1e-12, atol=1e-15)
    assert bool(jnp.all(along / 2.0 < alpha))


def test_forgetting_grows_with_the_gradient_and_stays_bounded(x64):
    g_hat = jnp.array([[0.6, 0.8, 0.0]])
    mu0 = jnp.array([[3.0, 4.0, 0.0]])  # = 5 g_hat
    tx = no.scale_by_delta_momentum(0.9, 1.0)
    kept = []
    for c in (1e-4, 0.1, 1.0, 10.0, 1e4):
        kept.append(float(jnp.sum((_one_step(tx, mu0, c * g_hat) - c * g_hat) * g_hat)) / 5.0)
    assert kept == sorted(kept, reverse=True)  # larger gradient, more forgetting
    np.testing.assert_allclose(kept[0], 0.9, rtol=1e-7)  # tiny gradients: plain momentum
    assert 0.0 < kept[-1] < 1e-7  # huge gradients: forgets, never overshoots


def test_rows_are_independent_and_zero_rows_just_decay(x64):
    mu0 = randn((3, 4), 5)
    g = randn((3, 4), 6).at[2].set(0.0)
    tx = no.scale_by_delta_momentum(0.9, 0.5)
    new = _one_step(tx, mu0, g)
    np.testing.assert_allclose(new[2], 0.9 * mu0[2], rtol=1e-15)
    other = _one_step(tx, mu0, g.at[1].set(7.0))
    np.testing.assert_array_equal(new[0], other[0])


def test_beta_zero_is_plain_momentum(x64):
    grads = [randn((3, 4), 70 + i) for i in range(5)]
    assert_close(
        run_updates(no.scale_by_delta_momentum(0.9, 0.0), grads),
        run_updates(optax.trace(0.9), grads),
        rtol=1e-15,
        atol=1e-15,  # elements that nearly cancel
    )


def test_arxiv_damps_the_write_of_large_gradients(x64):
    # From an empty memory, neurips writes g; arxiv writes beta g / (1 + beta ||g||^2).
    g = jnp.array([[1.0, 2.0, 2.0]])  # ||g||^2 = 9
    zero = jnp.zeros_like(g)
    np.testing.assert_allclose(
        _one_step(no.scale_by_delta_momentum(0.9, 0.5), zero, g), g, rtol=1e-15
    )
    arxiv = _one_step(no.scale_by_delta_momentum(0.9, 0.5, form="arxiv"), zero, g)
    np.testing.assert_allclose(arxiv, 0.5 / (1 + 0.5 * 9) * g, rtol=1e-14)


def test_stale_momentum_turns_around_faster_than_plain_momentum(x64):
    # Ten steps along +g, then the gradient reverses: count steps until the
    # update points along the new gradient (paper: "forgets stale gradients").
    g = jnp.array([[1.0, 2.0, -0.5]])  # ||g||^2 = 5.25

    def steps_to_turn(tx):
        state = tx.init(g)
        for _ in range(10):
            _, state = tx.update(g, state)
        for k in range(1, 50):
            u, state = tx.update(-g, state)
            if float(jnp.sum(u * -g)) > 0:
                return k
        return 50

    delta, plain = (
        steps_to_turn(no.scale_by_delta_momentum(0.9, 1.0)),
        steps_to_turn(optax.trace(0.9)),
    )
    # Plain: 0.9^k (1 - 0.9^10) / 0.1 < (1 - 0.9^k) / 0.1 first holds at k = 5. Delta
    # keeps 0.9 / 6.25 of the stale memory along g at every step: it turns at once.
    assert (delta, plain) == (1, 5)
