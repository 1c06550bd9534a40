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


def segment_products(a):
    """P[t, j] = prod_{l=j+1..t} a_l for j <= t, else 0. a: f[C] -> f[C, C] (cumprod, no logs)."""
    c = a.shape[0]
    t = jnp.arange(c)[:, None]
    j = jnp.arange(c)[None, :]
    mat = jnp.where(t > j, a[:, None], jnp.ones((), a.dtype))
    return jnp.where(t >= j, jnp.cumprod(mat, axis=0), jnp.zeros((), a.dtype))


def _doubling_inverse(lower):
    """(I + L)^{-1} by doubling: L is nilpotent (L^C = 0), so (I + L)^{-1} = sum_{n<C} (-L)^n
    = prod_i (I + (-L)^(2^i)), i < ceil(log2 C).  Leading axes of ``lower`` are a batch."""
    c = lower.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(c, dtype=lower.dtype), lower.shape)
    power, inv = -lower, eye - lower
    for _ in range(max(0, (c - 1).bit_length() - 1)):
        power = _mm(power, power)
        inv = _mm(inv, eye + power)
    return inv


def unit_lower_inverse(lower, leaf: int = 16):
    """(I + L)^{-1} for strictly lower-triangular L (C x C), without a sequential solve.

    The diagonal blocks of ``leaf`` rows are inverted together by doubling (one batched chain
    of 2 log2(leaf) matmuls: XLA's CPU and GPU triangular solves are slow loops), then pairs
    of neighbouring blocks are merged level by level with the 2 x 2 block formula
    [[P, 0], [Q, R]]^{-1} = [[P^-1, 0], [-R^-1 Q P^-1, R^-1]] (two batched matmuls a level).
    At C = 32 or 64 that is as many matmul launches as doubling on the whole chunk and ~15x
    fewer flops.  C is zero-padded to leaf * 2^k (the padded block's inverse is I).  Exact in
    exact arithmetic; tested against numpy and the per-token oracle in float64.
    """
    c = lower.shape[0]
    if c <= leaf:
        return _doubling_inverse(lower)
    n = 1 << (-(-c // leaf) - 1).bit_length()  # leaf blocks, a power of two
    size = n * leaf
    lp = jnp.zeros((size, size), lower.dtype).at[:c, :c].set(lower)
    # Static slices + stack: the same blocks taken by a gather crashed XLA:CPU's algebraic
    # simplifier under vmap (jaxlib 0.10.2).
    block = lambda i, j, b: lp[i * b:(i + 1) * b, j * b:(j + 1) * b]
    inv = _doubling_inverse(jnp.stack([block(i, i, leaf) for i in range(n)]))  # batched
    b = leaf
    while inv.shape[0] > 1:  # merge diagonal blocks (2j, 2j+1) of size b into one of 2b
        m = inv.shape[0] // 2
        q = jnp.stack([block(2 * j + 1, 2 * j, b) for j in range(m)])  # [m, b, b]
        p_inv, r_inv = inv[0::2], inv[1::2]
        off = -_mm(r_inv, _mm(q, p_inv))
        top = jnp.concatenate([p_inv, jnp.zeros_like(p_inv)], axis=2)
        inv = jnp.concatenate([top, jnp.concatenate([off, r_inv], axis=2)], axis=1)
        b *= 2
    return inv[0, :c, :c]


def _shift_down(x):
    """Row t of the result is row t-1 of x (row 0 is zero)."""
    pad = jnp.zeros_like(x[:1])
    return jnp.concatenate([pad, x[:-1]], axis=0)


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


def _mm(a, b):
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


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
    lower = _shift_down(g.A) * kk * eta[None, :]  # strictly lower
    return Prep(g, eta, g.D * kr, g.A * kr, _shift_down(g.D) * kk, unit_lower_inverse(lower))


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
        gprev = _shift_down(g.gamma).at[0].set(1.0)  # Gamma_{t-1}, empty product at t = 0
        rhs = gprev[:, None] * rd.km0 - dkk_ex
        if rd.ks0 is not None:
            rhs = rhs + _shift_down(g.d)[:, None] * rd.ks0
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
