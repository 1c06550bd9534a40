"""Path 3, fast dual forms in plain XLA: matmuls per chunk, no per-token loop.

Both forms run ``gated_delta_dual`` per chunk (the 2x2-gated delta recurrence with stale
inputs: ``prepare``, ``reads``, ``update``) and equal the generic chunked path (``chunked.py``)
for every chunk size; at C = 1 they equal the oracle.

* Linear memory M(k) = W k: the stale error of token i is u_i = dL/dy at W_0 k_i, its write is
  u_i k_i^T, and the DGD factor acts on W with input k.  One gated-delta recurrence per chunk.
* 2-layer MLP memory M(z) = z + W1 s(W2 z) (TTT-MLP style dual form): the boundary forward gives
  z_i = W2_0 k_i, h_i = s(z_i), u_i = dL/dy, and the backward gives the hidden error
  e_i = s'(z_i) * (W1_0^T u_i).  Then W2 is a gated-delta recurrence with keys k_i, errors e_i
  and queries q_t (read-out z'_t = W2_t q_t), and W1 one with keys h_i, errors u_i and queries
  s(z'_t).  Causal in-chunk read-outs come from the masked (triangular) matmuls of
  ``gated_delta_dual``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nested_jax.memory import gated_delta_dual as gdd
from nested_jax.memory import objectives
from nested_jax.memory.chunked import scan_chunks
from nested_jax.memory.level import Gates, Level, MemoryState, maybe_stop
from nested_jax.memory.memories import LinearMemory, MLPMemory, activation
from nested_jax.memory.rules import effective_eta


def supports(level: Level) -> bool:
    mem = level.memory
    if isinstance(mem, LinearMemory):
        return True
    return isinstance(mem, MLPMemory) and mem.depth == 2


def write_gates(level: Level, keys, g: Gates, dgd: bool) -> Gates:
    """The gates one matrix's writes see, given its keys f[..., d] and gates f[...].

    beta is 0 without momentum; under DGD on every layer (``dgd_all_layers``) eta becomes the
    rule's effective step (``rules.effective_eta``: the Sherman-Morrison proximal step, doubled
    under ``reflect``).  The one definition: the dual form here and the kernels
    (``memory/pallas.py``) both take their gates from it.
    """
    beta = g.beta if level.rule.momentum else jnp.zeros_like(g.beta)
    eta = g.eta
    if dgd and level.rule.dgd_all_layers:
        eta = jnp.vectorize(lambda e, x: effective_eta(level.rule, e, x),
                            signature="(),(d)->()")(eta, keys)
    return Gates(eta, g.alpha, beta)


def _dgd(level: Level, is_input_side: bool) -> bool:
    return level.rule.dgd and (is_input_side or level.rule.dgd_all_layers)


def _prep(level: Level, q, k, g: Gates, dgd: bool) -> gdd.Prep:
    """The state-independent half of a chunk for one matrix (keys k, queries q)."""
    eta, alpha, beta = write_gates(level, k, g, dgd)
    return gdd.prepare(gdd.gate_products(alpha, beta), k, q, eta, dgd)


def _linear_chunk(level: Level, st: MemoryState, q, k, v, g: Gates, p: gdd.Prep):
    w0, s0 = st.params["W"], st.mom["W"]
    rd = gdd.reads(w0, s0, k, q, level.rule.momentum)
    v = level.target(st.params, v)
    u = objectives.error(level.objective, rd.km0, v)
    u = u - rd.km0 if level.rule.delta else u  # Rule.delta: the write drops W_b k
    y, w, s = gdd.update(p, rd, w0, s0, k, u, level.read == "online")
    return MemoryState({"W": w}, {"W": s}), y


def _mlp_chunk(level: Level, st: MemoryState, q, k, v, g: Gates, p2: gdd.Prep):
    mem: MLPMemory = level.memory
    act = activation(mem.activation)
    w1, w2 = st.params["W1"], st.params["W2"]
    s1, s2 = st.mom["W1"], st.mom["W2"]
    v = level.target(st.params, v)
    rd2 = gdd.reads(w2, s2, k, q, level.rule.momentum)
    z = rd2.km0  # [C, hidden] = k W2^T
    h, dh = jax.jvp(act, (z,), (jnp.ones_like(z),))  # s(z), s'(z)
    hw1, hs1 = gdd.read_rows(w1, s1, h, level.rule.momentum)  # W1's key reads, reused below
    y = hw1 + (k if mem.residual else 0.0)
    u = objectives.error(level.objective, y, v)  # [C, dv]
    u = u - hw1 if level.rule.delta else u  # Rule.delta: the error drops W1_b h
    e = dh * (u @ w1)  # [C, hidden], error at the hidden pre-activation
    zq, w2n, s2n = gdd.update(p2, rd2, w2, s2, k, e, level.read == "online")
    hq = act(zq)
    # W1's keys (h) and queries (s(z')) depend on the state: its prep stays in the loop.
    dgd1 = _dgd(level, False)
    p1 = gdd.prepare(p2.g, h, hq, write_gates(level, h, g, dgd1).eta, dgd1)
    rd1 = gdd.Reads(hw1, hs1, *gdd.read_rows(w1, s1, hq, level.rule.momentum))
    oq, w1n, s1n = gdd.update(p1, rd1, w1, s1, h, u, level.read == "online")
    o = oq + (q if mem.residual else 0.0)
    return MemoryState({"W1": w1n, "W2": w2n}, {"W1": s1n, "W2": s2n}), o


def run(level: Level, state: MemoryState, q, k, v, gates: Gates, chunk_size: int,
        remat: bool | int = True, resets=None):
    """q, k: f[T, dk]; v: f[T, dv]; gates f[T]; resets optional bool [T] (document starts,
    ``memory/resets.py``). Returns (o f[T, dv], final state).

    Each chunk body is ``gdd.prepare`` (gate products, masked C x C matrices, the inverse
    of the DGD system) then ``gdd.update`` (the matmuls linear in the boundary state).  The
    prep stays inside the scan on purpose: hoisted out and run for all chunks at once it was
    slower on CPU (its [N, C, C] arrays leave the cache; measured 1.3x slower fwd+bwd).
    """
    if not supports(level):
        raise ValueError(
            f"path='dual' supports LinearMemory and 2-layer MLPMemory, got {level.memory}; "
            "use path='chunked'."
        )
    if level.first_order:  # the matmul form differentiates through the state (Level docs)
        raise ValueError("path='dual' differentiates through the memory state; first_order=True "
                         "needs path='chunked' or 'oracle'.")
    k, v, gates = maybe_stop(level, k, v, gates)
    body = _linear_chunk if isinstance(level.memory, LinearMemory) else _mlp_chunk

    def chunk_fn(st, q_c, k_c, v_c, eta, alpha, beta):
        eta, _ = level.chunk_steps(st.params, k_c, eta)
        g = Gates(eta, alpha, beta)
        return body(level, st, q_c, k_c, v_c, g, _prep(level, q_c, k_c, g, _dgd(level, True)))

    return scan_chunks(chunk_fn, state, (q, k, v, *gates), chunk_size, remat, resets)
