"""Small tree helpers shared by the deep optimizers (no public API)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

_INT32_MAX = np.iinfo(np.int32).max


def safe_increment(count: jax.Array) -> jax.Array:
    """``count + 1`` that saturates instead of wrapping (long runs, int32)."""
    return jnp.where(count < _INT32_MAX, count + 1, _INT32_MAX).astype(jnp.int32)


def compute_dtype(*dtypes: Any) -> jnp.dtype:
    """At least float32: row reductions and Newton–Schulz lose too much in bf16."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def zeros_like(tree: Any, dtype: Any = None) -> Any:
    return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), dtype or jnp.result_type(x)), tree)


def cast_tree(tree: Any, dtype: Any) -> Any:
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def cast_like(tree: Any, ref: Any) -> Any:
    return jax.tree.map(lambda x, r: x.astype(jnp.result_type(r)), tree, ref)


def debias(decay: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """``1 - decay**count`` cast to ``dtype``, computed as optax does."""
    return (1 - decay**count).astype(dtype)


def scale_value(value: optax.ScalarOrSchedule, count: jax.Array) -> Any:
    """A constant or ``schedule(count)``."""
    return value(count) if callable(value) else value
