"""Outer differentiability (decisions.md #4): gradients reach the initial state and every input
through all three paths, the paths agree, they match finite differences, and they are causal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from nested_jax import memory as nm
from nested_jax.memory import dual
from tests.memory.helpers import inputs, max_diff

D = 6
LEVELS = {
    "linear-dgd": nm.Level(nm.LinearMemory(D, D), "l2", nm.DGD),
    "mlp-dgd-self": nm.Level(nm.MLPMemory(D, D, hidden=8), "l2", nm.DGD, self_target=True),
    "mlp-titans-dot-boundary": nm.Level(nm.MLPMemory(D, D, hidden=8), "dot", nm.TITANS, "boundary"),
}


def _objective(level, path, C):
    """A scalar of every output and the final state, with fixed random weights."""

    def f(st, q, k, v, g):
        o, final = nm.apply(level, st, q, k, v, g, chunk_size=C, path=path)
        w = jax.random.normal(jax.random.key(9), o.shape, o.dtype)
        return jnp.sum(w * o) + sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(final))

    return f


@pytest.mark.parametrize("name", list(LEVELS))
def test_gradients_agree_across_paths(x64, name):
    level = LEVELS[name]
    args = inputs(level, jax.random.key(1), B=2, T=13, H=2, eta_scale=0.2)
    grad = lambda path, C: jax.jit(jax.grad(_objective(level, path, C), argnums=(0, 1, 2, 3, 4)))(*args)
    ref = grad("oracle", 1)
    assert max_diff(ref, grad("chunked", 1)) < 1e-11
    assert max_diff(ref, grad("dual", 1)) < 1e-11
    assert max_diff(grad("chunked", 4), grad("dual", 4)) < 1e-11
    for leaf in jax.tree.leaves(ref):  # every input and the initial state get a signal
        assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)


@pytest.mark.parametrize("name", ["linear-dgd", "mlp-dgd-self"])
def test_dual_gradients_match_finite_differences(x64, name):
    level = LEVELS[name]
    args = inputs(level, jax.random.key(2), B=1, T=7, H=1, eta_scale=0.2)
    check_grads(_objective(level, "dual", 3), args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", list(LEVELS))
@pytest.mark.parametrize("path,C", [("dual", 4), ("chunked", 4), ("oracle", 1)])
def test_causality(x64, name, path, C):
    """d o_t / d x_s == 0 exactly for every input x in (q, k, v, gates) and every s > t."""
    level = LEVELS[name]
    st, q, k, v, g = inputs(level, jax.random.key(3), B=1, T=9, H=1, eta_scale=0.2)
    f = lambda q, k, v, g: nm.apply(level, st, q, k, v, g, chunk_size=C, path=path)[0][0, :, 0]
    jac = jax.jacrev(f, argnums=(0, 1, 2, 3))(q, k, v, g)
    T = 9
    future = np.triu(np.ones((T, T), bool), k=1)  # [t, s] with s > t
    for J in jax.tree.leaves(jac):  # [T, dv, 1, T, 1, (d)]
        J = np.abs(np.asarray(J)).reshape(T, J.shape[1], T, -1).sum(axis=(1, 3))
        assert np.all(J[future] == 0.0)
        assert np.any(J[~future] != 0.0)


def test_stop_gradient_ablation(x64):
    """stop_grad: no outer gradient through the update inputs; queries and init still get one."""
    level = nm.Level(nm.LinearMemory(D, D), "l2", nm.DGD, stop_grad=True)
    args = inputs(level, jax.random.key(4), B=1, T=8, H=1)
    gst, gq, gk, gv, gg = jax.grad(_objective(level, "dual", 4), argnums=(0, 1, 2, 3, 4))(*args)
    assert all(np.all(x == 0) for x in jax.tree.leaves((gk, gv, gg)))
    assert np.any(gq != 0) and all(np.any(x != 0) for x in jax.tree.leaves(gst.params))


def _gd_boundary_by_hand(st, q, k, v, g, C, first_order):
    """The CMS rule from its equations, one sequence and head, a Python loop over chunks:
    every token of a chunk reads the boundary W, then W <- (prod alpha) W - sum_i w_i
    (W_b k_i - v_i) k_i^T with w_i = eta_i prod_{l > i} alpha_l and W_b = W, or
    stop_gradient(W) under first_order (decisions.md #29)."""
    W = st.params["W"][0, 0]
    q, k, v = q[0, :, 0], k[0, :, 0], v[0, :, 0]
    eta, alpha = g.eta[0, :, 0], g.alpha[0, :, 0]
    outs = []
    for s in range(0, q.shape[0], C):
        sl = slice(s, s + C)
        outs.append(q[sl] @ W.T)
        Wb = jax.lax.stop_gradient(W) if first_order else W
        a = alpha[sl]
        w = eta[sl] * jnp.array([jnp.prod(a[i + 1:]) for i in range(a.shape[0])])
        err = k[sl] @ Wb.T - v[sl]
        W = jnp.prod(a) * W - (w[:, None] * err).T @ k[sl]
    return jnp.concatenate(outs), W


def test_first_order_keeps_the_forward_and_drops_the_state_derivative(x64):
    """first_order: the outputs and final state are the exact ones; the gradient is that of the
    equations with each step taken at stop_gradient(W) (hand-written loop above, ragged last
    chunk included), and it differs from the exact gradient, which the same loop without the
    stop-gradient reproduces."""
    exact = nm.Level(nm.LinearMemory(D, D), "l2", nm.GD, "boundary")
    first = nm.Level(nm.LinearMemory(D, D), "l2", nm.GD, "boundary", first_order=True)
    st, q, k, v, g = inputs(exact, jax.random.key(5), B=1, T=13, H=1, eta_scale=0.8)
    wo = jax.random.normal(jax.random.key(6), (13, D), jnp.float64)

    def engine(level):
        def f(st, q, k, v, g):
            o, final = nm.apply(level, st, q, k, v, g, chunk_size=4, path="chunked")
            return jnp.sum(wo * o[0, :, 0]) + jnp.sum(jnp.sin(final.params["W"]))
        return f

    def by_hand(fo):
        def f(st, q, k, v, g):
            o, W = _gd_boundary_by_hand(st, q, k, v, g, 4, fo)
            return jnp.sum(wo * o) + jnp.sum(jnp.sin(W))
        return f

    args = (st, q, k, v, g)
    assert abs(engine(first)(*args) - engine(exact)(*args)) == 0.0
    assert abs(by_hand(True)(*args) - engine(first)(*args)) < 1e-13
    grad = lambda f: jax.grad(f, argnums=(0, 1, 2, 3, 4))(*args)
    g_first, g_exact = grad(engine(first)), grad(engine(exact))
    assert max_diff(g_first, grad(by_hand(True))) < 1e-12
    assert max_diff(g_exact, grad(by_hand(False))) < 1e-12
    assert max_diff(g_first, g_exact) > 1e-3


@pytest.mark.parametrize("name", list(LEVELS))
def test_first_order_oracle_and_chunked_agree(x64, name):
    """The per-token oracle and the chunked path (C = 1) give the same first-order gradient for
    every rule (DGD, momentum, self-generated targets, boundary reads)."""
    import dataclasses

    level = dataclasses.replace(LEVELS[name], first_order=True)
    args = inputs(level, jax.random.key(7), B=2, T=9, H=2, eta_scale=0.2)
    grad = lambda path: jax.grad(_objective(level, path, 1), argnums=(0, 1, 2, 3, 4))(*args)
    assert max_diff(grad("oracle"), grad("chunked")) < 1e-11


def test_first_order_refuses_the_matmul_paths_and_auto_picks_chunked():
    level = nm.Level(nm.LinearMemory(D, D), "l2", nm.DGD, first_order=True)
    st, q, k, v, g = inputs(level, jax.random.key(8), B=1, T=4, H=1, dtype=jnp.float32)
    for path in ("dual", "pallas"):
        with pytest.raises(ValueError, match="first_order=True needs path='chunked'"):
            nm.apply(level, st, q, k, v, g, chunk_size=2, path=path)
    assert nm.resolve_path(level, "auto") == "chunked"
    with pytest.raises(ValueError, match="first_order=True needs path='chunked'"):
        dual.run(level, jax.tree.map(lambda x: x[0, 0], st),
                 q[0, :, 0], k[0, :, 0], v[0, :, 0],
                 nm.Gates(*(x[0, :, 0] for x in g)), chunk_size=2)
