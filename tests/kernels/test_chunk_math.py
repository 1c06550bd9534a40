"""The hand-written per-chunk backward equals jax.vjp of the per-chunk forward (float64).

chunk_math.backward is what both backward kernels run; this pins it to autodiff for every
combination of the static flags, on random (not structured) inputs.
"""

import itertools

import jax
import jax.numpy as jnp
import pytest

from nested_jax.kernels import chunk_math as cm
from tests.kernels.helpers import rel_err

TOL = 1e-12  # float64, O(C * dk) accumulations of O(1) terms: ~1e-14 observed


FLAGS = [f for f in itertools.product([True, False], repeat=5) if f[0] or not f[4]]


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "".join("1" if x else "0" for x in f))
def test_backward_is_vjp_of_forward(x64, seed, flags):
    fl = cm.Flags(*flags)
    C, dk, bv = 8, 6, 5
    keys = iter(jax.random.split(jax.random.key(seed), 32))
    rn = lambda *s: jax.random.normal(next(keys), s, jnp.float64)
    opt = lambda on, *s: rn(*s) if on else None
    c = cm.Chunk(rn(C, dk), rn(C, dk), opt(fl.has_ke and not fl.ke_is_k, C, dk),
                 opt(fl.has_ve, C, bv),
                 opt(fl.dgd, C, dk), opt(fl.dgd and fl.momentum, C, dk), rn(C, C),
                 opt(fl.dgd, C, C), opt(fl.dgd, C, C), tuple(rn(C, 1) for _ in range(7)))
    w, s = rn(bv, dk), rn(bv, dk)
    dot = cm.make_dot(jnp.float64, jnp.float64)
    _, vjp = jax.vjp(lambda c, w, s: cm.forward(c, w, s, fl, dot, jnp.float64), c, w, s)
    cts = (rn(C, bv), rn(bv, dk), rn(bv, dk))
    want_c, want_w, want_s = vjp(cts)
    got, got_w, got_s = cm.backward(c, w, s, *cts, fl, dot, jnp.float64)
    assert rel_err(got_w, want_w) < TOL
    assert rel_err(got_s, want_s) < TOL
    for name in cm.Chunk._fields[:-1]:
        want = getattr(want_c, name)
        if want is not None:
            assert rel_err(getattr(got, "d" + name), want) < TOL, name
    # Columns the flags switch off are not read: autodiff's exact zeros must be matched exactly.
    for j, name in enumerate(cm.COLS):
        assert rel_err(got.dcols[j], want_c.cols[j]) < TOL, name
