"""The sequential part: the chunk-to-chunk state recurrence, forward and reverse.

    W_{n+1} = gC W_n + dC S_n - W_n K1 - S_n K2 + U        (``affine.py`` builds the operands)
    S_{n+1} = bC S_n - W_n Kb + V

Rows of the state are independent (every matmul acts on the right), so a kernel program owns
bv rows of W and S.  ``step`` and ``step_back`` are the per-chunk maths both kernels run (plain
arrays in, a ``dot`` in, so the same code runs in Triton, Mosaic and XLA); ``scan`` is the same
loop as ``lax.scan``: the kernels' oracle and ``impl="scan"``.

Reverse pass: with G_{n+1}, H_{n+1} the cotangents of the state after chunk n,

    G_n = dwb_n + gC G_{n+1} - G_{n+1} K1^T - H_{n+1} Kb^T
    H_n = dsb_n + dC G_{n+1} + bC H_{n+1} - G_{n+1} K2^T

(dwb, dsb: what reached the boundary states directly, from the readout).  The kernels write
G_{n+1}, H_{n+1} for every chunk; the operand cotangents (dK1 = -W_n^T G_{n+1}, ...) are then
batched matmuls over all chunks at once (``operand_grads``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nested_jax.kernels.affine import BC, DC, GC, LoopFlags, Transition
from nested_jax.kernels.chunk_math import make_dot, precision


def gate_columns(row, acc):
    """[1, 8] -> (gC, dC, bC) as [1, 1] arrays, by masked lane sums (no scalar extraction,
    which Mosaic and Triton handle differently)."""
    lane = jax.lax.broadcasted_iota(jnp.int32, row.shape, 1)
    row = row.astype(acc)
    return tuple(jnp.sum(jnp.where(lane == j, row, 0), axis=1, keepdims=True)
                 for j in (GC, DC, BC))


def step(w, s, t: dict, lf: LoopFlags, dot, acc):
    """One chunk forward: (W_n, S_n) [bv, dk] -> (W_{n+1}, S_{n+1}); t holds the chunk's
    operands (k1, k2, kb [dk, dk]; u, v [bv, dk]; gates [1, 8]) where the flags have them.
    Without momentum S is not carried (returned as given)."""
    gc, dc, bc = gate_columns(t["gates"], acc)
    w1 = gc * w
    if lf.k1:
        w1 = w1 - dot(w, t["k1"], "nn")
    if lf.u:
        w1 = w1 + t["u"].astype(acc)
    if not lf.momentum:
        return w1, s
    w1 = w1 + dc * s
    if lf.k2:
        w1 = w1 - dot(s, t["k2"], "nn")
    s1 = bc * s
    if lf.kb:
        s1 = s1 - dot(w, t["kb"], "nn")
    if lf.v:
        s1 = s1 + t["v"].astype(acc)
    return w1, s1


def step_back(g1, h1, t: dict, lf: LoopFlags, dot, acc):
    """Cotangents after a chunk (G_{n+1}, H_{n+1}) -> what they give the state before it
    (without the direct dwb_n, dsb_n, which the caller adds)."""
    gc, dc, bc = gate_columns(t["gates"], acc)
    g = gc * g1
    if lf.k1:
        g = g - dot(g1, t["k1"], "nt")
    if not lf.momentum:
        return g, h1
    if lf.kb:
        g = g - dot(h1, t["kb"], "nt")
    h = dc * g1 + bc * h1
    if lf.k2:
        h = h - dot(g1, t["k2"], "nt")
    return g, h


def operands(tr: Transition, lf: LoopFlags) -> dict:
    """The operands a kernel loads, by name."""
    names = [n for n in ("k1", "k2", "kb", "u", "v") if getattr(lf, n)]
    return {n: getattr(tr, n) for n in names} | {"gates": tr.gates}


def scan(tr: Transition, w0, s0, lf: LoopFlags, op_dtype):
    """(wb, sb, wN, sN): the boundary state of every chunk [BH, N, dv, dk] and the final one.

    Without momentum the loop carries W alone: sb and sN are None (``affine.final_momentum``)."""
    acc = w0.dtype
    dot = make_dot(op_dtype, acc)
    ops = operands(tr, lf)

    def one(ops1, w, s):
        def body(carry, t):
            w, s = carry
            w1, s1 = step(w, s, t, lf, dot, acc)
            return (w1, s1), (w, s)

        (wn, sn), (wb, sb) = jax.lax.scan(body, (w, s), ops1)
        return wb, sb, wn, sn

    wb, sb, wn, sn = jax.vmap(one)(ops, w0.astype(acc), s0.astype(acc))
    return (wb, sb, wn, sn) if lf.momentum else (wb, None, wn, None)


def operand_grads(tr: Transition, wb, sb, gn, hn, lf: LoopFlags, op_dtype) -> Transition:
    """Cotangents of the loop's operands, all chunks at once, from the boundary states
    (wb, sb) and the cotangents of the states after each chunk (gn, hn) [BH, N, dv, dk]."""
    acc = gn.dtype
    prec = precision(op_dtype)
    tn = lambda a, b: jnp.einsum("...vd,...ve->...de", a.astype(op_dtype), b.astype(op_dtype),
                                 precision=prec, preferred_element_type=acc)
    inner = lambda a, b: jnp.sum(a * b, axis=(-2, -1))
    zero = jnp.zeros(gn.shape[:2], acc)
    # Without momentum S_n is zero at every boundary: dC and bC get no cotangent.
    dgc = inner(wb, gn)
    ddc = inner(sb, gn) if lf.momentum else zero
    dbc = inner(sb, hn) if lf.momentum else zero
    gates = jnp.stack([dgc, ddc, dbc] + [zero] * (tr.gates.shape[-1] - 3), axis=-1)[:, :, None]
    cast = lambda x, like: None if like is None else x.astype(like.dtype)
    return Transition(
        k1=cast(-tn(wb, gn), tr.k1) if lf.k1 else None,
        k2=cast(-tn(sb, gn), tr.k2) if lf.k2 else None,
        kb=cast(-tn(wb, hn), tr.kb) if lf.kb else None,
        u=gn.astype(tr.u.dtype) if lf.u else None,
        v=hn.astype(tr.v.dtype) if lf.v else None,
        gates=gates.astype(tr.gates.dtype))
