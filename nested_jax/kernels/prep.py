"""The state-independent half of each chunk, in plain XLA, batched over all chunks at once.

``memory/gated_delta_dual.py`` derives one chunk of the 2x2-gated delta recurrence with stale
inputs.  Everything in it that does not involve the boundary state (W_0, S_0) is computed here,
for all chunks in parallel: the gate segment products A, B, D = A B, the causal masks folded into
f = D * (q k^T) and g = A * (q k^T), and the DGD pseudo-value system

    (I + L) m = Gamma^- (k W_0^T) + d^- (k S_0^T) - (D^- * k k^T) X,   L = A^- * k k^T diag(eta)

solved once per chunk for its three right-hand sides: m = r W_0^T + r2 S_0^T - te X with
[te | r | r2] = (I + L)^{-1} [D^- * kk | Gamma^- k | d^- k].  The solve is blocked forward
substitution: 16 x 16 diagonal blocks inverted by doubling (``triangular.unit_lower_inverse``,
whose leaf case this is), off-diagonal blocks by matmuls.  That is ~6x
fewer flops than doubling on the full 64 x 64 system, all batched matmuls (XLA's GPU
triangular solve is a slow loop), and the powers of L stay short.  The kernels only see the
matmuls that remain (``chunk_math.py``).  Autodiff of this file gives the gradients that flow
from the kernels' backward into q, k, v and the gates.

Matmul precision: HIGHEST for f32/f64 kernels; DEFAULT when the kernels take bf16 operands
(every output here is rounded to bf16 anyway).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nested_jax.kernels.chunk_math import NCOL, Chunk, Flags, precision
from nested_jax.kernels.triangular import segment_products, shift_down, solve_unit_lower


def chunk_prep(q, k, ke, ve, eta, alpha, beta, fl: Flags, op_dtype):
    """One chunk: q, k, ke f[C, dk]; ve f[C, dv]; gates f[C] (compute precision) -> ``Chunk``.

    ke, ve are the error inputs (u = ke W^T - ve, see ``memory/pallas.error_inputs``), None
    where the flags drop them.  Matrices are returned in ``op_dtype`` (the kernels' matmul operand
    type), the per-token columns in the compute precision.  ``beta`` must already be zero when
    not fl.momentum.
    """
    hp = precision(op_dtype)
    mm = lambda a, b: jnp.matmul(a, b, precision=hp)
    A = segment_products(alpha)
    gam = jnp.cumprod(alpha)
    if fl.momentum:
        B = segment_products(beta)
        bp = jnp.cumprod(beta)
        D = mm(A, B)
        dv = mm(A, bp)
    else:  # beta = 0: B = I, no momentum carry-over.
        B = jnp.eye(alpha.shape[0], dtype=alpha.dtype)
        bp = dv = jnp.zeros_like(alpha)
        D = A
    kr = mm(q, k.T)
    zero = jnp.zeros_like(alpha)
    al = A[-1] if fl.dgd else zero
    cols = jnp.stack([eta, gam, dv, D[-1], al, B[-1], bp] + [zero] * (NCOL - 7), axis=-1)
    r = r2 = g = te = None
    if fl.dgd:
        kk = mm(k, k.T)
        lower = shift_down(A) * kk * eta[None, :]  # strictly lower
        gprev = shift_down(gam).at[0].set(1.0)
        rhs = [shift_down(D) * kk, gprev[:, None] * k]
        if fl.momentum:
            rhs.append(shift_down(dv)[:, None] * k)
        sol = solve_unit_lower(lower, jnp.concatenate(rhs, axis=1), mm)
        C, dk = k.shape
        te, r = sol[:, :C], sol[:, C:C + dk]
        r2 = sol[:, C + dk:] if fl.momentum else None
        g = A * kr
    cast = lambda x: None if x is None else x.astype(op_dtype)
    return Chunk(k=cast(k), q=cast(q), ke=cast(ke), ve=cast(ve), r=cast(r), r2=cast(r2),
                 f=cast(D * kr), g=cast(g), te=cast(te), cols=cols)


def prep(q, k, ke, ve, eta, alpha, beta, fl: Flags, op_dtype, chunk_size: int):
    """[BH, T, ...] with T = N * chunk_size -> ``Chunk`` of [BH, N, C, ...] arrays."""
    BH, T = eta.shape
    n = T // chunk_size
    split = lambda x: None if x is None else x.reshape(BH, n, chunk_size, *x.shape[2:])
    fn = lambda *a: chunk_prep(*a, fl=fl, op_dtype=op_dtype)
    return jax.vmap(jax.vmap(fn))(*map(split, (q, k, ke, ve, eta, alpha, beta)))
