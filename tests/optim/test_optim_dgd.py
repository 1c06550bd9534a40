"""DGD for linear layers (paper §2; decision #5): the update takes the layer inputs."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from optim_helpers import assert_close, randn

import nested_jax.optim as no


def _layer_grads(w, x, target):
    """Gradient of a mean-reduced l2 loss through the linear layer y = x W."""
    loss = lambda w: 0.5 * jnp.mean(jnp.sum((x @ w - target) ** 2, axis=-1))
    return jax.grad(loss)(w), (x @ w - target) / x.shape[0]  # G and dL/dy


def _step(tx, g, w, x):
    @jax.jit
    def step(g, w, x):
        u, _ = tx.update(g, tx.init(w), w, inputs=x)
        return optax.apply_updates(w, u)

    return step(g, w, x)


def test_one_input_is_the_papers_formula(x64):
    k1, k2, k3 = 3 * 0, 3 * 0 + 1, 3 * 0 + 2
    w, x, target = (
        randn((5, 3), k1),
        randn((1, 5), k2),
        randn((1, 3), k3),
    )
    g, u = _layer_grads(w, x, target)
    eta = 0.3
    eta_ = eta / (1 + eta * jnp.sum(x**2))
    # Paper (W acting as W x): W (I - eta' x x^T) - eta' u x^T; here W is its transpose.
    paper = (w.T @ (jnp.eye(5) - eta_ * x.T @ x) - eta_ * u.T @ x).T
    np.testing.assert_allclose(_step(no.dgd(eta), g, w, x), paper, rtol=1e-13)


@pytest.mark.parametrize("n", [3, 11])  # Woodbury (N <= D_in) and direct (N > D_in) paths
def test_batch_step_is_the_exact_proximal_step(x64, n):
    k1, k2, k3 = 3 * n, 3 * n + 1, 3 * n + 2
    d_in, d_out, eta = 6, 4, 0.2
    w, x, target = (
        randn((d_in, d_out), k1),
        randn((n, d_in), k2),
        randn((n, d_out), k3),
    )
    g, _ = _layer_grads(w, x, target)

    def prox(v):  # <W, G> + 1/(2N) ||X W||^2 + 1/(2 eta) ||W - W_t||^2
        v = v.reshape(w.shape)
        return (
            jnp.sum(v * g)
            + 0.5 * jnp.mean(jnp.sum((x @ v) ** 2, -1))
            + jnp.sum((v - w) ** 2) / (2 * eta)
        )

    hess = jax.jit(jax.hessian(prox))(jnp.zeros(w.size))
    argmin = jnp.linalg.solve(hess, -jax.jit(jax.grad(prox))(jnp.zeros(w.size))).reshape(w.shape)
    np.testing.assert_allclose(_step(no.dgd(eta), g, w, x), argmin, rtol=1e-12)


def test_zero_surprise_forgets_only_along_the_input(x64):
    w = randn((4, 3), 1)
    x = jnp.array([[1.0, 2.0, 0.0, -1.0]])
    ortho = jnp.array([[2.0, -1.0, 5.0, 0.0]])  # x . ortho = 0
    eta = 0.5
    w_new = _step(no.dgd(eta), jnp.zeros_like(w), w, x)
    np.testing.assert_allclose(x @ w_new, x @ w / (1 + eta * 6.0), rtol=1e-13)
    np.testing.assert_allclose(ortho @ w_new, ortho @ w, rtol=1e-13)


def test_leaves_without_inputs_take_a_plain_gradient_step(x64):
    params = {"kernel": randn((4, 3), 2), "bias": jnp.ones(3)}
    grads = jax.tree.map(lambda p: 0.1 * p + 1.0, params)
    x = randn((2, 4), 3)
    u, _ = no.dgd(0.1).update(
        grads, no.dgd(0.1).init(params), params, inputs={"kernel": x, "bias": None}
    )
    sgd, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(params), params)
    np.testing.assert_allclose(u["bias"], sgd["bias"], rtol=1e-15)
    assert not np.allclose(u["kernel"], sgd["kernel"])
    none, _ = no.dgd(0.1).update(grads, no.dgd(0.1).init(params), params)
    assert_close(none, sgd, rtol=1e-15)


def test_stacked_weights_and_example_axes(x64):
    w = randn((3, 5, 2), 4)  # [L, D_in, D_out]
    x = randn((3, 2, 4, 5), 5)  # [L, B, T, D_in]
    g = randn(w.shape, 6)
    got = _step(no.dgd(0.1), g, w, x)
    for i in range(3):
        np.testing.assert_allclose(
            got[i], _step(no.dgd(0.1), g[i], w[i], x[i].reshape(8, 5)), rtol=1e-13
        )


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_sharded_kernel_stays_sharded(axis_type):
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    w = jax.device_put(randn((16, 8), 7), NamedSharding(mesh, P("fsdp", None)))
    x = randn((4, 16), 8)
    g = jnp.ones((16, 8))
    tx = no.dgd(0.1)

    @jax.jit
    def step(w, g, x):
        u, _ = tx.update(g, tx.init(w), w, inputs=x)
        return optax.apply_updates(w, u)

    out = step(w, g, x)
    assert out.sharding.is_equivalent_to(w.sharding, 2)
    np.testing.assert_allclose(out, step(np.asarray(w), g, x), rtol=1e-5, atol=1e-6)


def test_inputs_through_flax_nnx_optimizer(x64):
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    x = randn((5, 4), 9)
    loss = lambda m: jnp.mean(m(x) ** 2)
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grads = nnx.grad(loss)(model)
    inputs = {"kernel": x, "bias": None}
    optimizer = nnx.Optimizer(model, no.dgd(0.1), wrt=nnx.Param)
    optimizer.update(model, grads, inputs=inputs)
    u, _ = no.dgd(0.1).update(
        nnx.to_pure_dict(grads), no.dgd(0.1).init(before), before, inputs=inputs
    )
    assert_close(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)), optax.apply_updates(before, u), rtol=1e-13
    )


def test_bad_inputs_raise_clear_errors():
    params = {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}
    tx = no.dgd(0.1)
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"inputs for parameter \['kernel'\].*D_in=4.*\(5, 7\)"):
        tx.update(params, state, params, inputs={"kernel": jnp.ones((5, 7)), "bias": None})
    with pytest.raises(ValueError, match=r"\['bias'\].*only for linear weights.*None"):
        tx.update(params, state, params, inputs={"kernel": None, "bias": jnp.ones((2, 3))})
    with pytest.raises(
        ValueError, match="`inputs` must be a tree with the structure of the params"
    ):
        tx.update(params, state, params, inputs={"kernel": jnp.ones((2, 4))})
    with pytest.raises(ValueError, match="`params` is required"):
        tx.update(params, state, None, inputs={"kernel": jnp.ones((2, 4)), "bias": None})


def test_stacked_solves_next_to_matmuls_do_not_deadlock():
    # Regression: batched (vmapped) LAPACK solves next to concurrent matmuls hung
    # XLA:CPU on a 2-core machine (jaxlib's kernels wait on the pool they run in).
    # Run in a subprocess so that a hang fails the test instead of the session.
    code = (
        "import jax, jax.numpy as jnp, nested_jax.optim as no\n"
        "w = {f'w{i}': jnp.full((6, 256, 256), 0.01) for i in range(4)}\n"
        "x = {f'w{i}': jnp.full((6, 256, 256), 0.1) for i in range(4)}\n"
        "tx = no.scale_by_dgd(1e-3)\n"
        "f = jax.jit(lambda g, s, p, kw: tx.update(g, s, p, **kw))\n"
        "jax.block_until_ready(f(w, tx.init(w), w, {'inputs': x}))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)
