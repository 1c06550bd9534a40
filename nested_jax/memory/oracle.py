"""Path 1, the per-token oracle: a plain ``lax.scan`` over tokens.  It is the definition
(decisions.md #3); every other path is tested against it.

For token t: g_t = grad L(M_{t-1}; k_t, v_t); (M_t, S_t) = rule step; o_t = M_t(q_t)
("online" read) or M_{t-1}(q_t) ("prior" read, and "boundary": the CMS read-before-write at
C = 1).
"""

from __future__ import annotations

import jax

from nested_jax.memory import rules
from nested_jax.memory.level import Gates, Level, MemoryState, maybe_stop
from nested_jax.memory.resets import restart


def token_step(level: Level, state: MemoryState, boundary, q, k, v, eta, alpha, beta, seen=0.0):
    """One token with the inner gradient taken at ``boundary`` (the shared step of all paths).

    ``seen``: the write gain spent since ``boundary`` by earlier tokens (``Level.chunk_steps``;
    0 for the oracle, where every token is its own chunk).  Returns (state, seen after it)."""
    point = level.grad_point(boundary)
    grads, inputs = level.writes(point, k, v)
    steps, seen = level.chunk_steps(point, k[None], eta[None], seen)
    params, mom = rules.step(level.rule, state.params, state.mom, grads, inputs, steps[0],
                             alpha, beta)
    return MemoryState(params, mom), seen


def run(level: Level, state: MemoryState, q, k, v, gates: Gates, resets=None):
    """q, k: f[T, dk]; v: f[T, dv]; gates: f[T] each. Returns (o f[T, dv], final state).

    resets: optional bool [T], document starts: the state before such a token is ``state``.
    """
    k, v, gates = maybe_stop(level, k, v, gates)

    def body(st, xs):
        q_t, k_t, v_t, eta, alpha, beta = xs
        new, _ = token_step(level, st, st.params, q_t, k_t, v_t, eta, alpha, beta)
        read = new.params if level.read == "online" else st.params
        return new, level.memory.apply(read, q_t)

    if resets is not None:
        step = lambda st, xs: body(restart(xs[0], state, st), xs[1:])
        final, o = jax.lax.scan(step, state, (resets, q, k, v, *gates))
        return o, final
    final, o = jax.lax.scan(body, state, (q, k, v, *gates))
    return o, final

