"""The pipeline's oracle: ``chunk_math.forward`` (the direct per-chunk form) in a ``lax.scan``.

Same inputs as the kernels' pipeline (``prep.Chunk`` of [BH, N, C, ...]) and the same outputs
(y, final states, boundary states).  Tests hold ``vjp.make_core`` (transition, loop, readout;
``impl="scan"`` and every kernel) to this scan and to its ``jax.vjp``, in float64; the
end-to-end tests then hold the whole pipeline to ``memory.apply`` (dual path and per-token
oracle).
"""

from __future__ import annotations

import jax

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
