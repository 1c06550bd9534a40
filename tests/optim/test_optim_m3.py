"""M3 (paper Algorithm 1) against a line-by-line transcription of the algorithm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optim_helpers import randn, run_updates

import nested_jax.optim as no

F = 3  # slow chunk length in these tests


def _grads(n, shape=(4, 6), seed=0):
    return list(randn((n,) + shape, seed))


def algorithm_1(
    grads, *, lr, beta1, beta2, beta3, alpha, eps, f, moments, precondition, ns=no.orthogonalize
):
    """Algorithm 1, with the slow memory fed from the stored gradient history.

    ``precondition="after_ns"`` divides by ``D = sqrt(V + eps)`` after Newton–Schulz,
    as printed; ``"before_ns"`` orthogonalizes ``M / D`` (``M2`` with the ``D`` of
    its chunk boundary), the default reading of nested_jax/optim/m3.py.
    """
    m1 = m2 = v = o2 = 0.0
    updates = []
    for t, g in enumerate(grads, start=1):
        if moments == "cumulative":
            m1, v = m1 + beta1 * g, v + beta2 * g**2
            v_hat = v
        else:
            m1, v = beta1 * m1 + (1 - beta1) * g, beta2 * v + (1 - beta2) * g**2
            v_hat = v / (1 - beta2**t)
        d = jnp.sqrt(v_hat + eps)
        if t > 1 and (t - 1) % f == 0:  # first step of a new chunk: fold in the previous one
            prev = grads[t - 1 - f : t - 1]
            if moments == "cumulative":
                m2 = m2 + beta3 * sum(prev)
            else:
                m2 = beta3 * m2 + (1 - beta3) * sum(prev) / f
            o2 = ns(m2) if precondition == "after_ns" else ns(m2 / d)
        if precondition == "after_ns":
            updates.append(-lr * (ns(m1) + alpha * o2) / d)
        else:
            updates.append(-lr * (ns(m1 / d) + alpha * o2))
    return updates


HP = {"beta1": 0.9, "beta2": 0.99, "beta3": 0.8, "alpha": 0.7, "eps": 1e-6}


@pytest.mark.parametrize("precondition", ["before_ns", "after_ns"])
@pytest.mark.parametrize("moments", ["ema", "cumulative"])
def test_m3_equals_algorithm_1(x64, moments, precondition):
    grads = _grads(3 * F + 2)
    params = jnp.zeros_like(grads[0])
    tx = no.m3(1e-2, **HP, every=F, moments=moments, precondition=precondition)
    got = run_updates(tx, grads, params)
    ref = algorithm_1(grads, lr=1e-2, f=F, moments=moments, precondition=precondition, **HP)
    for k, (a, b) in enumerate(zip(got, ref, strict=True)):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14, err_msg=f"step {k + 1}")


def test_slow_memory_only_sees_finished_chunks(x64):
    grads = _grads(3 * F)
    tx = no.scale_by_m3(**HP, every=F)
    update = jax.jit(tx.update)

    def slow_outputs(grads):
        state, o2 = tx.init(grads[0]), []
        for g in grads:
            _, state = update(g, state)
            o2.append(state.o2)
        return o2

    base = slow_outputs(grads)
    # Perturb a gradient in the middle of chunk 1 (steps F+1 .. 2F).
    changed = slow_outputs(grads[: F + 1] + [grads[F + 1] + 1.0] + grads[F + 2 :])
    for t in range(2 * F):  # O2 is unchanged until chunk 1 is finished ...
        np.testing.assert_array_equal(changed[t], base[t])
    assert not np.allclose(changed[2 * F], base[2 * F])  # ... and changes right after.
    for t in range(F):  # O2 is constant within a chunk.
        np.testing.assert_array_equal(base[F + t], base[F])


def test_alpha_zero_ignores_the_slow_memory(x64):
    grads = _grads(2 * F + 1)
    a = run_updates(no.scale_by_m3(**{**HP, "alpha": 0.0}, every=F), grads)
    b = run_updates(no.scale_by_m3(**{**HP, "alpha": 0.0, "beta3": 0.1}, every=F), grads)
    np.testing.assert_array_equal(a[-1], b[-1])


def test_stacked_weights_are_orthogonalized_per_layer(x64):
    stack = randn((2 * F, 2, 4, 6), 1)  # steps x [L, D, F]
    tx = no.scale_by_m3(**HP, every=F, weight_dimension_numbers=no.matrix_dimension_numbers)
    together = run_updates(tx, list(stack))
    per_layer = [run_updates(no.scale_by_m3(**HP, every=F), list(stack[:, i])) for i in range(2)]
    np.testing.assert_allclose(together[-1], jnp.stack([p[-1] for p in per_layer]), rtol=1e-12)


def test_params_of_any_rank_work_by_the_matrix_rule(x64):
    """No dimension numbers: stacked weights are orthogonalized per matrix (last two
    axes), vectors and scalars skip Newton–Schulz (nested_jax/optim/newton_schulz.py,
    matrix_dimension_numbers)."""
    params = {
        "stack": jnp.zeros((2, 4, 6)),
        "w": jnp.zeros((4, 6)),
        "b": jnp.zeros(6),
        "s": jnp.zeros(()),
    }
    grads = [jax.tree.map(lambda p, k=k: randn(p.shape, k), params) for k in range(2 * F)]
    got = run_updates(no.m3(1e-2, **HP, every=F), grads, params)
    explicit = no.m3(1e-2, **HP, every=F, weight_dimension_numbers=no.matrix_dimension_numbers)
    for a, b in zip(got, run_updates(explicit, grads, params), strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    # First step of a vector: M1 = (1 - beta1) g, V = g^2 (debiased), O2 = 0, no NS.
    g = grads[0]["b"]
    want = -1e-2 * (1 - HP["beta1"]) * g / jnp.sqrt(g**2 + HP["eps"])
    np.testing.assert_allclose(got[0]["b"], want, rtol=1e-13)
