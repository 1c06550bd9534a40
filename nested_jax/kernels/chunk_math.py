"""The state-dependent half of one chunk, forward and backward, shared by every kernel.

``prep.py`` moves everything that does not depend on the chunk-boundary state (W, S) out of
the sequential loop: gate products, the causal masks, the triangular solve of the DGD
pseudo-values.  What is left per chunk is a few matmuls that are linear in (W, S); these
functions are that part.  They take plain arrays (loaded from refs inside a kernel, or slices
inside ``scan_xla``) and a ``dot`` so the same code runs in Triton, Mosaic and XLA.

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


def pack_cols(cols, acc):
    """Tuple of [C, 1] columns -> [C, 8] (zeros past the last), for one full-tile store."""
    shape = (cols[0].shape[0], NCOL)
    lane = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    out = jnp.zeros(shape, acc)
    for j, col in enumerate(cols):
        out = jnp.where(lane == j, jnp.broadcast_to(col.astype(acc), shape), out)
    return out


def _last(col):
    """[C, 1] -> [1, 1], its last entry (a masked sum: no scalar extraction needed)."""
    row = jax.lax.broadcasted_iota(jnp.int32, col.shape, 0)
    return jnp.sum(jnp.where(row == col.shape[0] - 1, col, 0), axis=0, keepdims=True)


def _rowsum(a):
    return jnp.sum(a, axis=1, keepdims=True)


def _total(a):
    return jnp.sum(_rowsum(a), axis=0, keepdims=True)


def _on_last(col, val):
    row = jax.lax.broadcasted_iota(jnp.int32, col.shape, 0)
    return col + jnp.where(row == col.shape[0] - 1, val, 0)


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


class ChunkGrads(NamedTuple):
    dk: jax.Array  # partial sums over dv tiles (all but dve)
    dq: jax.Array
    dke: jax.Array | None
    dve: jax.Array | None
    dr: jax.Array | None
    dr2: jax.Array | None
    df: jax.Array
    dg: jax.Array | None
    dte: jax.Array | None
    dcols: tuple  # [C, 1] each, in COLS order


def backward(c: Chunk, w, s, dy, dw1, ds1, fl: Flags, dot, acc):
    """VJP of ``forward`` at boundary state (w, s). Returns (ChunkGrads, dw, ds)."""
    eta, gam, dv, dl, al, bl, bp = c.cols
    C, bv = c.k.shape[0], w.shape[0]
    dy = dy.astype(acc)
    u = jnp.broadcast_to(_errors(c, w, fl, dot, acc), (C, bv))
    x = eta * u
    zero = jnp.zeros((C, 1), acc)

    # W' = gC W + dC S - p^T k,  S' = bC S - pb^T k.
    p = dl * x
    if fl.dgd:
        m = _pseudo(c, w, s, x, fl, dot)
        em = eta * m
        p = p + al * em
    pb = bl * x
    dp = -dot(c.k, dw1, "nt")
    dpb = -dot(c.k, ds1, "nt")
    dk = -dot(p, dw1, "nn") - dot(pb, ds1, "nn")
    dx = dl * dp + bl * dpb
    ddl = _rowsum(dp * x)
    dbl = _rowsum(dpb * x)
    dw = _last(gam) * dw1

    # y = gam*(q W^T) + dv*(q S^T) - f X - g em.
    qw = dot(c.q, w, "nt")
    dgam = _on_last(_rowsum(dy * qw), _total(dw1 * w))
    dqw = gam * dy
    dq = dot(dqw, w, "nn")
    dw = dw + dot(dqw, c.q, "tn")
    df = -dot(dy, x, "nt")
    dx = dx - dot(c.f, dy, "tn")
    ds = jnp.zeros_like(s)
    ddv, dbp = zero, zero
    if fl.momentum:
        qs = dot(c.q, s, "nt")
        ddv = _on_last(_rowsum(dy * qs), _total(dw1 * s))
        dbp = _on_last(zero, _total(ds1 * s))
        dqs = dv * dy
        dq = dq + dot(dqs, s, "nn")
        ds = _last(dv) * dw1 + _last(bp) * ds1 + dot(dqs, c.q, "tn")

    deta = zero
    dal, dr, dr2, dg, dte = zero, None, None, None, None
    if fl.dgd:
        dem = al * dp - dot(c.g, dy, "tn")
        dal = _rowsum(dp * em)
        dg = -dot(dy, em, "nt")
        dm = eta * dem
        deta = _rowsum(dem * m)
        dte = -dot(dm, x, "nt")
        dx = dx - dot(c.te, dm, "tn")
        dr = dot(dm, w, "nn")
        dw = dw + dot(dm, c.r, "tn")
        if fl.momentum:
            dr2 = dot(dm, s, "nn")
            ds = ds + dot(dm, c.r2, "tn")

    # X = eta * u,  u = ke W^T - ve.
    du = eta * dx
    deta = deta + _rowsum(dx * u)
    dke = dve = None
    if fl.has_ke:
        dke = dot(du, w, "nn")
        dw = dw + dot(du, c.k if fl.ke_is_k else c.ke, "tn")
        if fl.ke_is_k:
            dk, dke = dk + dke, None
    if fl.has_ve:
        dve = -du
    grads = ChunkGrads(dk, dq, dke, dve, dr, dr2, df, dg, dte,
                       (deta, dgam, ddv, ddl, dal, dbl, dbp))
    return grads, dw, ds
