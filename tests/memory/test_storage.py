"""Storage properties of a memory level (float64, engine level): what a written memory recalls.

Matching the oracle is not enough (decisions #19): these tests check that writes *store*.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nested_jax import memory as nm

D = 16


def _write(level, keys_NxD, vals_NxD, eta, alpha=1.0, beta=0.0, chunk_size=1, path="oracle"):
    """Write N pairs into a zero-initialised one-head memory; return its final params."""
    N = keys_NxD.shape[0]
    st = nm.broadcast_state(nm.init_state(level, jax.random.key(0), 1, jnp.float64), 1)
    st = nm.MemoryState(jax.tree.map(jnp.zeros_like, st.params), st.mom)
    seq = lambda a: jnp.asarray(a)[None, :, None, :]
    full = lambda x: jnp.full((1, N, 1), x, jnp.float64)
    gates = nm.Gates(full(eta), full(alpha), full(beta))
    _, final = nm.apply(level, st, seq(keys_NxD), seq(keys_NxD), seq(vals_NxD), gates,
                        chunk_size=chunk_size, path=path)
    return jax.tree.map(lambda x: x[0, 0], final.params)


def _recall_error(level, params, keys_NxD, vals_NxD):
    out = jax.vmap(level.memory.apply, in_axes=(None, 0))(params, jnp.asarray(keys_NxD))
    return float(jnp.max(jnp.abs(out - vals_NxD)))


def _pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    keys = np.linalg.qr(rng.normal(size=(D, D)))[0][:n]  # orthonormal rows
    return keys, rng.normal(size=(n, D))


@pytest.mark.parametrize("n", [1, 5, D])
@pytest.mark.parametrize("rule,path,chunk", [
    (nm.GD, "oracle", 1),  # the textbook delta rule, W <- W - (W k - v) k^T
    (nm.Rule(momentum=False, dgd=True, delta=True), "dual", 7),  # delta-form DGD, any chunk
    (nm.Rule(momentum=False, dgd=True, delta=True), "oracle", 1),
])
def test_delta_rule_stores_orthonormal_pairs_exactly(x64, n, rule, path, chunk):
    level = nm.Level(nm.LinearMemory(D, D), "l2", rule)
    keys, vals = _pairs(n)
    params = _write(level, keys, vals, eta=1.0, chunk_size=chunk, path=path)
    assert _recall_error(level, params, keys, vals) < 1e-12


def test_delta_form_overwrites_a_key_where_plain_dgd_reflects(x64):
    """Writing (k, v1) then (k, v2) at eta = 1: the delta form recalls v2 exactly; DGD with the
    full l2 gradient decays W k twice (W (I - 2 k k^T)) and recalls v2 - v1 instead."""
    keys, vals = _pairs(2)
    k2, v2 = np.stack([keys[0], keys[0]]), vals
    delta = nm.Level(nm.LinearMemory(D, D), "l2", nm.Rule(momentum=False, dgd=True, delta=True))
    plain = nm.Level(nm.LinearMemory(D, D), "l2", nm.Rule(momentum=False, dgd=True))
    out = lambda lvl: np.asarray(lvl.memory.apply(_write(lvl, k2, v2, 1.0), jnp.asarray(keys[0])))
    np.testing.assert_allclose(out(delta), vals[1], atol=1e-12)
    np.testing.assert_allclose(out(plain), vals[1] - vals[0], atol=1e-12)


def test_recall_error_falls_as_eta_grows_with_dgd_and_momentum(x64):
    """DGD + momentum (the delta form), 8 random unit keys: over the stable range the recall
    error of the last-written pairs falls monotonically as the inner step grows."""
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(8, D))
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    vals = rng.normal(size=(8, D))
    level = nm.Level(nm.LinearMemory(D, D), "l2", nm.Rule(momentum=True, dgd=True, delta=True))
    errs = []
    for eta in (0.05, 0.1, 0.2, 0.4, 0.8):
        params = _write(level, keys, vals, eta=eta, beta=0.3, chunk_size=4, path="dual")
        out = jax.vmap(level.memory.apply, in_axes=(None, 0))(params, jnp.asarray(keys))
        errs.append(float(jnp.mean(jnp.sum((out - vals) ** 2, -1))))
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 0.5 * errs[0], errs


def test_delta_linear_is_chunk_size_independent(x64):
    """The delta-form write reads no boundary state, so every chunk size is the same function
    (plain DGD's stale l2 error makes C matter: tests/memory/test_paths.py)."""
    from tests.memory.helpers import inputs, max_diff
    level = nm.Level(nm.LinearMemory(8, 8), "l2", nm.DELTA)
    st, q, k, v, g = inputs(level, jax.random.key(5), T=40)
    ref = nm.apply(level, st, q, k, v, g, chunk_size=1, path="oracle")
    for C in (4, 16, 40):
        assert max_diff(ref, nm.apply(level, st, q, k, v, g, chunk_size=C, path="dual")) < 1e-12


def test_delta_rejects_misuse():
    with pytest.raises(ValueError, match="needs dgd=True"):
        nm.Rule(delta=True)
    with pytest.raises(ValueError, match="objective='l2'"):
        nm.Level(nm.LinearMemory(4, 4), "dot", nm.DELTA)
    with pytest.raises(ValueError, match="dgd_all_layers=True"):
        nm.Level(nm.MLPMemory(4, 4, hidden=8), "l2", nm.Rule(dgd=True, delta=True))
