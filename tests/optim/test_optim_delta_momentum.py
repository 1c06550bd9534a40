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


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("axis", [-1, 0])
def test_step_is_gd_on_the_stated_objective(x64, form, axis):
    mu0, g, d = randn((4, 6), 0), randn((4, 6), 1), jnp.exp(randn((4, 6), 2))
    alpha, beta = 0.8, 0.6
    tx = no.scale_by_delta_momentum(
        alpha, beta, form=form, axis=axis, preconditioner=_fixed_diagonal(d)
    )
    got = _one_step(tx, mu0, g)
    # Oracle 1: autodiff of the inner objective.
    loss = lambda m: no.delta_momentum_loss(m, g, d * g, beta=beta, form=form, axis=axis)
    step = 1.0 if form == "neurips" else beta
    np.testing.assert_allclose(got, alpha * mu0 - step * jax.grad(loss)(mu0), rtol=1e-13)
    # Oracle 2: the paper's matrix form, row by row: (alpha I - beta k k^T) mu + w P g.
    rows = lambda x: np.moveaxis(np.asarray(x), axis, -1).reshape(-1, x.shape[axis])
    key = g if form == "neurips" else d * g
    write = 1.0 if form == "neurips" else beta
    expect = []
    for m, k, pg in zip(rows(mu0), rows(key), rows(d * g), strict=True):
        k = k / np.linalg.norm(k)
        expect.append((alpha * np.eye(len(k)) - beta * np.outer(k, k)) @ m + write * pg)
    np.testing.assert_allclose(rows(got), np.stack(expect), rtol=1e-13)


@pytest.mark.parametrize("form", FORMS)
def test_component_along_the_gradient_is_forgotten_faster(x64, form):
    alpha, beta = 0.9, 0.5
    g = randn((3, 8), 1)
    g_hat = g / jnp.linalg.norm(g, axis=-1, keepdims=True)
    ortho = randn((3, 8), 2)
    ortho = ortho - jnp.sum(ortho * g_hat, -1, keepdims=True) * g_hat
    mu0 = 2.0 * g_hat + ortho
    new = _one_step(no.scale_by_delta_momentum(alpha, beta, form=form), mu0, g)
    kept = new - (1.0 if form == "neurips" else beta) * g  # remove the write
    along = jnp.sum(kept * g_hat, -1)
    np.testing.assert_allclose(along, (alpha - beta) * 2.0, rtol=1e-13)
    np.testing.assert_allclose(kept - along[:, None] * g_hat, alpha * ortho, rtol=1e-12, atol=1e-15)


def test_forgetting_does_not_depend_on_the_gradient_scale(x64):
    mu0 = randn((2, 5), 3)
    g = randn((2, 5), 4)
    tx = no.scale_by_delta_momentum(0.9, 0.7)
    for c in (1e-6, 1.0, 1e6):
        np.testing.assert_allclose(
            _one_step(tx, mu0, c * g) - c * g, _one_step(tx, mu0, g) - g, rtol=1e-9
        )


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


def test_arxiv_is_scaled_neurips_without_preconditioner_and_differs_with_one(x64):
    grads = [randn((3, 4), 80 + i) for i in range(5)]
    arxiv = run_updates(no.scale_by_delta_momentum(0.9, 0.4, form="arxiv"), grads)
    neurips = run_updates(no.scale_by_delta_momentum(0.9, 0.4), grads)
    assert_close(arxiv, [0.4 * u for u in neurips], rtol=1e-13)
    # With a preconditioner the forms forget along different keys (g vs P g).
    d = jnp.exp(randn((3, 4), 9))
    arxiv = run_updates(
        no.scale_by_delta_momentum(0.9, 0.4, form="arxiv", preconditioner=_fixed_diagonal(d)), grads
    )
    neurips = run_updates(
        no.scale_by_delta_momentum(0.9, 0.4, preconditioner=_fixed_diagonal(d)), grads
    )
    assert not np.allclose(arxiv[-1], 0.4 * neurips[-1], rtol=1e-3)


def test_stale_momentum_turns_around_faster_than_plain_momentum(x64):
    # Ten steps along +g, then the gradient reverses: count steps until the
    # update points along the new gradient (paper: "forgets stale gradients").
    g = jnp.array([[1.0, 2.0, -0.5]])

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
        steps_to_turn(no.scale_by_delta_momentum(0.9, 0.5)),
        steps_to_turn(optax.trace(0.9)),
    )
    # Plain: 0.9^k (1 - 0.9^10) / 0.1 < (1 - 0.9^k) / 0.1  first holds at k = 5.
    # Delta: along g it keeps 0.9 - 0.5 = 0.4 of ~g / 0.6, less than the new -g.
    assert (delta, plain) == (1, 5)
