"""Each Pallas kernel, run by the interpreter, equals the kernels' XLA loop (scan_xla), float64.

Mosaic runs in TPU interpret mode (VMEM scratch, grid order and the "arbitrary" chunk axis are
simulated), Triton in the generic interpreter.  Forward: outputs, final and boundary states.
Backward: every cotangent the custom_vjp returns equals jax.vjp of scan_xla.scan.
"""

import jax
import jax.numpy as jnp
import pytest

from nested_jax.kernels import chunk_math, mosaic, prep, scan_xla, triton
from nested_jax.kernels.compat import tpu_interpret
from nested_jax.kernels.mosaic import blocks_legal
from tests.kernels.helpers import rel_err

TOL = 1e-11  # float64; the kernels and scan_xla do the same operations in the same order
KERNELS = {"mosaic": (mosaic, tpu_interpret), "triton": (triton, lambda: True)}
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


CASES = [(k, c) if c == "hope" else pytest.param(k, c, marks=pytest.mark.slow)
         for c in FLAGS for k in KERNELS]


@pytest.mark.parametrize("kernel,case", CASES)
def test_kernel_matches_scan(x64, seed, kernel, case):
    fl = FLAGS[case]
    mod, interp = KERNELS[kernel]
    ch, w0, s0 = _chunks(seed, fl)
    bv = 16  # two dv tiles: partial sums over tiles are exercised
    want = jax.jit(lambda c, w, s: scan_xla.scan(c, w, s, fl, jnp.float64))(ch, w0, s0)
    fwd = jax.jit(lambda c, w, s: mod.forward(c, w, s, fl, jnp.float64, jnp.float64, bv,
                                              interpret=interp()))
    got = fwd(ch, w0, s0)
    for name, g, w in zip(("y", "wN", "sN", "wb", "sb"), got, want, strict=True):
        if g is not None:
            assert rel_err(g, w) < TOL, name

    keys = jax.random.split(jax.random.key(seed + 1), 3)
    cts = tuple(jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys, want[:3], strict=True))
    _, vjp = jax.vjp(lambda c, w, s: scan_xla.scan(c, w, s, fl, jnp.float64)[:3], ch, w0, s0)
    want_c, want_w, want_s = jax.jit(vjp)(cts)
    bwd = jax.jit(lambda c, wb, sb, dy, dw, ds: mod.backward(
        c, wb, sb, dy, dw, ds, fl, jnp.float64, bv, interpret=interp()))
    grads, dw0, ds0 = bwd(ch, want[3], want[4], *cts)
    assert rel_err(dw0, want_w) < TOL
    if fl.momentum:
        assert rel_err(ds0, want_s) < TOL
    for name, g in grads.items():
        g = g if name == "dve" else g.sum(axis=1)
        assert rel_err(g, getattr(want_c, name[1:])) < TOL, name


@pytest.mark.parametrize("C,dk,dv,bv", [(64, 64, 64, 64), (64, 128, 128, 128), (8, 8, 6, 6),
                                         (64, 128, 512, 256), (16, 16, 256, 128)])
def test_mosaic_blocks_follow_tiling_rule(C, dk, dv, bv):
    assert blocks_legal(C, dk, dv, bv) == []


def test_blocks_legal_catches_a_bad_tile():
    assert blocks_legal(64, 64, 256, 64)  # a 64-wide dv tile of a 256 array is not /128
