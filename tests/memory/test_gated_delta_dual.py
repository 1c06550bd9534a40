"""The dual form's building blocks against numpy, float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nested_jax.kernels import triangular
from nested_jax.memory import gated_delta_dual


@pytest.mark.parametrize("c", [1, 2, 7, 16, 17, 32, 45, 64])
def test_unit_lower_inverse_is_the_inverse(x64, c):
    """Blocked doubling equals (I + L)^{-1}: leaf sizes, the 2 x 2 block recursion, odd splits."""
    lower = jnp.tril(jax.random.normal(jax.random.key(c), (c, c), jnp.float64), -1) * 0.3
    want = np.linalg.inv(np.eye(c) + np.asarray(lower))
    np.testing.assert_allclose(triangular.unit_lower_inverse(lower), want, rtol=0, atol=1e-12)


def test_split_chunk_equals_a_token_loop(x64):
    """prepare + reads + update (the dual form's chunk) against the recurrence written out:
    S_t = beta S - eta x k^T, M_t = M (alpha I - eta k k^T) + S_t, y_t = M_t r_t."""
    C, di, do = 9, 5, 4
    ks = jax.random.split(jax.random.key(1), 8)
    m0 = jax.random.normal(ks[0], (do, di), jnp.float64)
    s0 = jax.random.normal(ks[1], (do, di), jnp.float64)
    k = jax.random.normal(ks[2], (C, di), jnp.float64) / np.sqrt(di)
    r = jax.random.normal(ks[3], (C, di), jnp.float64)
    x = jax.random.normal(ks[4], (C, do), jnp.float64)
    eta = jax.random.uniform(ks[5], (C,), jnp.float64, 0.1, 0.6)
    alpha = jax.random.uniform(ks[6], (C,), jnp.float64, 0.7, 1.0)
    beta = jax.random.uniform(ks[7], (C,), jnp.float64, 0.0, 0.9)
    y, m_last, s_last = gated_delta_dual.chunk(m0, s0, k, x, r, eta, alpha, beta, dgd=True)

    M, S = np.asarray(m0), np.asarray(s0)
    for t in range(C):
        kt = np.asarray(k[t])
        S = float(beta[t]) * S - float(eta[t]) * np.outer(np.asarray(x[t]), kt)
        M = M @ (float(alpha[t]) * np.eye(di) - float(eta[t]) * np.outer(kt, kt)) + S
        np.testing.assert_allclose(y[t], M @ np.asarray(r[t]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m_last, M, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s_last, S, rtol=1e-12, atol=1e-12)
