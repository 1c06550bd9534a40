"""Special cases of the engine equal hand-written recurrences from the literature (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nested_jax import memory as nm
from tests.memory.helpers import inputs

D = 6


def _run(level, st, q, k, v, g, path, C):
    o, final = nm.apply(level, st, q, k, v, g, chunk_size=C, path=path)
    return np.asarray(o), final


def _zero_state(level, B, H):
    st = nm.broadcast_state(nm.init_state(level, jax.random.key(0), H, jnp.float64), B)
    return jax.tree.map(jnp.zeros_like, st)


def _hand_scan(step, S0, xs):
    """Plain-Python loop (not lax.scan), so the reference shares no code with the engine."""
    S, outs = S0, []
    for x in zip(*xs, strict=True):
        S, o = step(S, *x)
        outs.append(o)
    return np.stack(outs), S


@pytest.mark.parametrize("path,C", [("oracle", 1), ("dual", 1)])
def test_dot_gd_no_decay_is_causal_linear_attention(x64, path, C):
    """dot objective + GD, alpha = 1: M_t = M_{t-1} + eta_t v_t k_t^T, o_t = sum_{i<=t} eta_i v_i (k_i.q_t)."""
    level = nm.Level(nm.LinearMemory(D, D), "dot", nm.GD)
    _, q, k, v, g = inputs(level, jax.random.key(1), B=2, T=23, H=2)
    g = g._replace(alpha=jnp.ones_like(g.alpha))
    o, _ = _run(level, _zero_state(level, 2, 2), q, k, v, g, path, C)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) * jnp.tril(jnp.ones((23, 23)))[None, None]
    ref = jnp.einsum("bhts,bsh,bshd->bthd", scores, g.eta, v)
    np.testing.assert_allclose(o, ref, rtol=0, atol=1e-13)


def _per_head(x, b, h):
    return [np.asarray(t[b, :, h]) for t in x]


@pytest.mark.parametrize("path,C", [("oracle", 1), ("chunked", 1), ("dual", 1)])
def test_l2_gd_is_the_delta_rule(x64, path, C):
    """l2 + GD: S_t = S_{t-1}(I - b_t k_t k_t^T) + b_t v_t k_t^T (DeltaNet), o_t = S_t q_t."""
    level = nm.Level(nm.LinearMemory(D, D), "l2", nm.GD)
    st, q, k, v, g = inputs(level, jax.random.key(2), B=1, T=19, H=1)
    g = g._replace(alpha=jnp.ones_like(g.alpha))
    o, final = _run(level, st, q, k, v, g, path, C)
    qs, ks, vs, bs = _per_head((q, k, v, g.eta), 0, 0)

    def step(S, q_t, k_t, v_t, b_t):
        S = S @ (np.eye(D) - b_t * np.outer(k_t, k_t)) + b_t * np.outer(v_t, k_t)
        return S, S @ q_t

    ref, S = _hand_scan(step, np.asarray(st.params["W"][0, 0]), (qs, ks, vs, bs))
    np.testing.assert_allclose(o[0, :, 0], ref, rtol=0, atol=1e-13)
    np.testing.assert_allclose(final.params["W"][0, 0], S, rtol=0, atol=1e-13)


@pytest.mark.parametrize("path,C", [("oracle", 1), ("dual", 1)])
def test_l2_gd_with_gates_is_the_gated_delta_rule(x64, path, C):
    """l2 + GD + retention gate: S_t = S_{t-1}(a_t I - b_t k_t k_t^T) + b_t v_t k_t^T.

    This is the gated delta rule with the decay outside the rank-1 term (Longhorn / DGD form);
    Gated DeltaNet's S_{t-1} a_t (I - b_t k k^T) is the same with b_t -> b_t / a_t on the k k^T
    term only, so it is NOT an instance; the test pins the form we implement.
    """
    level = nm.Level(nm.LinearMemory(D, D), "l2", nm.GD)
    st, q, k, v, g = inputs(level, jax.random.key(3), B=1, T=19, H=1)
    o, final = _run(level, st, q, k, v, g, path, C)
    qs, ks, vs, bs, as_ = _per_head((q, k, v, g.eta, g.alpha), 0, 0)

    def step(S, q_t, k_t, v_t, b_t, a_t):
        S = S @ (a_t * np.eye(D) - b_t * np.outer(k_t, k_t)) + b_t * np.outer(v_t, k_t)
        return S, S @ q_t

    ref, S = _hand_scan(step, np.asarray(st.params["W"][0, 0]), (qs, ks, vs, bs, as_))
    np.testing.assert_allclose(o[0, :, 0], ref, rtol=0, atol=1e-13)
    np.testing.assert_allclose(final.params["W"][0, 0], S, rtol=0, atol=1e-13)


@pytest.mark.parametrize("C", [1, 5])
def test_dgd_with_momentum_matches_hope_eq88(x64, C):
    """decisions.md #6 on a linear memory, written out with chunk-boundary (stale) gradients:
    S_t = beta_t S_{t-1} - eta_t (M_b k_t - v_t) k_t^T;  M_t = M_{t-1}(alpha_t I - eta_t k_t k_t^T) + S_t.
    """
    level = nm.Level(nm.LinearMemory(D, D), "l2", nm.DGD)
    st, q, k, v, g = inputs(level, jax.random.key(4), B=1, T=17, H=1)
    o, final = _run(level, st, q, k, v, g, "dual", C)
    qs, ks, vs, es, as_, bs = _per_head((q, k, v, *g), 0, 0)
    M, S = np.asarray(st.params["W"][0, 0]), np.asarray(st.mom["W"][0, 0])
    ref = []
    for t in range(17):
        if t % C == 0:
            Mb = M
        S = bs[t] * S - es[t] * np.outer(Mb @ ks[t] - vs[t], ks[t])
        M = M @ (as_[t] * np.eye(D) - es[t] * np.outer(ks[t], ks[t])) + S
        ref.append(M @ qs[t])
    np.testing.assert_allclose(o[0, :, 0], np.stack(ref), rtol=0, atol=1e-13)
    np.testing.assert_allclose(final.params["W"][0, 0], M, rtol=0, atol=1e-13)
    np.testing.assert_allclose(final.mom["W"][0, 0], S, rtol=0, atol=1e-13)


def test_titans_momentum_and_retention(x64):
    """Titans eq. 10-13 on a 2-layer MLP memory: S_t = beta S - eta grad l(M_{t-1}); M_t = alpha M + S."""
    mem = nm.MLPMemory(D, D, hidden=10)
    level = nm.Level(mem, "l2", nm.TITANS)
    st, q, k, v, g = inputs(level, jax.random.key(5), B=1, T=11, H=1)
    o, _ = _run(level, st, q, k, v, g, "dual", 1)
    P = jax.tree.map(lambda x: x[0, 0], st.params)
    S = jax.tree.map(lambda x: x[0, 0], st.mom)
    qs, ks, vs, es, as_, bs = _per_head((q, k, v, *g), 0, 0)
    loss = lambda p, kt, vt: 0.5 * jnp.sum((kt + p["W1"] @ jax.nn.silu(p["W2"] @ kt) - vt) ** 2)
    ref = []
    for t in range(11):
        gr = jax.grad(loss)(P, ks[t], vs[t])
        S = jax.tree.map(lambda s, gg: bs[t] * s - es[t] * gg, S, gr)
        P = jax.tree.map(lambda p, s: as_[t] * p + s, P, S)
        ref.append(qs[t] + P["W1"] @ jax.nn.silu(P["W2"] @ qs[t]))
    np.testing.assert_allclose(o[0, :, 0], np.stack(ref), rtol=0, atol=1e-13)


def test_dgd_all_layers_uses_sherman_morrison_step(x64):
    """With dgd_all_layers, eta' = eta / (1 + eta ||x||^2): for unit k, eta / (1 + eta)."""
    level = nm.Level(nm.LinearMemory(D, D), "dot", nm.Rule(momentum=False, dgd=True, dgd_all_layers=True))
    st, q, k, v, g = inputs(level, jax.random.key(6), B=1, T=1, H=1)
    g = g._replace(alpha=jnp.ones_like(g.alpha))
    _, final = _run(level, st, q, k, v, g, "oracle", 1)
    e = float(g.eta[0, 0, 0])
    ep = e / (1 + e)  # ||k|| = 1
    kt, vt = np.asarray(k[0, 0, 0]), np.asarray(v[0, 0, 0])
    M0 = np.asarray(st.params["W"][0, 0])
    ref = M0 @ (np.eye(D) - ep * np.outer(kt, kt)) + ep * np.outer(vt, kt)
    np.testing.assert_allclose(final.params["W"][0, 0], ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("path,C", [("oracle", 1), ("dual", 1), ("dual", 4)])
def test_reflect_write_flips_the_memory_along_its_key(x64, path, C):
    """Rule.reflect: eta' = 2 eta / (1 + eta ||k||^2), so with the delta form and a zero target a
    write scales M along a unit k by 1 - eta' (-0.8 at eta = 9: a reflection; erasure at
    eta = 1) and leaves M unchanged on k's orthogonal complement."""
    rule = nm.Rule(momentum=False, dgd=True, dgd_all_layers=True, delta=True, reflect=True)
    level = nm.Level(nm.LinearMemory(D, D), "l2", rule)
    st, q, k, v, g = inputs(level, jax.random.key(7), B=1, T=3, H=1)
    g = g._replace(alpha=jnp.ones_like(g.alpha), eta=jnp.full_like(g.eta, 9.0))
    v = jnp.zeros_like(v)
    _, final = _run(level, st, q, k, v, g, path, C)
    M = np.asarray(st.params["W"][0, 0])
    for kt in np.asarray(k[0, :, 0]):  # the same hand recurrence, token by token
        M = M - 1.8 * np.outer(M @ kt, kt)
    np.testing.assert_allclose(final.params["W"][0, 0], M, rtol=0, atol=1e-13)
    k0 = np.asarray(k[0, 0, 0])
    one = _run(level, st, q[:, :1], k[:, :1], v[:, :1], jax.tree.map(lambda a: a[:, :1], g),
               path, 1)[1].params["W"][0, 0]
    W0 = np.asarray(st.params["W"][0, 0])
    np.testing.assert_allclose(one @ k0, -0.8 * (W0 @ k0), rtol=0, atol=1e-13)
    perp = np.linalg.svd(k0[None])[2][1:]  # an orthonormal basis of k0's complement
    np.testing.assert_allclose(one @ perp.T, W0 @ perp.T, rtol=0, atol=1e-13)
