"""Adam as the optimal associative memory (paper Appendix B) equals optax.adam."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optim_helpers import assert_close, randn, run_updates

import nested_jax.optim as no


def _history(t, shape=(4, 3), seed=0):
    scale = jnp.linspace(0.1, 3.0, shape[-1]).reshape((1,) * len(shape) + (-1,))
    return randn((t,) + shape, seed) * scale


@pytest.mark.parametrize(("b1", "b2"), [(0.9, 0.999), (0.8, 0.8)])
def test_scale_by_adam_memory_equals_optax_scale_by_adam(x64, b1, b2):
    grads = list(_history(6))
    got = run_updates(no.scale_by_adam_memory(b1, b2, eps=1e-3), grads)
    ref = run_updates(optax.scale_by_adam(b1, b2, eps=1e-3), grads)
    assert_close(got, ref, rtol=1e-13)


def test_adam_memory_alias_equals_optax_adamw(x64):
    grads = list(_history(6))
    params = jnp.ones((4, 3))
    got = run_updates(no.adam_memory(1e-2, weight_decay=0.1), grads, params)
    ref = run_updates(optax.adamw(1e-2, weight_decay=0.1), grads, params)
    assert_close(got, ref, rtol=1e-13)


@pytest.mark.parametrize(("b1", "b2"), [(0.9, 0.999), (0.7, 0.7)])
def test_update_is_the_minimizer_of_the_memory_objective(x64, b1, b2):
    # The oracle: the Appendix-B objective built from the explicit gradient
    # history, minimized by one Newton step (it is quadratic and separable).
    eps, hist = 1e-3, _history(5, seed=1)
    loss = lambda m: no.adam_memory_loss(m, hist, b1=b1, b2=b2, eps=eps)
    zero = jnp.zeros(hist.shape[1:])
    grad0 = jax.grad(loss)(zero)
    curvature = jax.grad(lambda m: jnp.vdot(jax.grad(loss)(m), jnp.ones_like(m)))(zero)
    m_star = -grad0 / curvature
    np.testing.assert_allclose(jax.grad(loss)(m_star), 0.0, atol=1e-12)
    got = run_updates(no.scale_by_adam_memory(b1, b2, eps), list(hist))[-1]
    ref = run_updates(optax.scale_by_adam(b1, b2, eps), list(hist))[-1]
    np.testing.assert_allclose(m_star, got, rtol=1e-12)
    np.testing.assert_allclose(m_star, ref, rtol=1e-12)


def test_equal_decays_give_the_papers_objective_exactly(x64):
    # b1 = b2: L(m) = sum_i w_i ||m * g_i - P||^2 + lambda ||m||^2, P = sqrt(sum_i w_i g_i^2).
    b, eps, hist = 0.8, 1e-2, _history(4, seed=2)
    m = randn(hist.shape[1:], 3)
    t = hist.shape[0]
    w = (1 - b) * b ** jnp.arange(t - 1, -1, -1.0) / (1 - b**t)
    p = jnp.sqrt(jnp.einsum("i,i...->...", w, hist**2))
    paper = sum(w[i] * jnp.sum((m * hist[i] - p) ** 2) for i in range(t)) + jnp.sum(eps * p * m**2)
    np.testing.assert_allclose(no.adam_memory_loss(m, hist, b1=b, b2=b, eps=eps), paper, rtol=1e-13)
