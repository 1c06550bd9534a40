"""Document resets: a level's state returns to its initial value where a document starts.

A packed row holds several documents, and each must compute what it computes when run alone:
from the level's initial state, with nothing of the document before it.  A fast memory carries
the previous document into the next one unless it is told otherwise, so ``memory.apply`` takes
``resets`` (bool [B, T]): where resets[b, t] is set, the state token t starts from is the
initial state (apply's ``state`` argument) instead of the carried one.

Resets sit at chunk starts only (t a multiple of chunk_size; any t on the per-token oracle).
Inside a chunk every inner gradient is taken at the chunk's boundary state, so a document that
started mid-chunk would see the previous document's boundary: no separate run computes that.
A concrete reset elsewhere is an error (``check``); under jit it cannot be checked, and only a
chunk's first token counts (the packer, ``nested_jax.models.packing.pack_aligned``, aligns every
document start to the model's ``document_alignment``).

With resets=None none of this runs: the default path is exactly the one without resets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check(resets, B: int, T: int, chunk_size: int):
    """resets bool or int [B, T], set at chunk starts only; returns it as bool."""
    if getattr(resets, "shape", None) != (B, T):
        raise ValueError(f"resets must have shape [B, T] = {(B, T)} (one flag per token), got "
                         f"{getattr(resets, 'shape', resets)}.")
    dtype = jnp.asarray(resets).dtype
    if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer)):
        raise ValueError(f"resets must be bool (or int 0/1), got dtype {dtype}.")
    try:
        val = np.asarray(resets)
    except jax.errors.TracerArrayConversionError:
        val = None  # under jit: the caller guarantees alignment (module docstring)
    if val is not None:
        b, t = np.nonzero(val.astype(bool) & (np.arange(T) % chunk_size != 0)[None])
        if b.size:
            raise ValueError(
                f"resets[{b[0]}, {t[0]}] is set, but {t[0]} is not a multiple of "
                f"chunk_size={chunk_size}: a level's state can return to its initial value only "
                "where a chunk starts.  Start every document at a multiple of the chunk size "
                "(nested_jax.models.packing.pack_aligned).")
    return jnp.asarray(resets).astype(bool)


def restart(flag, init, state):
    """``init`` where ``flag`` is set, else ``state`` (pytrees of equal structure).  ``flag`` is a
    scalar, or leads the leaves' axes (e.g. one flag per sequence [B] for leaves [B, ...])."""
    def one(a, b):
        return jnp.where(flag.reshape(flag.shape + (1,) * (b.ndim - flag.ndim)),
                         a.astype(b.dtype), b)

    return jax.tree.map(one, init, state)


def at_chunk_starts(chunk_fn, init):
    """``chunk_fn(state, *chunk)`` preceded by a restart when the chunk's first token resets:
    the wrapped function takes the chunk's resets bool [C, ...] before the chunk's other inputs
    (trailing axes: one flag per leading axis of the state, e.g. [C, B] for a time-major batch)."""

    def fn(state, resets_C, *chunk):
        return chunk_fn(restart(resets_C[0], init, state), *chunk)

    return fn


def prior_reads_from_init(memory, state, q, o, resets):
    """A prior read (o_t = M_{t-1}(q_t)) at a document start reads the initial state, M_init(q_t),
    as the document's position 0 does when run alone.  o, q [B, T, H, .]; state leaves [B, H, .]."""
    read = jax.vmap(jax.vmap(memory.apply, in_axes=(None, 0)), in_axes=(0, 1), out_axes=1)
    init_BxTxHxD = jax.vmap(read, in_axes=(0, 0))(state.params, q)
    return jnp.where(resets[:, :, None, None], init_BxTxHxD.astype(o.dtype), o)


def clean_within_documents(ok_BxTxH, resets_BxT, sees_T):
    """Which outputs and final states see no non-finite token of their own document.

    ok[b, t, h]: token t's inputs are finite.  Output t reads the state after the tokens before
    ``sees_T[t]``; with resets, only those since its document started count (a document run
    alone never saw the earlier ones).  Returns (clean outputs bool [B, T, H], clean final state
    bool [B, H]).
    """
    B, T, H = ok_BxTxH.shape
    bad = jnp.cumsum((~ok_BxTxH).astype(jnp.int32), axis=1)
    bad = jnp.pad(bad, ((0, 0), (1, 0), (0, 0)))  # [B, T+1, H]: bad tokens before t
    t = np.arange(T)
    start_BxT = jax.lax.cummax(jnp.where(resets_BxT, t[None], 0), axis=1)
    sees_BxT = jnp.maximum(jnp.asarray(sees_T)[None], start_BxT)
    at = lambda idx: jnp.take_along_axis(bad, idx[:, :, None], axis=1)
    before = at(start_BxT)
    clean = at(sees_BxT) == before
    return clean, bad[:, -1] == before[:, -1]
