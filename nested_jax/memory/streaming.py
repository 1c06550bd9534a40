"""Streaming (decode) path: advance one token at a time from a carried state.

To equal the chunked paths for any chunk size, the carried state holds the current memory,
its momentum, the chunk-boundary memory (where inner gradients are taken) and the position
inside the chunk.  The cost of one step is constant in the position.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nested_jax.memory.level import Level, MemoryState
from nested_jax.memory.oracle import token_step


class StreamState(NamedTuple):
    params: Any  # current memory M_t
    mom: Any  # momentum S_t
    boundary: Any  # memory at the start of the current chunk
    pos: jax.Array  # i32[] tokens already consumed in the current chunk
    seen: jax.Array  # f[] write gain those tokens spent (Level.chunk_steps; 0 unless normalized)


def init(state: MemoryState) -> StreamState:
    dtype = jnp.result_type(*jax.tree.leaves(state.params), jnp.float32)
    return StreamState(state.params, state.mom, state.params, jnp.zeros((), jnp.int32),
                       jnp.zeros((), dtype))


def step(level: Level, st: StreamState, q, k, v, eta, alpha, beta, chunk_size: int):
    """One token. q, k: f[dk]; v: f[dv]; gates scalars. Returns (o f[dv], new StreamState)."""
    new, seen = token_step(level, MemoryState(st.params, st.mom), st.boundary, q, k, v, eta,
                           alpha, beta, st.seen)
    read = {"online": new.params, "prior": st.params}.get(level.read, st.boundary)
    o = level.memory.apply(read, q)
    pos = st.pos + 1
    done = pos == chunk_size
    boundary = jax.tree.map(lambda n, b: jnp.where(done, n, b), new.params, st.boundary)
    return o, StreamState(new.params, new.mom, boundary, jnp.where(done, 0, pos),
                          jnp.where(done, 0, seen).astype(st.seen.dtype))
