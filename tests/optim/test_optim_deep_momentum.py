"""DMGD (paper §2): an MLP momentum memory along the last axis, linear cost."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optim_helpers import assert_close, randn, run_updates

import nested_jax.optim as no

SHAPES = {"w": (6, 5), "stack": (2, 3, 5), "b": (5,), "s": ()}


def _grads(n, seed=0):
    return [
        {k: randn(s, 10 * seed + 4 * j + i) for i, (k, s) in enumerate(SHAPES.items())}
        for j in range(n)
    ]


def test_frozen_mlp_is_plain_momentum(x64):
    grads = _grads(5)
    got = run_updates(no.scale_by_deep_momentum(0.9, 1.0, 0.0, hidden=4), grads)
    assert_close(got, run_updates(optax.trace(0.9), grads), rtol=1e-15)


def _reference_memory(b, w_in, w_out, g):
    """The memory written out by hand: b + tanh((g / rms(g)) W_in) W_out, per row."""
    rms = jnp.sqrt(jnp.mean(g**2, axis=-1, keepdims=True))
    return b + jnp.tanh((g / rms) @ w_in) @ w_out


@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_inner_step_is_gd_on_the_memory_objective(x64, objective):
    alpha, eta, eta_mlp = 0.8, 0.7, 0.3
    tx = no.scale_by_deep_momentum(alpha, eta, eta_mlp, hidden=4, objective=objective)
    g0, g1 = randn((2, 6, 5), 1)
    state = tx.init(g0)
    _, state = tx.update(g0, state)  # W_out != 0 from here on
    phi = (state.bias, state.w_in, state.w_out)

    def loss(phi):  # independent transcription of the objective
        out = _reference_memory(*phi, g1)
        return -jnp.sum(out * g1) if objective == "dot" else 0.5 * jnp.sum((out - g1) ** 2)

    grads = jax.grad(loss)(phi)
    steps = (eta, eta_mlp / 6, eta_mlp / 6)  # shared weights: mean over the 6 rows
    expect = [alpha * p - s * d for p, s, d in zip(phi, steps, grads, strict=True)]
    u, state = tx.update(g1, state)
    for got, want in zip((state.bias, state.w_in, state.w_out), expect, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    # The update is the new memory read at the current gradient: W += m_{i+1}(u_i).
    np.testing.assert_allclose(u, _reference_memory(*expect, g1), rtol=1e-12, atol=1e-15)


def test_l2_inner_step_decreases_the_objective(x64):
    g = randn((8, 5), 2)
    tx = no.scale_by_deep_momentum(1.0, 0.1, 0.1, hidden=8, objective="l2")
    state = tx.init(g)
    for k in range(3):
        gk = g + 0.1 * k
        before = no.deep_momentum_loss((state.bias, state.w_in, state.w_out), gk, "l2")
        _, state = tx.update(gk, state)
        after = no.deep_momentum_loss((state.bias, state.w_in, state.w_out), gk, "l2")
        assert after < before


def test_mlp_part_learns_to_recall_the_gradient_direction(x64):
    # With the bias frozen (eta=0) only the shared MLP can remember: after a
    # stream of gradients with a fixed row pattern it outputs that pattern.
    pattern = randn((1, 5), 3)
    scales = 1.0 + jnp.asarray(np.random.default_rng(4).uniform(size=(16, 1)))
    tx = no.scale_by_deep_momentum(0.9, 0.0, 0.5, hidden=8)
    state = tx.init(scales * pattern)
    for k in range(20):
        u, state = tx.update(scales * pattern * (1 + 0.05 * k), state)
    cos = jnp.sum(u * pattern, -1) / (jnp.linalg.norm(u, axis=-1) * jnp.linalg.norm(pattern))
    assert bool(jnp.all(cos > 0.99))


def test_shared_mlp_is_equivariant_to_row_permutations(x64):
    g = randn((3, 7, 5), 5)
    perm = np.random.default_rng(6).permutation(7)
    tx = no.scale_by_deep_momentum(hidden=4)
    out = run_updates(tx, [g, 2 * g])
    out_p = run_updates(tx, [g[:, perm], 2 * g[:, perm]])
    np.testing.assert_allclose(out_p[-1], out[-1][:, perm], rtol=1e-12)


def test_state_and_flops_are_linear_in_the_parameter_count():
    hidden = 8
    tx = no.scale_by_deep_momentum(hidden=hidden)

    def flops(rows):
        g = jnp.ones((rows, 64))
        lowered = jax.jit(tx.update).lower(g, tx.init(g))
        return lowered.compile().cost_analysis()["flops"]

    f1, f4 = flops(256), flops(1024)
    assert 3.8 < f4 / f1 < 4.2  # 4x the rows -> 4x the work
    assert f1 / (256 * 64) < 20 * hidden  # O(H) flops per parameter
    state = tx.init(jnp.ones((1024, 64)))
    assert state.w_in.shape == (64, hidden) and state.w_out.shape == (hidden, 64)
    assert state.bias.shape == (1024, 64)
