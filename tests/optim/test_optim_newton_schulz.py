"""Newton–Schulz output (paper §2 "nonlinear output"): linear momentum + NS == Muon."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib
from optim_helpers import assert_close, randn, run_updates

import nested_jax.optim as no


def _grads(n, shapes, seed=0):
    return [
        {name: randn(s, 10 * seed + 3 * j + i) for i, (name, s) in enumerate(shapes.items())}
        for j in range(n)
    ]


MATRICES = {"wide": (4, 9), "tall": (12, 5), "square": (6, 6)}


def test_momentum_plus_newton_schulz_equals_scale_by_muon(x64):
    grads = _grads(5, MATRICES)
    params = jax.tree.map(jnp.ones_like, grads[0])
    ours = optax.chain(
        no.scale_by_momentum_memory(0.95, 1 - 0.95, nesterov=False, debias=True),
        no.scale_by_newton_schulz(),
    )
    muon_dims = jax.tree.map(lambda _: contrib.MuonDimensionNumbers(), params)
    ref = contrib.scale_by_muon(nesterov=False, weight_dimension_numbers=muon_dims)
    assert_close(run_updates(ours, grads, params), run_updates(ref, grads, params), 1e-12, 1e-15)


def test_newton_schulz_momentum_alias_equals_muon(x64, nesterov=True):
    grads = _grads(5, MATRICES)
    params = jax.tree.map(lambda g: 0.1 * g, grads[-1])
    ours = no.newton_schulz_momentum(0.02, nesterov=nesterov, weight_decay=0.1)
    ref = contrib.muon(0.02, nesterov=nesterov, weight_decay=0.1)
    assert_close(run_updates(ours, grads, params), run_updates(ref, grads, params), 1e-12, 1e-15)


def test_stacked_weights_are_orthogonalized_per_matrix(x64):
    # [L, D, F]: L independent matrices, with explicit dimension numbers -- and the
    # same result as optax's muon given the same dimension numbers.
    grads = _grads(3, {"stack": (3, 5, 7)})
    params = jax.tree.map(jnp.ones_like, grads[0])
    dims = {"stack": no.DimensionNumbers(1, 2)}
    ours = no.newton_schulz_momentum(0.02, weight_dimension_numbers=dims)
    got = run_updates(ours, grads, params)
    muon_dims = {"stack": contrib.MuonDimensionNumbers(1, 2)}
    ref = run_updates(contrib.muon(0.02, muon_weight_dimension_numbers=muon_dims), grads, params)
    assert_close(got, ref, 1e-12, 1e-15)
    x = grads[0]["stack"]
    per_layer = jnp.stack([no.orthogonalize(x[i]) for i in range(3)])
    np.testing.assert_allclose(
        no.orthogonalize(x, dimension_numbers=dims["stack"]), per_layer, rtol=1e-13
    )
    # matrix_dimension_numbers says the same thing.
    assert no.matrix_dimension_numbers(params) == dims


def test_orthogonalize_equals_optax_and_is_nearly_orthogonal(x64):
    x = randn((8, 20), 1)
    # Muon with no momentum (beta = 0) is Newton–Schulz of the gradient.
    muon_ns = contrib.scale_by_muon(
        beta=0.0, nesterov=False, weight_dimension_numbers=contrib.MuonDimensionNumbers()
    )
    ref, _ = muon_ns.update(x, muon_ns.init(x))
    np.testing.assert_allclose(no.orthogonalize(x), ref, rtol=1e-12)
    # NS is an odd polynomial in X: it keeps the singular vectors of x exactly and
    # maps each singular value into Muon's band (~[0.7, 1.2]), i.e. U S' V^T.
    u, _, vt = jnp.linalg.svd(x, full_matrices=False)
    core = u.T @ no.orthogonalize(x) @ vt.T
    s_new = jnp.diag(core)
    np.testing.assert_allclose(core - jnp.diag(s_new), 0.0, atol=1e-12)
    assert bool(jnp.all((s_new > 0.6) & (s_new < 1.25)))


def test_orthogonalize_is_scale_invariant_and_transposes(x64):
    x = randn((5, 11), 2)
    np.testing.assert_allclose(
        no.orthogonalize(1e3 * x, eps=0.0), no.orthogonalize(x, eps=0.0), rtol=1e-12
    )
    np.testing.assert_allclose(no.orthogonalize(x.T), no.orthogonalize(x).T, rtol=1e-13)


def test_reduction_and_output_axes_can_be_groups(x64):
    x = randn((2, 3, 4, 5), 3)  # e.g. conv-like [kh, kw, in, out]
    dn = no.DimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)
    flat = no.orthogonalize(x.reshape(24, 5)).reshape(x.shape)
    np.testing.assert_allclose(no.orthogonalize(x, dimension_numbers=dn), flat, rtol=1e-13)


def test_rank_below_two_passes_through_by_default(x64):
    # The default rule (matrix_dimension_numbers): vectors and scalars pass through,
    # matrices are orthogonalized, stacked weights per matrix.
    params = {
        "w": jnp.ones((4, 3)),
        "b": jnp.ones(3),
        "s": jnp.ones(()),
        "stack": jnp.ones((2, 4, 3)),
    }
    g = {
        "w": randn((4, 3), 0),
        "b": jnp.arange(3.0),
        "s": jnp.asarray(2.0),
        "stack": randn((2, 4, 3), 1),
    }
    tx = no.scale_by_newton_schulz()
    u, _ = tx.update(g, tx.init(params))
    np.testing.assert_array_equal(u["b"], g["b"])
    np.testing.assert_array_equal(u["s"], g["s"])
    np.testing.assert_allclose(u["w"], no.orthogonalize(g["w"]), rtol=1e-14)
    per_matrix = jnp.stack([no.orthogonalize(g["stack"][i]) for i in range(2)])
    np.testing.assert_allclose(u["stack"], per_matrix, rtol=1e-13)


def test_mixed_ranks_work_out_of_the_box_as_muon_on_the_matrices(x64):
    # optax.contrib.muon gives the same default for matrices (and Adam for the rest).
    grads = _grads(3, {"w": (4, 9), "b": (9,)})
    params = jax.tree.map(jnp.ones_like, grads[0])
    got = run_updates(no.newton_schulz_momentum(0.02), grads, params)
    ref = run_updates(contrib.muon(0.02), grads, params)
    assert_close([u["w"] for u in got], [u["w"] for u in ref], 1e-12, 1e-15)


def test_width_scaling_is_muons(x64):
    g = {"w": randn((3, 12), 0)}
    tx = no.scale_by_newton_schulz(width_scaling=True)
    u, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(u["w"], 2.0 * no.orthogonalize(g["w"]), rtol=1e-14)


def test_bf16_is_orthogonalized_in_float32():
    x = randn((16, 32), 0)
    ref = no.orthogonalize(x)
    got = no.orthogonalize(x.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), ref, atol=2e-2)


def test_a_traced_step_count_runs_the_same_steps(x64):
    # optax.inject_hyperparams turns ns_steps=3 into a traced array: a fori_loop of
    # that length, equal to the unrolled steps of the plain optimizer.
    grads = _grads(2, MATRICES)
    params = jax.tree.map(jnp.ones_like, grads[0])
    injected = optax.inject_hyperparams(no.newton_schulz_momentum)(0.02, ns_steps=3)
    got = run_updates(injected, grads, params)
    assert_close(
        got, run_updates(no.newton_schulz_momentum(0.02, ns_steps=3), grads, params), 1e-12, 1e-15
    )
    assert not np.allclose(
        got[-1]["wide"], run_updates(no.newton_schulz_momentum(0.02), grads, params)[-1]["wide"]
    )
