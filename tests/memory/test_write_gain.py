"""Rule.normalized: normalised LMS for the whole memory (decisions #19, TitansLM).

``memory.write_gain(params, x)`` must bound ||J J^T|| (J = d M(x) / d all matrices): that is
what keeps a write from overshooting.  Checked against the exact Jacobian in float64, then
the property it buys: a Titans-rule MLP memory stays bounded where per-token steps without it
blow up, and (decisions #30) a chunk's writes, which all take their error at the same boundary
state, stay bounded together: their steps are normalised by the gain the chunk has spent.
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


def _grown_mlp_state_size(normalized, T, eta, alpha, beta, chunk_size, path):
    """The largest entry of a Titans-rule 2-layer residual MLP memory (l2 targets, unit keys and
    values, a grown output layer) after T tokens with constant gates."""
    mem = nm.MLPMemory(8, 8, hidden=16)
    level = nm.Level(mem, "l2", nm.Rule(momentum=True, normalized=normalized))
    B, H = 1, 1
    ks = jax.random.split(jax.random.key(0), 4)
    unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    k = unit(jax.random.normal(ks[0], (B, T, H, 8), jnp.float64))
    v = unit(jax.random.normal(ks[1], (B, T, H, 8), jnp.float64))
    params = mem.init(ks[2], jnp.float64)
    params["W1"] = 2.0 * jax.random.normal(ks[3], params["W1"].shape, jnp.float64) / 4.0
    state = nm.broadcast_state(nm.broadcast_state(nm.MemoryState(
        params, jax.tree.map(jnp.zeros_like, params)), H), B)
    full = lambda x: jnp.full((B, T, H), x, jnp.float64)
    gates = nm.Gates(full(eta), full(alpha), full(beta))
    _, final = nm.apply(level, state, k, k, v, gates, chunk_size=chunk_size, path=path)
    return max(float(jnp.abs(w).max()) for w in jax.tree.leaves(final.params))


@pytest.mark.parametrize("normalized", [True, False])
def test_titans_rule_mlp_memory_stays_bounded_only_when_normalized(x64, normalized):
    """Titans' rule (momentum + retention, no DGD) on a 2-layer residual MLP memory, l2 targets,
    large steps and a grown output layer: each write moves M(k) by less than its error when the
    step is normalised by the whole memory's gain; per-token steps eta without it diverge."""
    # eta = 1, no decay, momentum 0.5
    size = _grown_mlp_state_size(normalized, 300, 1.0, 1.0, 0.5, 1, "oracle")
    if normalized:
        assert np.isfinite(size) and size < 50.0, size
    else:
        assert not np.isfinite(size) or size > 1e6, size


def test_chunk_steps_spend_less_than_one_write(x64):
    """Level.chunk_steps: one token alone is normalised LMS, eta / (1 + eta G); a chunk's steps
    satisfy sum_t step_t G_t < 1 whatever the keys and etas (so C stale writes cannot add up
    to an overshoot), and token t's step reads no later token (causal)."""
    mem = nm.MLPMemory(6, 6, hidden=8)
    level = nm.Level(mem, "l2", nm.Rule(momentum=True, normalized=True))
    ks = jax.random.split(jax.random.key(0), 4)
    params = mem.init(ks[0], jnp.float64)
    params["W1"] = jax.random.normal(ks[1], params["W1"].shape, jnp.float64)
    k = jax.random.normal(ks[2], (64, 6), jnp.float64)
    eta = jnp.exp(jax.random.normal(ks[3], (64,), jnp.float64))  # steps from ~0.1 to ~10
    gain = jax.vmap(mem.write_gain, in_axes=(None, 0))(params, k)
    one, _ = level.chunk_steps(params, k[:1], eta[:1])
    np.testing.assert_allclose(one[0], eta[0] / (1 + eta[0] * gain[0]), rtol=1e-14)
    steps, spent = level.chunk_steps(params, k, eta)
    total = float(jnp.sum(steps * gain))
    assert 0.9 < total < 1.0, total  # large etas: close to, never past, one full write
    np.testing.assert_allclose(total, 1 - 1 / (1 + spent), rtol=1e-12)  # the telescoping sum
    head, _ = level.chunk_steps(params, k[:20], eta[:20])
    np.testing.assert_array_equal(head, steps[:20])
    mid, _ = level.chunk_steps(params, k[20:], eta[20:], seen=jnp.sum(eta[:20] * gain[:20]))
    np.testing.assert_allclose(mid, steps[20:], rtol=1e-12)  # the streaming carry


def test_titans_rule_mlp_memory_stays_bounded_in_chunks_of_64(x64):
    """TitansLM's setting (chunks of 64, momentum 0.9, retention 0.99, unit keys): the chunk's
    64 writes all read the boundary state.  Normalised per token alone they summed to ~64
    overshooting writes and this state reached ~1e16 in 1024 tokens (measured before decisions
    #30); normalised by the chunk's spent gain it stays at the size of the per-token run."""
    sizes = {C: _grown_mlp_state_size(True, 1024, 0.1, 0.99, 0.9, C, path)
             for C, path in ((1, "oracle"), (64, "dual"))}
    assert np.isfinite(sizes[64]) and sizes[64] < 2 * sizes[1], sizes
