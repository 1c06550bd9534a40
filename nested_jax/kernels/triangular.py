"""Triangular helpers of the chunked delta recurrence, shared by the engine's dual form
(``nested_jax/memory/gated_delta_dual.py``) and the kernels' parallel prep (``prep.py``):
gate segment products, the inverse of a unit lower-triangular matrix without a sequential
solve, and the blocked forward substitution built on it.  Plain arrays in, arrays out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 16  # diagonal block of the blocked forward substitution


def segment_products(a):
    """P[t, j] = prod_{l=j+1..t} a_l for j <= t, else 0. a: f[C] -> f[C, C] (cumprod, no logs)."""
    c = a.shape[0]
    t = jnp.arange(c)[:, None]
    j = jnp.arange(c)[None, :]
    mat = jnp.where(t > j, a[:, None], jnp.ones((), a.dtype))
    return jnp.where(t >= j, jnp.cumprod(mat, axis=0), jnp.zeros((), a.dtype))


def doubling_inverse(lower):
    """(I + L)^{-1} by doubling: L is nilpotent (L^C = 0), so (I + L)^{-1} = sum_{n<C} (-L)^n
    = prod_i (I + (-L)^(2^i)), i < ceil(log2 C).  Leading axes of ``lower`` are a batch."""
    c = lower.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(c, dtype=lower.dtype), lower.shape)
    power, inv = -lower, eye - lower
    for _ in range(max(0, (c - 1).bit_length() - 1)):
        power = mm_highest(power, power)
        inv = mm_highest(inv, eye + power)
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
        return doubling_inverse(lower)
    n = 1 << (-(-c // leaf) - 1).bit_length()  # leaf blocks, a power of two
    size = n * leaf
    lp = jnp.zeros((size, size), lower.dtype).at[:c, :c].set(lower)
    # Static slices + stack: the same blocks taken by a gather crashed XLA:CPU's algebraic
    # simplifier under vmap (jaxlib 0.10.2).
    block = lambda i, j, b: lp[i * b:(i + 1) * b, j * b:(j + 1) * b]
    inv = doubling_inverse(jnp.stack([block(i, i, leaf) for i in range(n)]))  # batched
    b = leaf
    while inv.shape[0] > 1:  # merge diagonal blocks (2j, 2j+1) of size b into one of 2b
        m = inv.shape[0] // 2
        q = jnp.stack([block(2 * j + 1, 2 * j, b) for j in range(m)])  # [m, b, b]
        p_inv, r_inv = inv[0::2], inv[1::2]
        off = -mm_highest(r_inv, mm_highest(q, p_inv))
        top = jnp.concatenate([p_inv, jnp.zeros_like(p_inv)], axis=2)
        inv = jnp.concatenate([top, jnp.concatenate([off, r_inv], axis=2)], axis=1)
        b *= 2
    return inv[0, :c, :c]


def shift_down(x):
    """Row t of the result is row t-1 of x (row 0 is zero)."""
    pad = jnp.zeros_like(x[:1])
    return jnp.concatenate([pad, x[:-1]], axis=0)


def mm_highest(a, b):
    """a @ b at full float32/float64 precision (XLA:GPU would otherwise use TF32)."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def solve_unit_lower(lower, rhs, mm, block: int = BLOCK):
    """(I + lower)^{-1} rhs for strictly lower-triangular ``lower`` [C, C], rhs [C, n]."""
    c = lower.shape[0]
    if c <= block or c % block:
        return mm(unit_lower_inverse(lower), rhs)
    rows = []
    for i in range(c // block):
        sl = slice(i * block, (i + 1) * block)
        acc = rhs[sl]
        for j, x in enumerate(rows):
            acc = acc - mm(lower[sl, j * block:(j + 1) * block], x)
        rows.append(mm(unit_lower_inverse(lower[sl, sl]), acc))
    return jnp.concatenate(rows, axis=0)
