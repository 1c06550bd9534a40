"""The teach signal: the next-token error carried to a CMS level's output (decisions.md #13).

Pure functions of the tied LM head; ``nested_jax/models/cms/__init__.py`` documents the
semantics.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nested_jax.models.layers import rms_normalize


class TeachHead(NamedTuple):
    """The tied LM head the teach signal is carried through (decisions.md #13)."""

    embedding_VxD: jax.Array  # E, the tied embedding table
    norm_scale_D: jax.Array  # scale of the model's final RMSNorm
    eps: float  # epsilon of the final RMSNorm


def teach_delta(head: TeachHead, h_D: jax.Array, next_D: jax.Array) -> jax.Array:
    """delta = d/dh CE(E RMSNorm_f(h), x_{t+1}) for one token; next_D = E[x_{t+1}]."""
    hn_D, pull = jax.vjp(lambda z: rms_normalize(z, head.norm_scale_D, head.eps), h_D)
    table = head.embedding_VxD
    acc = jnp.promote_types(hn_D.dtype, jnp.float32)  # softmax in >= float32, as the LM head
    logits_V = jnp.matmul(table.astype(hn_D.dtype), hn_D, preferred_element_type=acc)
    p_V = jax.nn.softmax(logits_V)
    err_D = jnp.matmul(p_V, table.astype(acc)) - next_D.astype(acc)
    (delta_D,) = pull(err_D.astype(hn_D.dtype))
    return delta_D


def next_embeddings(emb_BxTxD: jax.Array) -> jax.Array:
    """e_{t+1} = the input embedding of the next token; zeros at the last position (masked)."""
    return jnp.concatenate([emb_BxTxD[:, 1:], jnp.zeros_like(emb_BxTxD[:, :1])], axis=1)
