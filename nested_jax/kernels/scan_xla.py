"""The kernels' sequential loop as a plain ``lax.scan``: the in-package oracle for the kernels,
and ``impl="scan"``, the kernels' algorithm in XLA on any backend.

Same inputs and outputs as the Pallas forward kernels (``prep.Chunk`` of [BH, N, C, ...]),
computed with ``chunk_math.forward`` in XLA.  Tests hold each kernel's forward to this scan and
its hand-written backward to ``jax.vjp`` of this scan, in float64; the end-to-end tests then
hold the whole pipeline to ``memory.apply`` (dual path and per-token oracle).

``backward`` is the Pallas backward kernels' reverse chunk loop (``chunk_math.backward``) as a
reverse ``lax.scan``, with the same output layout, so ``vjp.make_core("scan")`` runs the whole
kernel pipeline (parallel prep, sequential forward saving boundary states, hand-written
sequential backward) without Pallas: no per-chunk rematerialisation, no autodiff of the loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nested_jax.kernels import chunk_math
from nested_jax.kernels.chunk_math import Chunk, Flags


def scan(ch: Chunk, w0, s0, fl: Flags, op_dtype):
    """ch: [BH, N, C, ...]; w0, s0 f[BH, dv, dk]. Returns (y [BH, N, C, dv], wN, sN, wb, sb).

    wb, sb f[BH, N, dv, dk] are the boundary states (the state at the start of each chunk),
    which the forward kernels also return for the backward.
    """
    acc = w0.dtype
    dot = chunk_math.make_dot(op_dtype, acc)

    def one(ch1, w, s):
        def body(carry, c):
            w, s = carry
            c = c._replace(cols=chunk_math.unpack_cols(c.cols, acc))
            y, w1, s1 = chunk_math.forward(c, w, s, fl, dot, acc)
            return (w1, s1), (y, w, s)

        (wn, sn), (y, wb, sb) = jax.lax.scan(body, (w, s), ch1)
        return y, wn, sn, wb, sb

    return jax.vmap(one)(ch, w0.astype(acc), s0.astype(acc))


def backward(ch: Chunk, wb, sb, dy, dwN, dsN, fl: Flags, op_dtype):
    """Reverse chunk loop (``mosaic.backward``'s contract with one dv tile).

    Returns (dict of per-field cotangents, dw0, ds0); the cotangents of every field but ve carry
    a tile axis of size 1 at position 1, as the kernels' partial sums over dv tiles do.
    """
    acc = dwN.dtype
    dot = chunk_math.make_dot(op_dtype, acc)

    def one(ch1, wb1, sb1, dy1, dwn, dsn):
        def body(carry, xs):
            c, w, s, dyc = xs
            c = c._replace(cols=chunk_math.unpack_cols(c.cols, acc))
            s = s if fl.momentum else jnp.zeros_like(w)
            g, dw, ds = chunk_math.backward(c, w, s, dyc, *carry, fl, dot, acc)
            return (dw, ds), g._replace(dcols=chunk_math.pack_cols(g.dcols, acc))

        (dw0, ds0), g = jax.lax.scan(body, (dwn, dsn), (ch1, wb1, sb1, dy1), reverse=True)
        return g, dw0, ds0

    g, dw0, ds0 = jax.vmap(one)(ch, wb, sb, dy, dwN, dsN)
    grads = {name: (x if name == "dve" else x[:, None])
             for name, x in g._asdict().items() if x is not None}
    return grads, dw0, ds0
