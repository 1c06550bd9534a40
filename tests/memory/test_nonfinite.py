"""Non-finite inputs stay causal on every path (``memory.causal_nonfinite``).

A NaN or inf in k, v or a gate at token t may only reach the outputs that read a state the
token wrote: from t on (online read), from t + 1 (prior read), from the next chunk boundary
(boundary read).  The per-token definition (the raw oracle) has exactly that pattern; the
matmul paths used to leak it to the earlier tokens of the same chunk (0 * NaN in the masked
products).  Float64: every output before the first reader equals the clean run's exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nested_jax import memory as nm
from nested_jax.memory import api
from tests.memory.helpers import inputs

T, C = 12, 4
BAD = ((0, 6, 1, "k", np.nan), (1, 9, 0, "v", np.inf))  # (b, t, h, where, value)
LEVELS = {
    "mlp-dgd": nm.Level(nm.MLPMemory(6, 6, hidden=8), "l2", nm.DGD),
    "linear-titans": nm.Level(nm.LinearMemory(6, 6), "l2", nm.TITANS),
}
FIRST_READER = {"online": lambda t: t, "prior": lambda t: t + 1,
                "boundary": lambda t: -(-(t + 1) // C) * C}


def _poison(args, bad=BAD):
    st, q, k, v, g = args
    for b, t, h, where, value in bad:
        if where == "k":
            k = k.at[b, t, h, 0].set(value)
        else:
            v = v.at[b, t, h, 0].set(value)
    return st, q, k, v, g


def _expected_mask(bad=BAD, read="online"):
    """[B, T, H] True where the output must be non-finite."""
    mask = np.zeros((2, T, 2), bool)
    for b, t, h, _, _ in bad:
        mask[b, FIRST_READER[read](t):, h] = True
    return mask


@pytest.mark.parametrize("read,path", [("online", "oracle"), ("online", "chunked"),
                                       ("online", "dual"), ("prior", "dual"),
                                       ("prior", "oracle"), ("boundary", "dual"),
                                       ("boundary", "chunked")])
@pytest.mark.parametrize("name", list(LEVELS))
def test_nonfinite_inputs_stay_causal(x64, name, read, path):
    level = nm.Level(LEVELS[name].memory, "l2", LEVELS[name].rule, read)
    chunk = 1 if path == "oracle" else C
    args = inputs(level, jax.random.key(3), B=2, T=T, H=2)
    run = jax.jit(lambda *a: nm.apply(level, *a, chunk_size=chunk, path=path))
    clean, _ = run(*args)
    o, final = run(*_poison(args))
    bad = _expected_mask(read=read)
    o, clean = np.asarray(o), np.asarray(clean)
    assert np.all(~np.isfinite(o[bad])), "a reader of the bad write stayed finite"
    np.testing.assert_array_equal(o[~bad], clean[~bad])  # untouched, bit for bit
    for leaf in jax.tree.leaves(final):  # the poisoned (b, h) pairs end non-finite, others not
        leaf = np.asarray(leaf).reshape(2, 2, -1)
        assert np.all(~np.isfinite(leaf[0, 1])) and np.all(~np.isfinite(leaf[1, 0]))
        assert np.all(np.isfinite(leaf[0, 0])) and np.all(np.isfinite(leaf[1, 1]))


@pytest.mark.parametrize("read", ["online", "prior"])
def test_pattern_is_the_raw_definitions(x64, read):
    """The guard's non-finite pattern is the one the unguarded per-token oracle produces."""
    level = nm.Level(LEVELS["mlp-dgd"].memory, "l2", nm.DGD, read)
    args = _poison(inputs(level, jax.random.key(4), B=2, T=T, H=2))
    raw, _ = api._apply(level, *args, 1, "oracle", True)
    np.testing.assert_array_equal(~np.all(np.isfinite(np.asarray(raw)), -1),
                                  _expected_mask(read=read))


def test_bad_query_reaches_only_its_own_output(x64):
    level = LEVELS["mlp-dgd"]
    st, q, k, v, g = inputs(level, jax.random.key(5), B=2, T=T, H=2)
    run = jax.jit(lambda *a: nm.apply(level, *a, chunk_size=C, path="dual"))
    clean, _ = run(st, q, k, v, g)
    o, _ = run(st, q.at[0, 5, 1, 2].set(jnp.nan), k, v, g)
    bad = np.zeros(o.shape[:3], bool)
    bad[0, 5, 1] = True
    assert np.all(~np.isfinite(np.asarray(o)[bad]))
    np.testing.assert_array_equal(np.asarray(o)[~bad], np.asarray(clean)[~bad])
