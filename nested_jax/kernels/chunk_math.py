"""One chunk's operands (``Chunk``) and its state-dependent half in direct form: the reference.

``prep.py`` computes everything that does not depend on the chunk-boundary state (W, S): gate
products, the causal masks, the triangular solve of the DGD pseudo-values.  ``forward`` below
finishes the chunk from a boundary state exactly as ``gated_delta_dual.py`` writes it; the
kernels run the same maths regrouped as an affine map of the state (``affine.py``), and tests
hold that regrouping to this function (``scan_xla.scan`` runs it over chunks).

Shapes, for one chunk of C tokens and one tile of bv memory rows (rows of W are independent:
the DGD factor acts on the right, so a dv tile is a self-contained problem):

    w, s  f[bv, dk]   boundary memory and momentum (f32 or f64: the carried precision)
    k, q  [C, dk]     keys (the writes) and queries
    ke    [C, dk]     error keys:  u = ke W^T - ve          (l2: ke = k; self-target: k - v)
    ve    [C, bv]     error targets                         (l2 and dot: v)
    r, r2 [C, dk]     DGD: m = r W^T + r2 S^T - te X        (prep's solved pseudo-value keys)
    f, g, te [C, C]   y = gam*(q W^T) + dv*(q S^T) - f X - g (eta*m)
    cols  [C, 8]      per-token columns, see COLS

and the update W' = gC W + dC S - (dl*X + al*eta*m)^T k, S' = bC S - (bl*X)^T k, with
X = eta*u, gC = gam[-1], dC = dv[-1], bC = bp[-1] (gated_delta_dual.py's closed form, regrouped).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Per-token column vectors packed in one [C, 8] array (one load, one legal TPU block).
COLS = ("eta", "gam", "dv", "dl", "al", "bl", "bp")
ETA, GAM, DV, DL, AL, BL, BP = range(len(COLS))
NCOL = 8


class Flags(NamedTuple):
    """Static structure of the chunk maths (each False drops loads and matmuls)."""

    has_ke: bool  # error reads the memory (l2); False for the dot objective (u = -v)
    has_ve: bool  # error has a target term (False for a self-generated target, ve = 0)
    momentum: bool  # S enters (False: beta = 0, S' = -(bl*X)^T k and S never feeds back)
    dgd: bool  # the DGD pseudo-values m (r, r2, te, g, al)
    ke_is_k: bool = False  # error keys are the write keys (plain l2): no separate ke array


def precision(op_dtype):
    """XLA matmul precision for the kernels' operand dtype: IEEE for 32/64-bit operands (never
    TF32), the default for 16-bit ones (their products are rounded to 16 bits anyway)."""
    exact = jnp.dtype(op_dtype).itemsize >= 4
    return jax.lax.Precision.HIGHEST if exact else jax.lax.Precision.DEFAULT


def make_dot(op_dtype, acc_dtype):
    """dot(a, b, form): form 'nt' = a @ b^T, 'nn' = a @ b, 'tn' = a^T @ b, in acc_dtype."""
    prec = jax.lax.Precision.HIGHEST if op_dtype in (jnp.float32, jnp.float64) else None
    dims = {"nt": ((1,), (1,)), "nn": ((1,), (0,)), "tn": ((0,), (0,))}

    def dot(a, b, form):
        return jax.lax.dot_general(a.astype(op_dtype), b.astype(op_dtype), (dims[form], ((), ())),
                                   precision=prec, preferred_element_type=acc_dtype)

    return dot


def unpack_cols(block, acc):
    """[C, 8] -> tuple of [C, 1] columns, by masked lane sums: no unaligned lane slices,
    which Mosaic may not lower, and the same code in Triton."""
    lane = jax.lax.broadcasted_iota(jnp.int32, block.shape, 1)
    block = block.astype(acc)
    return tuple(jnp.sum(jnp.where(lane == j, block, 0), axis=1, keepdims=True)
                 for j in range(len(COLS)))


def _last(col):
    """[C, 1] -> [1, 1], its last entry (a masked sum: no scalar extraction needed)."""
    row = jax.lax.broadcasted_iota(jnp.int32, col.shape, 0)
    return jnp.sum(jnp.where(row == col.shape[0] - 1, col, 0), axis=0, keepdims=True)


class Chunk(NamedTuple):
    """One chunk's inputs (None where the flags drop them); cols is a list of [C, 1]."""

    k: jax.Array
    q: jax.Array
    ke: jax.Array | None
    ve: jax.Array | None
    r: jax.Array | None
    r2: jax.Array | None
    f: jax.Array
    g: jax.Array | None
    te: jax.Array | None
    cols: tuple


def _errors(c: Chunk, w, fl: Flags, dot, acc):
    """u = ke W^T - ve (the stale l2 / dot / self-target error, one place to change)."""
    u = 0.0
    if fl.has_ke:
        u = dot(c.k if fl.ke_is_k else c.ke, w, "nt")
    if fl.has_ve:
        u = u - c.ve.astype(acc)
    return u


def _pseudo(c: Chunk, w, s, x, fl: Flags, dot):
    m = dot(c.r, w, "nt") - dot(c.te, x, "nn")
    if fl.momentum:
        m = m + dot(c.r2, s, "nt")
    return m


def forward(c: Chunk, w, s, fl: Flags, dot, acc):
    """Returns (y [C, bv], w' [bv, dk], s' [bv, dk]) in acc precision."""
    eta, gam, dv, dl, al, bl, bp = c.cols
    x = eta * jnp.broadcast_to(_errors(c, w, fl, dot, acc), (c.k.shape[0], w.shape[0]))
    y = gam * dot(c.q, w, "nt") - dot(c.f, x, "nn")
    p = dl * x
    if fl.momentum:
        y = y + dv * dot(c.q, s, "nt")
    if fl.dgd:
        em = eta * _pseudo(c, w, s, x, fl, dot)
        y = y - dot(c.g, em, "nn")
        p = p + al * em
    w1 = _last(gam) * w - dot(p, c.k, "tn")
    s1 = -dot(bl * x, c.k, "tn")
    if fl.momentum:
        w1 = w1 + _last(dv) * s
        s1 = s1 + _last(bp) * s
    return y, w1, s1
