"""Per-sequence state (no state shared across a batch) and clear errors on bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nested_jax import memory as nm
from tests.memory.helpers import inputs, max_diff

D = 6
LEVEL = nm.Level(nm.MLPMemory(D, D, hidden=8), "l2", nm.DGD)


def test_batch_independence(x64):
    st, q, k, v, g = inputs(LEVEL, jax.random.key(0), B=3, T=10, H=2, eta_scale=0.2)
    o, final = nm.apply(LEVEL, st, q, k, v, g, chunk_size=4)
    # Perturb sequence 1 only: sequences 0 and 2 do not move.
    o2, _ = nm.apply(LEVEL, st, q, k.at[1].multiply(-1.0), v.at[1].add(1.0), g, chunk_size=4)
    assert np.all(o2[0] == o[0]) and np.all(o2[2] == o[2]) and np.any(o2[1] != o[1])
    # Each sequence alone gives the same result as inside the batch.
    for b in range(3):
        sl = lambda x, b=b: x[b : b + 1]
        ob, fb = nm.apply(LEVEL, jax.tree.map(sl, st), sl(q), sl(k), sl(v),
                          nm.Gates(*map(sl, g)), chunk_size=4)
        assert max_diff(ob, o[b : b + 1]) < 1e-13
        assert max_diff(fb, jax.tree.map(sl, final)) < 1e-13


def _good():
    return inputs(LEVEL, jax.random.key(1), B=2, T=5, H=2, dtype=jnp.float32)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: {**a, "q": a["q"][..., :3]}, "q shape"),
        (lambda a: {**a, "k": a["k"][0]}, "k must have shape"),
        (lambda a: {**a, "v": a["v"].astype(jnp.int32)}, "v must be floating"),
        (lambda a: {**a, "v": a["v"][:, :, :, :4]}, "dv"),
        (lambda a: {**a, "g": a["g"]._replace(alpha=a["g"].alpha + 1.0)}, "gates.alpha"),
        (lambda a: {**a, "g": a["g"]._replace(eta=-a["g"].eta)}, "gates.eta"),
        (lambda a: {**a, "g": a["g"]._replace(beta=a["g"].beta[:, :2])}, "gates.beta"),
        (lambda a: {**a, "g": a["g"]._replace(eta=a["g"].eta.at[0, 0, 0].set(jnp.nan))}, "gates.eta"),
        (lambda a: {**a, "C": 0}, "chunk_size"),
        (lambda a: {**a, "C": 2.0}, "chunk_size"),
        (lambda a: {**a, "path": "fast"}, "path"),
        (lambda a: {**a, "st": jax.tree.map(lambda x: x[0], a["st"])}, "state.params"),
        (lambda a: {**a, "st": jax.tree.map(lambda x: x.astype(jnp.bfloat16), a["st"])},
         "state.params has dtype"),
        (lambda a: {**a, "C": 4, "path": "oracle"}, "chunk_size=4 must be 1"),
    ],
)
def test_bad_input_names_the_argument(mutate, match):
    st, q, k, v, g = _good()
    a = mutate({"st": st, "q": q, "k": k, "v": v, "g": g, "C": 2, "path": "dual"})
    with pytest.raises(ValueError, match=match):
        nm.apply(LEVEL, a["st"], a["q"], a["k"], a["v"], a["g"], chunk_size=a["C"], path=a["path"])


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: nm.MLPMemory(4, 6, hidden=8), "residual"),
        (lambda: nm.MLPMemory(4, 4, hidden=8, depth=1), "depth"),
        (lambda: nm.MLPMemory(4, 4, hidden=8, activation="swish2"), "activation"),
        (lambda: nm.LinearMemory(0, 4), "dk"),
        (lambda: nm.Level(nm.LinearMemory(4, 4), objective="cosine"), "objective"),
        (lambda: nm.Level(nm.LinearMemory(4, 4), read="late"), "read"),
        (lambda: nm.Level(nm.LinearMemory(4, 5), self_target=True), "self_target"),
        (lambda: nm.Rule(momentum=True, dgd=False, dgd_all_layers=True), "dgd_all_layers"),
        (lambda: nm.Level("not a memory"), "memory"),
    ],
)
def test_bad_config_names_the_field(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_numpy_integer_chunk_sizes_work():
    st, q, k, v, g = _good()
    want = nm.apply(LEVEL, st, q, k, v, g, chunk_size=2)
    got = nm.apply(LEVEL, st, q, k, v, g, chunk_size=np.int64(2))
    assert max_diff(got, want) == 0.0
    stream = nm.stream_init(st)
    first = lambda x: x[:, 0]
    o, _ = nm.stream_step(LEVEL, stream, first(q), first(k), first(v),
                          nm.Gates(*map(first, g)), chunk_size=np.int32(2))
    assert max_diff(o, want[0][:, 0]) < 1e-6


def _stream_args():
    st, q, k, v, g = _good()
    first = lambda x: x[:, 0]
    return {"st": nm.stream_init(st), "q": first(q), "k": first(k), "v": first(v),
            "g": nm.Gates(*map(first, g)), "C": 2}


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: {**a, "C": 0}, "chunk_size"),
        (lambda a: {**a, "g": a["g"]._replace(alpha=a["g"].alpha + 1.0)}, "gates.alpha"),
        (lambda a: {**a, "g": a["g"]._replace(eta=a["g"].eta[:, :1])}, "gates.eta"),
        (lambda a: {**a, "q": a["q"][..., :3]}, "q shape"),
        (lambda a: {**a, "v": a["v"][None]}, "v must have shape"),
        (lambda a: {**a, "st": a["st"]._replace(
            boundary=jax.tree.map(lambda x: x.astype(jnp.bfloat16), a["st"].boundary))},
         "state.boundary has dtype"),
    ],
)
def test_stream_step_bad_input_names_the_argument(mutate, match):
    """stream_step checks what apply checks (chunk_size 0 would mean "never refresh")."""
    a = mutate(_stream_args())
    with pytest.raises(ValueError, match=match):
        nm.stream_step(LEVEL, a["st"], a["q"], a["k"], a["v"], a["g"], chunk_size=a["C"])
