"""Rule.normalized: normalised LMS for the whole memory (decisions #19, TitansLM).

``memory.write_gain(params, x)`` must bound ||J J^T|| (J = d M(x) / d all matrices): that is
what keeps a write from overshooting.  Checked against the exact Jacobian in float64, then
the property it buys: a Titans-rule MLP memory stays bounded where per-token steps without it
blow up.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nested_jax import memory as nm

MEMORIES = {
    "linear": nm.LinearMemory(6, 6),
    "mlp2-residual": nm.MLPMemory(6, 6, hidden=8),
    "mlp2-plain-gelu": nm.MLPMemory(6, 5, hidden=8, residual=False, activation="gelu"),
    "mlp3": nm.MLPMemory(6, 6, hidden=7, depth=3),
}


def _exact_gain(mem, params, x):
    jac = jax.jacobian(lambda p: mem.apply(p, x))(params)  # leaves [dv, *param shape]
    flat = jnp.concatenate([j.reshape(j.shape[0], -1) for j in jax.tree.leaves(jac)], axis=1)
    return float(jnp.linalg.norm(flat @ flat.T, ord=2))


@pytest.mark.parametrize("name", sorted(MEMORIES))
@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_write_gain_bounds_the_jacobian(x64, name, scale):
    mem = MEMORIES[name]
    for seed in range(3):
        k1, k2 = jax.random.split(jax.random.key(seed))
        params = jax.tree.map(lambda w: scale * w, mem.init(k1, jnp.float64))
        params = jax.tree.map(  # a non-zero output layer (residual memories start at 0)
            lambda w: w + scale * 0.3 * jax.random.normal(k2, w.shape, w.dtype), params)
        x = jax.random.normal(jax.random.fold_in(k2, 1), (mem.dk,), jnp.float64)
        exact, gain = _exact_gain(mem, params, x), float(mem.write_gain(params, x))
        assert gain >= exact * (1 - 1e-12), (gain, exact)
        if name == "linear":
            np.testing.assert_allclose(gain, exact, rtol=1e-12)
        else:  # a bound, not a loose one: within the Frobenius / spectral gap of B_l
            assert gain <= exact * (1 + mem.hidden), (gain, exact)


def test_write_gain_is_exact_with_a_zero_output_layer(x64):
    """At a residual memory's init (W1 = 0) only W1 moves M(x): J J^T = ||s(W2 x)||^2 I."""
    mem = MEMORIES["mlp2-residual"]
    params = mem.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (6,), jnp.float64)
    np.testing.assert_allclose(float(mem.write_gain(params, x)),
                               _exact_gain(mem, params, x), rtol=1e-12)


@pytest.mark.parametrize("normalized", [True, False])
def test_titans_rule_mlp_memory_stays_bounded_only_when_normalized(x64, normalized):
    """Titans' rule (momentum + retention, no DGD) on a 2-layer residual MLP memory, l2 targets,
    large steps and a grown output layer: each write moves M(k) by less than its error when the
    step is normalised by the whole memory's gain; per-token steps eta without it diverge."""
    mem = nm.MLPMemory(8, 8, hidden=16)
    level = nm.Level(mem, "l2", nm.Rule(momentum=True, normalized=normalized))
    B, T, H = 1, 300, 1
    ks = jax.random.split(jax.random.key(0), 4)
    unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    k = unit(jax.random.normal(ks[0], (B, T, H, 8), jnp.float64))
    v = unit(jax.random.normal(ks[1], (B, T, H, 8), jnp.float64))
    params = mem.init(ks[2], jnp.float64)
    params["W1"] = 2.0 * jax.random.normal(ks[3], params["W1"].shape, jnp.float64) / 4.0
    state = nm.broadcast_state(nm.broadcast_state(nm.MemoryState(
        params, jax.tree.map(jnp.zeros_like, params)), H), B)
    full = lambda x: jnp.full((B, T, H), x, jnp.float64)
    gates = nm.Gates(full(1.0), full(1.0), full(0.5))  # eta = 1, no decay, momentum 0.5
    _, final = nm.apply(level, state, k, k, v, gates, chunk_size=1, path="oracle")
    size = max(float(jnp.abs(w).max()) for w in jax.tree.leaves(final.params))
    if normalized:
        assert np.isfinite(size) and size < 50.0, size
    else:
        assert not np.isfinite(size) or size > 1e6, size
