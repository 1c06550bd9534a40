"""Dual (matmul) form of one chunk of the 2x2-gated delta recurrence with stale inputs.

This is the primitive behind every fast path (decisions.md #6, "a note for the fast path").
For one weight matrix M (d_out, d_in) with momentum S, over a chunk t = 0..C-1:

    S_t = beta_t S_{t-1} - eta_t x_t k_t^T
    M_t = M_{t-1} (alpha_t I - c eta_t k_t k_t^T) + S_t          c in {0, 1} (DGD on/off)

where the "errors" x_t were computed from the chunk-boundary state (the stale gradient
u_t = dL/dy at M_0, so the write of token t is x_t k_t^T), and we want the read-outs
y_t = M_t r_t for queries r_t, and the final (M_{C-1}, S_{C-1}).

Unrolling with segment products A[t, j] = prod_{l=j+1..t} alpha_l, B[t, i] = prod beta_l,
Gamma_t = prod_{l<=t} alpha_l, b_t = prod_{l<=t} beta_l:

    S_t = b_t S_0 - sum_{i<=t} B[t,i] eta_i x_i k_i^T
    M_t = Gamma_t M_0 + d_t S_0 - sum_{i<=t} D[t,i] eta_i x_i k_i^T
          - c sum_{j<=t} A[t,j] eta_j m_j k_j^T,            D = A @ B,  d = A @ b,

with the DGD "pseudo-values" m_t = M_{t-1} k_t.  Substituting the row t-1 of the same formula
gives a unit lower-triangular system for m (the UT transform of the delta rule, here with the
2x2 gate [[alpha, 0], [beta, beta]] acting on Z = [M | S] folded into D):

    (I + c (A^- * KK^T) diag(eta)) m = Gamma^- (K M_0^T) + d^- (K S_0^T) - (D^- * KK^T)(eta X)

(^- = the same matrix shifted one row down).  All products are C x C or C x d matmuls; no
division by gates is needed, so alpha = 0 or beta = 0 are exact.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nested_jax.kernels.triangular import mm_highest as _mm
from nested_jax.kernels.triangular import segment_products, shift_down, unit_lower_inverse


class GateProducts(NamedTuple):
    """The gates' part of a chunk: depends on (alpha, beta) only, shared by every matrix."""

    A: jax.Array  # [C, C] prod alpha over (j, t]
    D: jax.Array  # [C, C] A @ B
    gamma: jax.Array  # [C] Gamma_t
    d: jax.Array  # [C] A @ b
    b_last: jax.Array  # [C] B[-1]
    bprod_last: jax.Array  # [] b_{C-1}


class Prep(NamedTuple):
    """Everything of a chunk that does not involve the boundary state (M_0, S_0).

    It depends on keys, queries and gates only; ``update`` is the part linear in (M_0, S_0).
    DGD-only fields are None when c = 0.
    """

    g: GateProducts
    eta: jax.Array  # [C]
    dkr: jax.Array  # [C, C] D * (r k^T): in-chunk read of the stale writes
    akr: jax.Array | None  # [C, C] A * (r k^T): in-chunk read of the DGD writes
    dkk: jax.Array | None  # [C, C] D^- * (k k^T): right-hand side of the m system
    inv: jax.Array | None  # [C, C] (I + c (A^- * KK^T) diag(eta))^{-1}


class Reads(NamedTuple):
    """The boundary state read at the keys and queries: rows M_0 k_t, S_0 k_t, M_0 r_t, S_0 r_t."""

    km0: jax.Array
    ks0: jax.Array | None
    rm0: jax.Array
    rs0: jax.Array | None


def gate_products(alpha, beta) -> GateProducts:
    A = segment_products(alpha)
    B = segment_products(beta)
    bprod = jnp.cumprod(beta)
    return GateProducts(A, _mm(A, B), jnp.cumprod(alpha), _mm(A, bprod), B[-1], bprod[-1])


def prepare(g: GateProducts, k, r, eta, dgd: bool) -> Prep:
    """k: f[C, di] keys; r: f[C, di] queries; eta f[C]."""
    kr = _mm(r, k.T)  # kr[t, i] = r_t . k_i
    if not dgd:
        return Prep(g, eta, g.D * kr, None, None, None)
    kk = _mm(k, k.T)
    lower = shift_down(g.A) * kk * eta[None, :]  # strictly lower
    return Prep(g, eta, g.D * kr, g.A * kr, shift_down(g.D) * kk, unit_lower_inverse(lower))


def read_rows(m0, s0, x, momentum: bool):
    """(rows M_0 x_t, rows S_0 x_t or None): one matmul x @ [M_0; S_0]^T."""
    do = m0.shape[0]
    out = _mm(x, (jnp.concatenate([m0, s0], axis=0) if momentum else m0).T)
    return out[:, :do], (out[:, do:] if momentum else None)


def reads(m0, s0, k, r, momentum: bool) -> Reads:
    """All four reads in one matmul [r; k] @ [M_0; S_0]^T (S_0 only with momentum)."""
    c = k.shape[0]
    xm0, xs0 = read_rows(m0, s0, jnp.concatenate([r, k], axis=0), momentum)
    split = lambda a: (None, None) if a is None else (a[:c], a[c:])
    (rm0, km0), (rs0, ks0) = split(xm0), split(xs0)
    return Reads(km0, ks0, rm0, rs0)


def update(p: Prep, rd: Reads, m0, s0, k, x, online: bool = True):
    """The state-dependent half: x f[C, do] stale errors (from ``rd.km0``).

    Returns (y f[C, do], M_{C-1}, S_{C-1}); y_t = M_t r_t if ``online`` else M_0 r_t.
    ``rd.ks0``/``rd.rs0`` None means S_0 does not feed back (no momentum: d = 0).
    """
    g, c, do = p.g, k.shape[0], m0.shape[0]
    ex = p.eta[:, None] * x  # [C, do]
    w_last = g.D[-1][:, None] * ex  # [C, do]: token weights of the final-state write
    y = rd.rm0
    if online:
        mats = [p.dkr] if p.inv is None else [p.dkr, p.dkk]
        both = _mm(jnp.concatenate(mats, axis=0), ex)  # [C or 2C, do]: one matmul
        y = g.gamma[:, None] * rd.rm0 - both[:c]
        if rd.rs0 is not None:
            y = y + g.d[:, None] * rd.rs0
        dkk_ex = both[c:]
    elif p.inv is not None:
        dkk_ex = _mm(p.dkk, ex)
    if p.inv is not None:
        gprev = shift_down(g.gamma).at[0].set(1.0)  # Gamma_{t-1}, empty product at t = 0
        rhs = gprev[:, None] * rd.km0 - dkk_ex
        if rd.ks0 is not None:
            rhs = rhs + shift_down(g.d)[:, None] * rd.ks0
        em = p.eta[:, None] * _mm(p.inv, rhs)  # eta_t m_t
        if online:
            y = y - _mm(p.akr, em)
        w_last = w_last + g.A[-1][:, None] * em
    lasts = _mm(jnp.concatenate([w_last, g.b_last[:, None] * ex], axis=1).T, k)  # [2 do, di]
    m_last = g.gamma[-1] * m0 + g.d[-1] * s0 - lasts[:do]
    s_last = g.bprod_last * s0 - lasts[do:]
    return y, m_last, s_last


def chunk(m0, s0, k, x, r, eta, alpha, beta, dgd: bool):
    """One chunk of the recurrence above, all in one call (``prepare`` + ``update``).

    m0, s0: f[do, di]; k: f[C, di] keys (matrix inputs); x: f[C, do] stale errors;
    r: f[C, di] queries; eta, alpha, beta: f[C].
    Returns (y f[C, do] with y_t = M_t r_t, M_{C-1}, S_{C-1}).
    """
    p = prepare(gate_products(alpha, beta), k, r, eta, dgd)
    return update(p, reads(m0, s0, k, r, True), m0, s0, k, x)
