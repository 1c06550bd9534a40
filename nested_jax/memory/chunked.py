"""Path 2, the generic chunked path (decisions.md #2), for any memory architecture.

Per chunk of C tokens, every inner gradient is taken at the chunk-boundary state with
``vmap(grad)`` (the parallelisable part: TTT's mini-batch GD, Titans §3.2 eq. 16-17), then the
gradient-independent recurrence factors -- momentum and the DGD factor (alpha I - eta k k^T) --
are applied token by token.  ``lax.scan`` runs over chunks; each chunk body is rematerialised
(``jax.checkpoint``) so the backward pass stores one state per chunk.  With C = 1 this is the
oracle exactly.  A ragged last chunk (T not a multiple of C) is run as a shorter chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nested_jax.memory import rules
from nested_jax.memory.level import Gates, Level, MemoryState, maybe_stop
from nested_jax.memory.resets import at_chunk_starts


def chunk_step(level: Level, state: MemoryState, q, k, v, gates: Gates):
    """One chunk. q, k: f[C, dk]; v: f[C, dv]; gates f[C]. Returns (state, o f[C, dv])."""
    boundary = state.params
    point = level.grad_point(boundary)  # the boundary, detached under first_order
    eta, _ = level.chunk_steps(point, k, gates.eta)
    gates = Gates(eta, gates.alpha, gates.beta)
    if level.read == "boundary" and not level.rule.momentum and not level.rule.dgd:
        v = level.target(point, v)
        return _boundary_gd_chunk(level, state, q, k, v, gates)
    grads, inputs = jax.vmap(level.writes, in_axes=(None, 0, 0))(point, k, v)

    def body(st, xs):
        g, x, q_t, eta, alpha, beta = xs
        params, mom = rules.step(level.rule, st.params, st.mom, g, x, eta, alpha, beta)
        new = MemoryState(params, mom)
        return new, (level.memory.apply(params, q_t) if level.read == "online" else None)

    final, o = jax.lax.scan(body, state, (grads, inputs, q, *gates))
    if level.read == "boundary":
        o = jax.vmap(level.memory.apply, in_axes=(None, 0))(boundary, q)
    return final, o


def _boundary_gd_chunk(level: Level, state: MemoryState, q, k, v, gates: Gates):
    """CMS fast case (read-before-write, plain GD): one VJP instead of C per-token gradients.

    M_C = (prod_l alpha_l) M_0 - sum_i w_i g_i with w_i = eta_i prod_{l>i} alpha_l, and
    sum_i w_i g_i = grad of sum_i w_i L_i at M_0 (eq. 71: the chunk's accumulated gradient).
    """
    boundary = state.params
    point = level.grad_point(boundary)
    alpha, eta = gates.alpha, gates.eta
    tail = jnp.cumprod(jnp.concatenate([alpha[1:], jnp.ones_like(alpha[:1])])[::-1])[::-1]
    w = eta * tail
    total = lambda p: jnp.sum(w * jax.vmap(level.inner_loss, in_axes=(None, 0, 0))(p, k, v))
    summed = jax.grad(total)(point)
    params = jax.tree.map(lambda m, g: jnp.prod(alpha) * m - g, boundary, summed)
    # momentum=False keeps S_t = -eta_t g_t: the last token's write.
    mom = jax.tree.map(lambda g: -eta[-1] * g, level.inner_grad(point, k[-1], v[-1]))
    o = jax.vmap(level.memory.apply, in_axes=(None, 0))(boundary, q)
    return MemoryState(params, mom), o


def split_chunks(x, chunk_size: int):
    """[T, ...] -> ([n, C, ...] full chunks, [r, ...] ragged tail or None)."""
    n = x.shape[0] // chunk_size
    full = x[: n * chunk_size].reshape(n, chunk_size, *x.shape[1:])
    tail = x[n * chunk_size :] if x.shape[0] % chunk_size else None
    return full, tail


def _scan_stored(step, state, chunks, group: int):
    """``lax.scan(step, state, chunks)``, storing one state per ``group`` chunks for the backward.

    With group > 1 the chunks run in groups of ``group``, each group's scan checkpointed: the
    backward pass keeps one state per group and, while it goes back through a group, recomputes
    that group's chunk states: n / group + group stored states instead of n (2 sqrt(n) at
    group = sqrt(n)), for one more forward of every chunk.  Why: a level's state is its weights,
    so n of them can be most of a train step's memory (a CMS level of period 16 at T = 4096
    keeps 256 copies of its weights).  The same chunks run in the same order, so the values are
    the plain scan's.  Chunks past the last full group run as a plain scan after it.
    """
    n = chunks[0].shape[0]
    if group <= 1 or n < 2 * group:
        return jax.lax.scan(step, state, chunks)
    m = n // group * group
    grouped = tuple(x[:m].reshape(m // group, group, *x.shape[1:]) for x in chunks)
    state, o = jax.lax.scan(jax.checkpoint(lambda s, g: jax.lax.scan(step, s, g)), state, grouped)
    o = o.reshape(m, *o.shape[2:])
    if m < n:
        state, rest = jax.lax.scan(step, state, tuple(x[m:] for x in chunks))
        o = jnp.concatenate([o, rest], axis=0)
    return state, o


def scan_chunks(chunk_fn, state, xs, chunk_size: int, remat: bool | int = True, resets=None):
    """Run ``chunk_fn(state, *chunk) -> (state, out)`` over full chunks, then the ragged tail.

    remat: False stores every chunk's intermediates for the backward pass; True (= 1)
    rematerialises each chunk body, storing one state per chunk; an int g > 1 also stores
    only one state per g chunks (``_scan_stored``).
    resets: optional bool [T], document starts: a chunk whose first token is one starts from
    ``state`` (the initial state) instead of the carried one (``memory/resets.py``).
    """
    if resets is not None:
        chunk_fn = at_chunk_starts(chunk_fn, state)
        xs = (resets, *xs)
    full, tails = [], []
    for x in xs:
        f, t = split_chunks(x, chunk_size)
        full.append(f)
        tails.append(t)
    body = jax.checkpoint(chunk_fn) if remat else chunk_fn
    outs = []
    if full[0].shape[0] > 0:
        state, o = _scan_stored(lambda s, c: body(s, *c), state, tuple(full), int(remat))
        outs.append(o.reshape(-1, *o.shape[2:]))
    if tails[0] is not None:
        state, o = body(state, *tails)
        outs.append(o)
    return jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0], state


def run(level: Level, state: MemoryState, q, k, v, gates: Gates, chunk_size: int,
        remat: bool | int = True, resets=None):
    """q, k: f[T, dk]; v: f[T, dv]; gates f[T]; resets optional bool [T] (document starts).
    Returns (o f[T, dv], final state)."""
    k, v, gates = maybe_stop(level, k, v, gates)

    def chunk_fn(st, q_c, k_c, v_c, eta, alpha, beta):
        return chunk_step(level, st, q_c, k_c, v_c, Gates(eta, alpha, beta))

    return scan_chunks(chunk_fn, state, (q, k, v, *gates), chunk_size, remat, resets)
