"""Inputs and comparisons for the kernel tests.

Inputs are drawn the way Hope/Titans produce them (decisions.md #7, #11): q, k l2-normalised,
eta = eta_max * sigmoid, alpha = sigmoid around 0.95, beta = sigmoid, and a non-trivial
initial state (W and momentum S both non-zero), so every term of the recurrence is exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np

from nested_jax import memory as nm


def linear_memory(level, state, q, k, v, gates, chunk_size, impl="auto", **kernel_options):
    """The engine's kernel path, ``memory.apply(path="pallas")``, in the kernels' call shape."""
    return nm.apply(level, state, q, k, v, gates, chunk_size=chunk_size, path="pallas",
                    impl=impl, **kernel_options)


def inputs(level, seed, B=1, T=40, H=2, eta_max=0.5, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 8)
    dk, dv = level.memory.dk, level.memory.dv
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(ks[0], (B, T, H, dk), dtype))
    k = unit(jax.random.normal(ks[1], (B, T, H, dk), dtype))
    v = jax.random.normal(ks[2], (B, T, H, dv), dtype)
    gates = nm.Gates(
        eta_max * jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H), dtype)),
        jax.nn.sigmoid(3.0 + jax.random.normal(ks[4], (B, T, H), dtype)),
        jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H), dtype)),
    )
    if not isinstance(level.memory, nm.LinearMemory):
        return nm.broadcast_state(nm.init_state(level, ks[6], H, dtype), B), q, k, v, gates
    w = jax.random.normal(ks[6], (B, H, dv, dk), dtype) / jnp.sqrt(dk)
    s = 0.1 * jax.random.normal(ks[7], (B, H, dv, dk), dtype)
    return nm.MemoryState({"W": w}, {"W": s}), q, k, v, gates


def outer_loss(run):
    """A scalar of every output whose gradient reaches every input (non-linear in o, W, S)."""

    def loss(state, q, k, v, gates):
        o, fin = run(state, q, k, v, gates)
        return (jnp.sum(jnp.sin(o)) + 0.5 * jnp.sum(fin.params["W"] ** 2)
                + jnp.sum(jnp.cos(fin.mom["W"])))

    return loss


def all_grads(run, args):
    return jax.grad(outer_loss(run), argnums=(0, 1, 2, 3, 4))(*args)


def rel_err(a, b):
    """max |a - b| / max |b| over each leaf pair; the worst leaf."""
    errs = []
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        errs.append(float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)))
    return max(errs)


def named_errs(a, b):
    """{path: relative error} per leaf, for readable assertion messages."""
    out = {}
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                            strict=True):
        out[jax.tree_util.keystr(path)] = rel_err(x, y)
    return out
