"""Document resets (``memory.apply(..., resets=)``, memory/resets.py): on every path, a row with
resets at its document starts computes what each document computes run alone, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nested_jax import memory as nm
from tests.memory.helpers import inputs, max_diff

TOL = 1e-12
D = 8
T = 30
# Document starts per row (multiples of C = 4 and 2); row 1's last document ends in a ragged
# chunk, row 0's first document is shorter than two chunks.
STARTS = ({0, 8, 20}, {0, 12, 16})

LEVELS = {
    "linear-dgd-online": nm.Level(nm.LinearMemory(D, D), "l2", nm.DGD),
    "linear-delta-prior": nm.Level(nm.LinearMemory(D, D), "l2", nm.DELTA, "prior"),
    "mlp-delta-online-self": nm.Level(nm.MLPMemory(D, D, hidden=16), "l2", nm.DELTA,
                                      self_target=True, normalize_target=True),
    "mlp-titans-prior": nm.Level(nm.MLPMemory(D, D, hidden=16), "l2", nm.TITANS, "prior"),
    "mlp-gd-boundary": nm.Level(nm.MLPMemory(D, D, hidden=16), "dot", nm.GD, "boundary"),
    "mlp-titans-boundary": nm.Level(nm.MLPMemory(D, D, hidden=16), "l2", nm.TITANS, "boundary"),
}
PATH_CHUNKS = [("oracle", 1), ("chunked", 4), ("dual", 4), ("pallas", 4)]


def _resets(starts=STARTS, T=T):
    r = np.zeros((len(starts), T), bool)
    for b, s in enumerate(starts):
        r[b, sorted(s)] = True
    return jnp.asarray(r)


def _separately(level, st, q, k, v, g, starts, path, C):
    """Each document alone, from the initial state: (outputs [B, T, H, dv], final states)."""
    outs, finals = [], []
    for b, row in enumerate(starts):
        edges = [*sorted(row), q.shape[1]]
        pieces = []
        for s, e in zip(edges[:-1], edges[1:], strict=True):
            cut = lambda x, s=s, e=e: x[b:b + 1, s:e]
            o, fin = nm.apply(level, jax.tree.map(lambda x: x[b:b + 1], st), cut(q), cut(k),
                              cut(v), nm.Gates(*map(cut, g)), chunk_size=C, path=path)
            pieces.append(o)
        outs.append(jnp.concatenate(pieces, axis=1))
        finals.append(fin)
    return jnp.concatenate(outs), jax.tree.map(lambda *x: jnp.concatenate(x), *finals)


def _case(name):
    level = LEVELS[name]
    eta = 0.1 if level.self_target else 0.5
    return level, inputs(level, jax.random.key(len(name)), T=T, eta_scale=eta)


@pytest.mark.parametrize("path,C", PATH_CHUNKS, ids=[f"{p}-C{c}" for p, c in PATH_CHUNKS])
@pytest.mark.parametrize("name", list(LEVELS))
def test_resets_equal_separate_runs(x64, name, path, C):
    level, (st, q, k, v, g) = _case(name)
    if path == "pallas" and not isinstance(level.memory, nm.LinearMemory):
        pytest.skip("the pallas path runs linear memories")
    packed = nm.apply(level, st, q, k, v, g, chunk_size=C, path=path, resets=_resets())
    alone = _separately(level, st, q, k, v, g, STARTS, path, C)
    err = max_diff(packed, alone)
    assert err < TOL, err
    # Without resets the later documents see the earlier ones: the test can fail.
    leaky = nm.apply(level, st, q, k, v, g, chunk_size=C, path=path)
    assert max_diff(leaky[0], alone[0]) > 1e-3


def test_resets_under_jit_and_with_a_reset_at_zero_only(x64):
    """Traced resets take the same route; a reset at t = 0 alone changes nothing."""
    level, (st, q, k, v, g) = _case("mlp-titans-prior")
    run = jax.jit(lambda r: nm.apply(level, st, q, k, v, g, chunk_size=4, path="dual", resets=r))
    alone = _separately(level, st, q, k, v, g, STARTS, "dual", 4)
    assert max_diff(run(_resets()), alone) < TOL
    first = _resets(({0}, {0}))
    plain = nm.apply(level, st, q, k, v, g, chunk_size=4, path="dual")
    assert max_diff(run(first), plain) < TOL


def test_outer_gradients_equal_separate_runs(x64):
    """The restart routes outer gradients too: d/d(initial state, inputs) of a packed loss is the
    sum over documents of each one's own gradient."""
    level, (st, q, k, v, g) = _case("mlp-delta-online-self")
    w = jax.random.normal(jax.random.key(9), (*q.shape[:3], D), jnp.float64)

    def packed(st, q, k, v):
        o, _ = nm.apply(level, st, q, k, v, g, chunk_size=4, path="dual", resets=_resets())
        return jnp.sum(w * o)

    def alone(st, q, k, v):
        return jnp.sum(w * _separately(level, st, q, k, v, g, STARTS, "dual", 4)[0])

    a = jax.grad(packed, argnums=(0, 1, 2, 3))(st, q, k, v)
    b = jax.grad(alone, argnums=(0, 1, 2, 3))(st, q, k, v)
    assert max_diff(a, b) < TOL


def test_non_finite_input_stays_in_its_document(x64):
    """A NaN in a document reaches the rest of that document only (as when run alone)."""
    level, (st, q, k, v, g) = _case("linear-dgd-online")
    k = k.at[0, 10, 1].set(jnp.nan)  # row 0, second document (8..19), head 1
    packed = nm.apply(level, st, q, k, v, g, chunk_size=4, path="dual", resets=_resets())
    alone = _separately(level, st, q, k, v, g, STARTS, "dual", 4)
    o = np.asarray(packed[0])
    assert np.all(np.isnan(o[0, 10:20, 1])) and np.all(np.isfinite(o[0, 20:]))
    np.testing.assert_array_equal(np.isnan(o), np.isnan(np.asarray(alone[0])))
    np.testing.assert_allclose(o, np.asarray(alone[0]), rtol=0, atol=TOL)


def test_unaligned_reset_is_an_error(x64):
    level, (st, q, k, v, g) = _case("linear-dgd-online")
    with pytest.raises(ValueError, match=r"resets\[1, 6\] .* not a multiple of chunk_size=4"):
        nm.apply(level, st, q, k, v, g, chunk_size=4, path="dual", resets=_resets(({0}, {6})))
    with pytest.raises(ValueError, match=r"resets must have shape \[B, T\]"):
        nm.apply(level, st, q, k, v, g, chunk_size=4, path="dual", resets=_resets()[:, :-1])


def test_kernels_refuse_resets_unless_auto(x64):
    """No kernel restarts a state: impl="auto" runs the XLA dual form, a forced kernel refuses."""
    level, (st, q, k, v, g) = _case("linear-dgd-online")
    with pytest.raises(ValueError, match="resets .* have no kernel: impl='interpret'"):
        nm.apply(level, st, q, k, v, g, chunk_size=8, path="pallas", impl="interpret",
                 resets=_resets(({0, 8}, {0, 16})))
