"""Each Pallas kernel, run by the interpreter, equals its XLA oracles, float64.

Mosaic runs in TPU interpret mode (VMEM scratch, grid order and the "arbitrary" chunk axis are
simulated), Triton in the generic interpreter, both with two dv tiles.
  * the loop: forward (boundary and final states) equals ``statepass.scan``; the custom_vjp's
    backward (reverse kernel + operand cotangents) equals ``jax.vjp`` of that scan;
  * the pipeline (transition, loop, readout: ``vjp.make_core``) equals ``scan_xla.scan``, the
    per-chunk maths in its direct form, and its ``jax.vjp``, for every chunk field and state.
"""

import jax
import jax.numpy as jnp
import pytest

from nested_jax.kernels import affine, chunk_math, prep, statepass, vjp
from nested_jax.kernels.mosaic import blocks_legal
from tests.kernels.helpers import rel_err

TOL = 1e-11  # float64; ~1e-15 observed
KERNELS = ("mosaic", "triton")
FLAGS = {
    "hope": chunk_math.Flags(True, True, True, True, True),  # l2, momentum, DGD
    "titans_dot": chunk_math.Flags(False, True, True, False),
    "gd_self": chunk_math.Flags(True, False, False, False),  # self-target, no momentum
    "dgd_nomom": chunk_math.Flags(True, True, False, True),
}


def _chunks(seed, fl, BH=2, N=3, C=16, dk=16, dv=32):
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    T = N * C
    rn = lambda *s: jax.random.normal(next(keys), s, jnp.float64)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    u = lambda lo, hi: jax.random.uniform(next(keys), (BH, T), jnp.float64, lo, hi)
    k = unit(rn(BH, T, dk))
    beta = u(0, 1) if fl.momentum else jnp.zeros((BH, T))
    ke = k + 0.5 * unit(rn(BH, T, dk)) if fl.has_ke and not fl.ke_is_k else None
    ch = prep.prep(unit(rn(BH, T, dk)), k, ke,
                   rn(BH, T, dv) if fl.has_ve else None, u(0, 0.5), u(0.8, 1), beta, fl,
                   jnp.float64, C)
    return ch, rn(BH, dv, dk) / 4, rn(BH, dv, dk) / 10


def _cotangents(seed, outs):
    keys = jax.random.split(jax.random.key(seed), len(outs))
    return tuple(None if x is None else jax.random.normal(kk, x.shape, x.dtype)
                 for kk, x in zip(keys, outs, strict=True))


CASES = [(k, c) if c == "hope" else pytest.param(k, c, marks=pytest.mark.slow)
         for c in FLAGS for k in KERNELS]
BV = 16  # two dv tiles


@pytest.mark.parametrize("kernel,case", CASES)
def test_loop_kernel_matches_scan(x64, seed, kernel, case):
    fl = FLAGS[case]
    lf = affine.loop_flags(fl)
    ch, w0, s0 = _chunks(seed, fl)
    tr, _ = affine.transition(ch, fl, jnp.float64, jnp.float64)
    ops = statepass.operands(tr, lf)
    scan = lambda ops, w, s: statepass.scan(affine.Transition(
        **{n: ops.get(n) for n in affine.Transition._fields}), w, s, lf, jnp.float64)
    loop = vjp._kernel_loop(kernel, lf, jnp.float64, BV, True, None, None)
    want, got = jax.jit(scan)(ops, w0, s0), jax.jit(loop)(ops, w0, s0)
    for name, g, w in zip(("wb", "sb", "wN", "sN"), got, want, strict=True):
        assert (g is None) == (w is None), name
        if w is not None:
            assert rel_err(g, w) < TOL, name

    cts = _cotangents(seed + 1, want)
    want_g = jax.jit(lambda *a: jax.vjp(scan, *a)[1](cts))(ops, w0, s0)
    got_g = jax.jit(lambda *a: jax.vjp(loop, *a)[1](cts))(ops, w0, s0)
    for name in ops:
        assert rel_err(got_g[0][name], want_g[0][name]) < TOL, name
    assert rel_err(got_g[1], want_g[1]) < TOL, "w0"
    if fl.momentum:
        assert rel_err(got_g[2], want_g[2]) < TOL, "s0"


@pytest.mark.parametrize("kernel,case", CASES)
def test_pipeline_matches_direct_form(x64, seed, kernel, case):
    fl = FLAGS[case]
    ch, w0, s0 = _chunks(seed, fl)
    want_f = vjp.make_core("xla-scan", fl, jnp.float64, jnp.float64, BV, False)
    got_f = vjp.make_core(kernel, fl, jnp.float64, jnp.float64, BV, True)
    want, got = jax.jit(want_f)(ch, w0, s0), jax.jit(got_f)(ch, w0, s0)
    for name, g, w in zip(("y", "wN", "sN"), got, want, strict=True):
        assert rel_err(g, w) < TOL, name
    cts = _cotangents(seed + 1, want)
    want_g = jax.jit(lambda *a: jax.vjp(want_f, *a)[1](cts))(ch, w0, s0)
    got_g = jax.jit(lambda *a: jax.vjp(got_f, *a)[1](cts))(ch, w0, s0)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_g),
                            jax.tree.leaves(want_g), strict=True):
        assert rel_err(g, w) < TOL, jax.tree_util.keystr(path)


@pytest.mark.parametrize("dk,dv,bv", [(64, 64, 64), (128, 128, 32), (8, 6, 6), (128, 512, 256),
                                      (16, 256, 128), (100, 24, 8)])
def test_mosaic_blocks_follow_tiling_rule(dk, dv, bv):
    assert blocks_legal(dk, dv, bv) == []


def test_blocks_legal_catches_a_bad_tile():
    assert blocks_legal(64, 256, 4)  # a 4-row dv tile is not whole sublanes
