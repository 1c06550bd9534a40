"""The kernels' regrouping of a chunk as an affine map of its state is the direct form (float64).

``affine.chunk_transition`` + ``statepass.step`` + ``affine.output`` must give exactly what
``chunk_math.forward`` (gated_delta_dual.py's closed form) gives, for every combination of the
static flags, on random (not structured) inputs and a random boundary state; and the reverse
step ``statepass.step_back`` must be the transpose of the forward step.
"""

import itertools

import jax
import jax.numpy as jnp
import pytest

from nested_jax.kernels import affine, statepass
from nested_jax.kernels import chunk_math as cm
from tests.kernels.helpers import rel_err

TOL = 1e-12  # float64, O(C * dk) accumulations of O(1) terms: ~1e-15 observed

FLAGS = [f for f in itertools.product([True, False], repeat=5) if f[0] or not f[4]]
ids = lambda f: "".join("1" if x else "0" for x in f)


def _chunk(seed, fl, C=8, dk=6, dv=5):
    keys = iter(jax.random.split(jax.random.key(seed), 32))
    rn = lambda *s: jax.random.normal(next(keys), s, jnp.float64)
    opt = lambda on, *s: rn(*s) if on else None
    c = cm.Chunk(rn(C, dk), rn(C, dk), opt(fl.has_ke and not fl.ke_is_k, C, dk),
                 opt(fl.has_ve, C, dv), opt(fl.dgd, C, dk), opt(fl.dgd and fl.momentum, C, dk),
                 rn(C, C), opt(fl.dgd, C, C), opt(fl.dgd, C, C), None)
    cols = rn(C, cm.NCOL)
    if not fl.momentum:  # prep's columns without momentum: no S carry-over
        cols = cols.at[:, [cm.DV, cm.BP]].set(0.0)
    if not fl.dgd:
        cols = cols.at[:, cm.AL].set(0.0)
    return c, cols, rn(dv, dk), rn(dv, dk)


@pytest.mark.parametrize("flags", FLAGS, ids=ids)
def test_affine_step_and_readout_are_the_direct_form(x64, seed, flags):
    fl = cm.Flags(*flags)
    c, cols, w, s = _chunk(seed, fl)
    dot = cm.make_dot(jnp.float64, jnp.float64)
    y, w1, s1 = cm.forward(c._replace(cols=tuple(cols[:, j:j + 1] for j in range(7))), w, s,
                           fl, dot, jnp.float64)
    tr, ro = affine.chunk_transition(c, cols, fl, jnp.float64, jnp.float64)
    lf = affine.loop_flags(fl)
    s_in = s if fl.momentum else jnp.zeros_like(s)
    got_w, got_s = statepass.step(w, s_in, statepass.operands(tr, lf), lf, dot, jnp.float64)
    if not fl.momentum:  # the loop does not carry S; the last S' is read off W
        batch = lambda x: None if x is None else x[None, None]
        got_s = affine.final_momentum(tr._replace(kb=batch(tr.kb), v=batch(tr.v)), w[None],
                                      jnp.float64, jnp.float64)[0]
    wide = lambda x: None if x is None else x[None, None]
    got_y = affine.output(affine.Readout(*map(wide, ro)), w[None, None], s[None, None],
                          jnp.float64, jnp.float64)[0, 0]
    assert rel_err(got_y, y) < TOL
    assert rel_err(got_w, w1) < TOL
    assert rel_err(got_s, s1) < TOL


@pytest.mark.parametrize("flags", FLAGS, ids=ids)
def test_step_back_is_the_transpose_of_step(x64, seed, flags):
    fl = cm.Flags(*flags)
    c, cols, w, s = _chunk(seed, fl)
    tr, _ = affine.chunk_transition(c, cols, fl, jnp.float64, jnp.float64)
    lf = affine.loop_flags(fl)
    ops = statepass.operands(tr, lf)
    dot = cm.make_dot(jnp.float64, jnp.float64)
    keys = jax.random.split(jax.random.key(seed + 7), 2)
    g1, h1 = (jax.random.normal(kk, w.shape, jnp.float64) for kk in keys)
    if not lf.momentum:
        h1 = jnp.zeros_like(h1)
    # The step is affine in (w, s): its VJP at any point is the linear part's transpose.
    _, vjp = jax.vjp(lambda w, s: statepass.step(w, s, ops, lf, dot, jnp.float64), w, s)
    want_g, want_h = vjp((g1, h1))
    got_g, got_h = statepass.step_back(g1, h1, ops, lf, dot, jnp.float64)
    assert rel_err(got_g, want_g) < TOL
    if lf.momentum:
        assert rel_err(got_h, want_h) < TOL
