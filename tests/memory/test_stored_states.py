"""``remat=g`` (chunks per stored state, ``memory/chunked.py::_scan_stored``): the same values
and gradients as one stored state per chunk, in float64, on both scan paths, with a remainder
past the last full group and with document resets; and the property it exists for, a train
step's memory: fewer stored states in the compiled backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nested_jax import memory as nm
from tests.memory.helpers import inputs, max_diff

D = 6
LEVELS = {
    "linear-dgd": nm.Level(nm.LinearMemory(D, D), "l2", nm.DGD),
    "mlp-titans-dot-boundary": nm.Level(nm.MLPMemory(D, D, hidden=8), "dot", nm.TITANS,
                                        "boundary"),
}


def _value_and_grads(level, path, C, remat, args, resets=None):
    def f(st, q, k, v, g):
        o, final = nm.apply(level, st, q, k, v, g, chunk_size=C, path=path, remat=remat,
                            resets=resets)
        w = jax.random.normal(jax.random.key(9), o.shape, o.dtype)
        return jnp.sum(w * o) + sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(final)), o

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))(*args)


@pytest.mark.parametrize("name", list(LEVELS))
@pytest.mark.parametrize("path", ["chunked", "dual"])
@pytest.mark.parametrize("group", [2, 3])
def test_grouped_storage_computes_the_same(x64, name, path, group):
    """T = 43, C = 4: ten full chunks and a ragged tail; group 3 leaves a remainder of one full
    chunk after three groups, group 2 none."""
    level = LEVELS[name]
    args = inputs(level, jax.random.key(1), B=2, T=43, H=2, eta_scale=0.2)
    (ref, o_ref), g_ref = _value_and_grads(level, path, 4, True, args)
    (val, o), grads = _value_and_grads(level, path, 4, group, args)
    assert max_diff(o_ref, o) < 1e-13 and abs(float(ref - val)) < 1e-12
    assert max_diff(g_ref, grads) < 1e-12
    for leaf in jax.tree.leaves(g_ref):
        assert np.any(leaf != 0)


def test_grouped_storage_keeps_document_resets(x64):
    level = LEVELS["linear-dgd"]
    args = inputs(level, jax.random.key(2), B=2, T=40, H=1, eta_scale=0.2)
    resets = np.zeros((2, 40), bool)
    resets[0, 12] = resets[1, 28] = True  # chunk starts (C = 4)
    (ref, o_ref), g_ref = _value_and_grads(level, "chunked", 4, True, args, resets)
    (val, o), grads = _value_and_grads(level, "chunked", 4, 3, args, resets)
    assert max_diff(o_ref, o) < 1e-13 and max_diff(g_ref, grads) < 1e-12


def test_grouped_storage_shrinks_the_backward():
    """256 chunks of a 64 x 64 MLP memory: one stored state per chunk is 256 copies of its
    weights; one per 16 chunks, 16 + 16.  XLA's own accounting of the compiled gradient's
    temporaries must fall by at least 3x (the inputs and outputs are the same)."""
    level = nm.Level(nm.MLPMemory(64, 64, hidden=256), "l2", nm.GD, "boundary")
    args = inputs(level, jax.random.key(3), B=1, T=1024, H=1, eta_scale=0.1,
                  dtype=jnp.float32)

    def temp_bytes(remat):
        def loss(st, q, k, v, g):
            o, _ = nm.apply(level, st, q, k, v, g, chunk_size=4, path="chunked", remat=remat)
            return jnp.sum(o * o)

        grad = jax.jit(jax.grad(loss, argnums=0))
        return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes

    per_chunk, grouped = temp_bytes(True), temp_bytes(16)
    state_bytes = 4 * sum(x.size for x in jax.tree.leaves(args[0].params))
    assert per_chunk >= 128 * state_bytes  # the per-chunk states (256) are really stored
    assert grouped * 3 < per_chunk


def test_a_bad_remat_names_the_option():
    level = LEVELS["linear-dgd"]
    st, q, k, v, g = inputs(level, jax.random.key(4), B=1, T=8, H=1, dtype=jnp.float32)
    with pytest.raises(ValueError, match="remat"):
        nm.apply(level, st, q, k, v, g, chunk_size=4, path="chunked", remat=-2)
