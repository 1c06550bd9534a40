"""Random, well-conditioned inputs for memory-engine tests."""

import jax
import jax.numpy as jnp

from nested_jax import memory as nm


def inputs(level, key, B=2, T=37, H=2, eta_scale=0.5, dtype=jnp.float64):
    """q, k l2-normalised (as Hope/Titans do), gates in their ranges, a non-trivial init state."""
    ks = jax.random.split(key, 8)
    dk, dv = level.memory.dk, level.memory.dv
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(ks[0], (B, T, H, dk), dtype))
    k = unit(jax.random.normal(ks[1], (B, T, H, dk), dtype))
    v = jax.random.normal(ks[2], (B, T, H, dv), dtype)
    gates = nm.Gates(
        eta_scale * jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H), dtype)),
        jax.nn.sigmoid(3.0 + jax.random.normal(ks[4], (B, T, H), dtype)),
        jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H), dtype)),
    )
    st = nm.broadcast_state(nm.init_state(level, ks[6], H, dtype), B)
    noise = lambda x, s: x + 0.1 * jax.random.normal(jax.random.fold_in(ks[7], s), x.shape, dtype)
    st = nm.MemoryState(
        jax.tree.map(lambda x: noise(x, 1), st.params),
        jax.tree.map(lambda x: noise(jnp.zeros_like(x), 2), st.mom),
    )
    return st, q, k, v, gates


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
