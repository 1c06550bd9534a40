"""Path 3, fast dual forms in plain XLA: matmuls per chunk, no per-token loop.

Both forms run ``delta2.chunk`` (the 2x2-gated delta recurrence with stale inputs) and equal the
generic chunked path (``chunked.py``) for every chunk size; at C = 1 they equal the oracle.

* Linear memory M(k) = W k: the stale error of token i is u_i = dL/dy at W_0 k_i, its write is
  u_i k_i^T, and the DGD factor acts on W with input k.  One ``delta2.chunk`` per chunk.
* 2-layer MLP memory M(z) = z + W1 s(W2 z) (TTT-MLP style dual form): the boundary forward gives
  z_i = W2_0 k_i, h_i = s(z_i), u_i = dL/dy, and the backward gives the hidden error
  e_i = s'(z_i) * (W1_0^T u_i).  Then W2 is a delta2 recurrence with keys k_i, errors e_i and
  queries q_t (read-out z'_t = W2_t q_t), and W1 one with keys h_i, errors u_i and queries
  s(z'_t).  Causal in-chunk read-outs come from the masked (triangular) matmuls inside delta2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nested_jax.memory import delta2, objectives
from nested_jax.memory.chunked import scan_chunks
from nested_jax.memory.level import Gates, Level, MemoryState, maybe_stop
from nested_jax.memory.memories import LinearMemory, MLPMemory, activation
from nested_jax.memory.rules import effective_eta


def supports(level: Level) -> bool:
    mem = level.memory
    if isinstance(mem, LinearMemory):
        return True
    return isinstance(mem, MLPMemory) and mem.depth == 2


def _layer(level: Level, w0, s0, keys, errs, queries, g: Gates, is_input_side: bool):
    rule = level.rule
    beta = g.beta if rule.momentum else jnp.zeros_like(g.beta)
    dgd = rule.dgd and (is_input_side or rule.dgd_all_layers)
    eta = jax.vmap(lambda e, x: effective_eta(rule, e, x))(g.eta, keys) if dgd else g.eta
    if level.read == "boundary":
        # Reads see the boundary state; only the final state needs the recurrence.
        y = queries @ w0.T
        _, w1, s1 = delta2.chunk(w0, s0, keys, errs, queries, eta, g.alpha, beta, dgd)
        return y, w1, s1
    return delta2.chunk(w0, s0, keys, errs, queries, eta, g.alpha, beta, dgd)


def _linear_chunk(level: Level, st: MemoryState, q, k, v, g: Gates):
    w0 = st.params["W"]
    v = v @ w0.T if level.self_target else v
    u = objectives.error(level.objective, k @ w0.T, v)
    y, w, s = _layer(level, w0, st.mom["W"], k, u, q, g, True)
    return MemoryState({"W": w}, {"W": s}), y


def _mlp_chunk(level: Level, st: MemoryState, q, k, v, g: Gates):
    mem: MLPMemory = level.memory
    act = activation(mem.activation)
    w1, w2 = st.params["W1"], st.params["W2"]
    v = jax.vmap(mem.apply, in_axes=(None, 0))(st.params, v) if level.self_target else v
    z = k @ w2.T  # [C, hidden]
    h, dh = jax.jvp(act, (z,), (jnp.ones_like(z),))  # s(z), s'(z)
    y = h @ w1.T + (k if mem.residual else 0.0)
    u = objectives.error(level.objective, y, v)  # [C, dv]
    e = dh * (u @ w1)  # [C, hidden], error at the hidden pre-activation
    zq, w2n, s2n = _layer(level, w2, st.mom["W2"], k, e, q, g, True)
    hq = act(zq)
    oq, w1n, s1n = _layer(level, w1, st.mom["W1"], h, u, hq, g, False)
    o = oq + (q if mem.residual else 0.0)
    return MemoryState({"W1": w1n, "W2": w2n}, {"W1": s1n, "W2": s2n}), o


def run(level: Level, state: MemoryState, q, k, v, gates: Gates, chunk_size: int,
        remat: bool = True):
    """q, k: f[T, dk]; v: f[T, dv]; gates f[T]. Returns (o f[T, dv], final state)."""
    if not supports(level):
        raise ValueError(
            f"path='dual' supports LinearMemory and 2-layer MLPMemory, got {level.memory}; "
            "use path='chunked'."
        )
    k, v, gates = maybe_stop(level, k, v, gates)
    body = _linear_chunk if isinstance(level.memory, LinearMemory) else _mlp_chunk

    def chunk_fn(st, q_c, k_c, v_c, eta, alpha, beta):
        return body(level, st, q_c, k_c, v_c, Gates(eta, alpha, beta))

    return scan_chunks(chunk_fn, state, (q, k, v, *gates), chunk_size, remat)
