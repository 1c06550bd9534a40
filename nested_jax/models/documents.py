"""Document boundaries in packed rows: from per-token segment ids to what each layer needs.

A packed row holds several documents.  ``model(tokens_BxT, segment_ids=seg_BxT)`` computes, at
every position of a document, what the model computes on that document run alone in its own
row from its first token.  segment_ids: int [B, T], 0 = padding (belongs to no document), any
other value a document; a document starts wherever the id changes to a non-zero value (so two
neighbouring documents need different ids, and the same id after padding is a new document).

What each layer does with it (``Documents``):
  * every memory (engine level, self-modifying memories, CMS levels) returns to its initial
    state at a document start (``memory.apply(..., resets=starts)``);
  * short causal convolutions see only their own document (a document's first tokens see the
    zeros they see alone);
  * attention never crosses a document, and RoPE positions restart at 0;
  * a CMS level's teach signal at a document's last token is masked, as at the last position of
    a row (the next document's first token is not its next token).

Alignment (docs/decisions.md #23).  A chunked level's function depends on where its chunks
start, and a document run alone starts a chunk at its first token.  So a packed document equals
its separate run only if it starts at a multiple of every chunk size and CMS period of the model:
``config.document_alignment()``, their lcm (1 for Transformer++).  ``pack_aligned``
(``models/packing.py``) lays documents out so; a concrete misaligned start is an error here,
and under jit the packer is trusted.  Padding between documents changes nothing after it: the
next document resets every state and sees none of the padding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Documents(NamedTuple):
    """Per-token document layout of a batch (all int32 / bool [B, T])."""

    ids: jax.Array  # int32: 1, 2, ... per document in row order, 0 for padding
    starts: jax.Array  # bool: the first token of a document
    positions: jax.Array  # int32: the position inside the document (RoPE), 0 at a start
    has_next: jax.Array  # bool: the next token belongs to the same document (teach signal)


def from_segment_ids(segment_ids_BxT, alignment: int = 1, why: str = "") -> Documents:
    """The layout of ``segment_ids`` (see the module docstring).

    A concrete document start at a position that is not a multiple of ``alignment`` is a
    ValueError naming the row, the position and ``why`` (the fields the alignment comes from).
    """
    seg = jnp.asarray(segment_ids_BxT)
    if seg.ndim != 2 or not jnp.issubdtype(seg.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be an int array [B, T] (0 = padding), got "
                         f"{getattr(segment_ids_BxT, 'dtype', '?')} {seg.shape}.")
    B, T = seg.shape
    prev = jnp.pad(seg[:, :-1], ((0, 0), (1, 0)))  # 0 before the row: a row's first token starts
    starts = (seg != 0) & (seg != prev)
    _check_alignment(starts, alignment, why)
    ids = jnp.where(seg != 0, jnp.cumsum(starts, axis=1, dtype=jnp.int32), 0)
    t = jnp.arange(T, dtype=jnp.int32)[None]
    positions = t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
    has_next = jnp.pad(ids[:, 1:] == ids[:, :-1], ((0, 0), (0, 1))) & (ids != 0)
    return Documents(ids, starts, positions.astype(jnp.int32), has_next)


def _check_alignment(starts_BxT, alignment: int, why: str) -> None:
    try:
        val = np.asarray(starts_BxT)
    except jax.errors.TracerArrayConversionError:
        return  # under jit: pack_aligned guarantees it
    b, t = np.nonzero(val & (np.arange(val.shape[1]) % alignment != 0)[None])
    if b.size:
        raise ValueError(
            f"segment_ids: a document starts at position {t[0]} of row {b[0]}, not a multiple "
            f"of the model's document alignment {alignment}{f' ({why})' if why else ''}: its "
            "chunks would not start where they start when it runs alone.  Pack with "
            "nested_jax.models.packing.pack_aligned(docs, seq_len, alignment).")


def same_document(docs: Documents, offset: int) -> jax.Array:
    """bool [B, T]: token t - offset exists and is in token t's document (or both are padding)."""
    earlier = jnp.pad(docs.ids, ((0, 0), (offset, 0)), constant_values=-1)[:, :docs.ids.shape[1]]
    return earlier == docs.ids


def attention_mask(docs: Documents) -> jax.Array:
    """bool [B, 1, T, S]: query t may attend key s of its own document (causality apart).
    Padding attends padding, so no softmax row is empty."""
    return (docs.ids[:, :, None] == docs.ids[:, None, :])[:, None]
