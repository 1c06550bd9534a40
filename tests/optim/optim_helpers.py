"""Shared helpers of the nested_jax.optim tests."""

import jax
import jax.numpy as jnp
import numpy as np


def run_updates(tx, grads, params=None, **update_kwargs):
    """The updates of ``tx`` for a list of gradients (params fixed), jitted once."""
    params = params if params is not None else jax.tree.map(jnp.zeros_like, grads[0])
    update = jax.jit(tx.update)
    state, out = tx.init(params), []
    for g in grads:
        u, state = update(g, state, params, **update_kwargs)
        out.append(u)
    return out


def assert_close(a, b, rtol, atol=0.0):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def randn(shape, seed=0):
    """Standard normal test data from numpy (jax.random would compile per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))
