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
    """Zeros like each leaf; ``zeros_like`` keeps the leaf's sharding for the state."""
    return jax.tree.map(lambda x: jnp.zeros_like(x, dtype=dtype or jnp.result_type(x)), tree)


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


def _explicit_sharding(x: jax.Array) -> Any:
    """The sharding of ``x`` if it uses explicit mesh axes (jax >= 0.6), else None."""
    typeof = getattr(jax, "typeof", None)
    needed = ("auto_axes", "get_abstract_mesh", "use_abstract_mesh")
    if typeof is None or not all(hasattr(jax.sharding, n) for n in needed):
        return None
    sharding = getattr(typeof(x), "sharding", None)
    if not getattr(getattr(sharding, "mesh", None), "explicit_axes", ()):
        return None
    return sharding


def sharded_like(fn: Any, x: jax.Array, *args: Any, out_specs: Any = None) -> Any:
    """``fn(x, *args)``, returned with the sharding of ``x``.

    ``out_specs(spec_of_x)`` gives the output's PartitionSpec tree when ``fn``
    returns more than one array (default: the single output is sharded like x).

    Under explicit sharding (``jax.make_mesh``'s default axis type) every matmul
    that contracts a sharded axis must be told its output sharding. Matrix
    functions (Newton–Schulz, DGD's solve) instead run with the mesh axes set
    to auto, so the partitioner picks the collectives, and hand back ``x``'s
    sharding. Without explicit axes this is just ``fn(x, *args)``.
    """
    sharding = _explicit_sharding(x)
    if sharding is None:
        return fn(x, *args)
    out = sharding.spec if out_specs is None else out_specs(sharding.spec)
    run = jax.sharding.auto_axes(fn, out_sharding=out)
    if jax.sharding.get_abstract_mesh().axis_names:
        return run(x, *args)
    with jax.sharding.use_abstract_mesh(sharding.mesh):  # jit without a context mesh
        return run(x, *args)
