"""One chunk as an affine map of its boundary state: the state-independent operands, in XLA.

With stale inputs every term of a chunk (``chunk_math.forward``) is affine in the boundary
state (W, S): the errors X = eta * (ke W^T - ve) = E W^T + X0, the DGD pseudo-values
eta * m = M1 W^T + M2 S^T + M0, and so the outputs and the next state.  Regrouping by the state
moves every [C, C] and [C, d] matmul out of the sequential chunk loop:

    y  = Q1 W^T + Q2 S^T + Y0                       (all chunks in parallel, ``output``)
    W' = gC W + dC S - W K1 - S K2 + U               (the loop: ``statepass``)
    S' = bC S - W Kb + V

with, per chunk (p = dl*X + al*eta*m and pb = bl*X are the write's two error columns),

    E  = eta*ke      X0 = -eta*ve
    M1 = eta*(r - te E)      M2 = eta*r2      M0 = -eta*(te X0)
    P1 = dl*E + al*M1   P2 = al*M2   P0 = dl*X0 + al*M0      Pb1 = bl*E   Pb0 = bl*X0
    K1 = P1^T k   K2 = P2^T k   Kb = Pb1^T k   U = -P0^T k   V = -Pb0^T k
    Q1 = gam*q - f E - g M1   Q2 = dv*q - g M2   Y0 = -f X0 - g M0.

The loop is then one to three [bv, dk] x [dk, dk] matmuls per chunk, none depending on another
(the structure of the best chunked delta-rule kernels: a parallel preparation, a lean
state-passing loop, a parallel output).  Terms the flags switch off are None, not zeros, so
no kernel loads or multiplies them.  Autodiff of this file carries the loop's operand
cotangents back to ``prep``'s outputs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nested_jax.kernels.chunk_math import Chunk, Flags, precision


class Transition(NamedTuple):
    """The loop's operands for [BH, N] chunks (None where the flags drop a term)."""

    k1: jax.Array | None  # [BH, N, dk, dk] op dtype
    k2: jax.Array | None  # [BH, N, dk, dk] (DGD with momentum)
    kb: jax.Array | None  # [BH, N, dk, dk] (l2 or self-target errors)
    u: jax.Array | None  # [BH, N, dv, dk] carried precision (errors with a target)
    v: jax.Array | None  # [BH, N, dv, dk]
    gates: jax.Array  # [BH, N, 1, 8]: gC, dC, bC in lanes 0..2, carried precision


class Readout(NamedTuple):
    """y = Q1 W^T + Q2 S^T + Y0 for [BH, N] chunks."""

    q1: jax.Array  # [BH, N, C, dk] op dtype
    q2: jax.Array | None  # (momentum)
    y0: jax.Array | None  # [BH, N, C, dv] carried precision


GC, DC, BC = range(3)
NGATE = 8


class LoopFlags(NamedTuple):
    """Which transition terms exist (static): each False drops a load and a matmul."""

    k1: bool
    k2: bool
    kb: bool
    u: bool
    v: bool
    momentum: bool


def loop_flags(fl: Flags) -> LoopFlags:
    """Without momentum S never feeds back: the loop carries W alone, and the final S (the
    last chunk's S' = V - W Kb) is read off the last boundary state (``final_momentum``)."""
    mom = fl.momentum
    return LoopFlags(k1=fl.has_ke or fl.dgd, k2=fl.dgd and mom, kb=fl.has_ke and mom,
                     u=fl.has_ve, v=fl.has_ve and mom, momentum=mom)


def final_momentum(tr: Transition, w_last, op_dtype, acc):
    """S after the last chunk when the loop does not carry S: V - W_{N-1} Kb of that chunk
    (w_last [BH, dv, dk]); zeros when neither term exists."""
    s = jnp.zeros(w_last.shape, acc)
    if tr.kb is not None:
        s = s - _matmul(op_dtype, acc)(w_last, tr.kb[:, -1])
    if tr.v is not None:
        s = s + tr.v[:, -1].astype(acc)
    return s


def _matmul(op_dtype, acc):
    prec = precision(op_dtype)
    return lambda a, b: jnp.matmul(a.astype(op_dtype), b.astype(op_dtype), precision=prec,
                                   preferred_element_type=acc)


def _add(*terms):
    """Sum of the terms that exist (None if none does)."""
    terms = [t for t in terms if t is not None]
    return None if not terms else sum(terms[1:], terms[0])


def _scale(col, x):
    return None if x is None else col * x


def _neg(x):
    return None if x is None else -x


def chunk_transition(c: Chunk, cols, fl: Flags, op_dtype, acc):
    """One chunk (``Chunk`` of [C, ...], cols [C, 8]) -> (Transition, Readout) of one chunk."""
    mm = _matmul(op_dtype, acc)
    opt_mm = lambda a, b: None if a is None or b is None else mm(a, b)
    eta, gam, dvc, dl, al, bl, bp = (cols[:, j:j + 1].astype(acc) for j in range(7))
    k = c.k
    ke = (k if fl.ke_is_k else c.ke) if fl.has_ke else None
    E = _scale(eta, None if ke is None else ke.astype(acc))
    X0 = _scale(-eta, None if c.ve is None else c.ve.astype(acc))
    M1 = M2 = M0 = None
    if fl.dgd:
        M1 = eta * _add(c.r.astype(acc), _neg(opt_mm(c.te, E)))
        M2 = _scale(eta, None if c.r2 is None else c.r2.astype(acc))
        M0 = _scale(-eta, opt_mm(c.te, X0))
    P1 = _add(_scale(dl, E), _scale(al, M1))
    P2 = _scale(al, M2)
    P0 = _add(_scale(dl, X0), _scale(al, M0))
    Pb1, Pb0 = _scale(bl, E), _scale(bl, X0)
    kt = lambda P: None if P is None else mm(P.T, k)  # [dk or dv, dk]
    cast = lambda x: None if x is None else x.astype(op_dtype)
    last = lambda col: col[-1, 0]
    zero = jnp.zeros((), acc)
    gates = jnp.stack([last(gam), last(dvc), last(bp)] + [zero] * (NGATE - 3))[None, :]
    tr = Transition(k1=cast(kt(P1)), k2=cast(kt(P2)) if fl.momentum else None,
                    kb=cast(kt(Pb1)), u=_neg(kt(P0)), v=_neg(kt(Pb0)), gates=gates)
    q = c.q.astype(acc)
    q1 = _add(gam * q, _neg(opt_mm(c.f, E)), _neg(opt_mm(c.g, M1)))
    q2 = _add(dvc * q, _neg(opt_mm(c.g, M2))) if fl.momentum else None
    y0 = _add(_neg(opt_mm(c.f, X0)), _neg(opt_mm(c.g, M0)))
    return tr, Readout(q1=cast(q1), q2=cast(q2), y0=y0)


def transition(ch: Chunk, fl: Flags, op_dtype, acc):
    """``Chunk`` of [BH, N, C, ...] -> (Transition, Readout) of [BH, N, ...] arrays."""
    cols = ch.cols
    body = ch._replace(cols=None)
    fn = lambda c, cl: chunk_transition(c, cl, fl, op_dtype, acc)
    return jax.vmap(jax.vmap(fn))(body, cols)


def output(ro: Readout, wb, sb, op_dtype, acc):
    """y [BH, N, C, dv] from the boundary states wb, sb [BH, N, dv, dk] (sb None: no S)."""
    mm = _matmul(op_dtype, acc)
    read = lambda qx, st: mm(qx, jnp.swapaxes(st, -1, -2))
    y = read(ro.q1, wb)
    if ro.q2 is not None:
        y = y + read(ro.q2, sb)
    return y if ro.y0 is None else y + ro.y0
