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

import jax
import jax.numpy as jnp


def segment_products(a):
    """P[t, j] = prod_{l=j+1..t} a_l for j <= t, else 0. a: f[C] -> f[C, C] (cumprod, no logs)."""
    c = a.shape[0]
    t = jnp.arange(c)[:, None]
    j = jnp.arange(c)[None, :]
    mat = jnp.where(t > j, a[:, None], jnp.ones((), a.dtype))
    return jnp.where(t >= j, jnp.cumprod(mat, axis=0), jnp.zeros((), a.dtype))


def unit_lower_inverse(lower):
    """(I + L)^{-1} for strictly lower-triangular L (C x C), by doubling.

    L is nilpotent (L^C = 0), so (I + L)^{-1} = sum_{n<C} (-L)^n = prod_i (I + (-L)^(2^i)),
    i < ceil(log2 C): 2 log2(C) small matmuls instead of a sequential triangular solve, which
    XLA's CPU and GPU backends run as a slow loop.  Exact in exact arithmetic; tested against
    the per-token oracle in float64.
    """
    c = lower.shape[0]
    eye = jnp.eye(c, dtype=lower.dtype)
    power, inv = -lower, eye - lower
    for _ in range(max(0, (c - 1).bit_length() - 1)):
        power = jnp.matmul(power, power, precision=jax.lax.Precision.HIGHEST)
        inv = jnp.matmul(inv, eye + power, precision=jax.lax.Precision.HIGHEST)
    return inv


def _shift_down(x):
    """Row t of the result is row t-1 of x (row 0 is zero)."""
    pad = jnp.zeros_like(x[:1])
    return jnp.concatenate([pad, x[:-1]], axis=0)


def chunk(m0, s0, k, x, r, eta, alpha, beta, dgd: bool):
    """One chunk of the recurrence above.

    m0, s0: f[do, di]; k: f[C, di] keys (matrix inputs); x: f[C, do] stale errors;
    r: f[C, di] queries; eta, alpha, beta: f[C].
    Returns (y f[C, do] with y_t = M_t r_t, M_{C-1}, S_{C-1}).
    """
    hp = jax.lax.Precision.HIGHEST
    mm = lambda a, b: jnp.matmul(a, b, precision=hp)

    A = segment_products(alpha)  # [C, C]
    B = segment_products(beta)
    gamma = jnp.cumprod(alpha)  # [C]
    bprod = jnp.cumprod(beta)
    D = mm(A, B)
    d = mm(A, bprod)

    ex = eta[:, None] * x  # [C, do]
    kr = mm(r, k.T)  # [C, C], kr[t, i] = r_t . k_i
    km0 = mm(k, m0.T)  # rows M_0 k_t
    rm0 = mm(r, m0.T)
    rs0 = mm(r, s0.T)

    y = gamma[:, None] * rm0 + d[:, None] * rs0 - mm(D * kr, ex)
    m_last = gamma[-1] * m0 + d[-1] * s0 - mm(ex.T * D[-1][None, :], k)
    if dgd:
        kk = mm(k, k.T)
        ks0 = mm(k, s0.T)
        lower = _shift_down(A) * kk * eta[None, :]  # strictly lower
        gprev = _shift_down(gamma).at[0].set(1.0)  # Gamma_{t-1}, empty product at t = 0
        rhs = gprev[:, None] * km0 + _shift_down(d)[:, None] * ks0 - mm(_shift_down(D) * kk, ex)
        m = mm(unit_lower_inverse(lower), rhs)
        em = eta[:, None] * m
        y = y - mm(A * kr, em)
        m_last = m_last - mm(em.T * A[-1][None, :], k)
    s_last = bprod[-1] * s0 - mm(ex.T * B[-1][None, :], k)
    return y, m_last, s_last
