"""Argument checks shared by the deep optimizers.

Every check raises ``ValueError`` naming the function, the argument and the
fix, at the moment the optimizer is built (hyperparameters) or first updated
(trees). Values that are traced (``optax.inject_hyperparams`` under ``jit``)
or schedules cannot be inspected and are skipped: they were checked when
concrete, or are the caller's to keep in range.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

Array = jax.Array


def concrete_float(value: Any) -> float | None:
    """``float(value)`` for a concrete scalar; ``None`` for tracers and schedules."""
    if callable(value) or isinstance(value, bool):
        return None
    try:
        arr = np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    except TypeError:
        return None
    if arr.shape != () or not np.issubdtype(arr.dtype, np.number):
        return None
    return float(arr)


def check_scalar(
    where: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    fix: str = "",
) -> None:
    """Checks that a hyperparameter is a finite number in a (half-)open range."""
    x = concrete_float(value)
    if x is None:
        if isinstance(value, bool) or not (
            callable(value) or isinstance(value, (int, float, np.ndarray, jax.Array, np.number))
        ):
            raise ValueError(
                f"{where}: `{name}` must be a number, array scalar or schedule, got "
                f"{type(value).__name__} {value!r}. {fix}".rstrip()
            )
        return
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    rng = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    bad = math.isnan(x) or math.isinf(x)
    bad |= low is not None and (x <= low if low_open else x < low)
    bad |= high is not None and (x >= high if high_open else x > high)
    if bad:
        raise ValueError(
            f"{where}: `{name}` must be a finite number in {rng}, got {x!r}. {fix}".rstrip()
        )


def check_int(where: str, name: str, value: Any, *, low: int, fix: str = "") -> int | None:
    """Checks an integer hyperparameter (a step count, a width): ``int(value)``, or ``None``
    when it is traced.

    ``optax.inject_hyperparams`` turns every int it is given into an int32 array, traced
    under ``jit``; such a value is accepted here (it was checked when concrete) and the
    caller decides whether it can work with it (a loop length can, a state shape cannot).
    """
    if isinstance(value, bool):
        raise ValueError(f"{where}: `{name}` must be an int >= {low}, got bool {value!r}. {fix}")
    x = concrete_float(value)
    if x is None and is_traced_int(value):
        return None
    if x is None or not math.isfinite(x) or x != int(x) or int(x) < low:
        raise ValueError(
            f"{where}: `{name}` must be a concrete int >= {low}, got {value!r}. {fix}".rstrip()
        )
    return int(x)


def is_traced_int(value: Any) -> bool:
    """An integer-typed scalar tracer (what inject_hyperparams makes of an int under jit)."""
    return (
        isinstance(value, jax.core.Tracer)
        and np.shape(value) == ()
        and np.issubdtype(value.dtype, np.integer)
    )


def check_integer(where: str, name: str, value: Any, *, fix: str = "") -> None:
    """Checks an integer-typed argument (a seed): a Python int or an integer-dtype scalar.

    Traced values (``optax.inject_hyperparams`` under ``jit``) pass when integer-typed.
    """
    if isinstance(value, bool) or callable(value):
        ok = False
    elif isinstance(value, int):
        ok = True
    else:
        dtype = getattr(value, "dtype", None)
        ok = dtype is not None and np.issubdtype(dtype, np.integer) and np.shape(value) == ()
    if not ok:
        raise ValueError(
            f"{where}: `{name}` must be an integer, got {type(value).__name__} {value!r}. "
            f"{fix}".rstrip()
        )


def check_choice(where: str, name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{where}: `{name}` must be one of {tuple(choices)}, got {value!r}.")


def check_transform(where: str, name: str, value: Any) -> None:
    if value is not None and not (hasattr(value, "init") and hasattr(value, "update")):
        raise ValueError(
            f"{where}: `{name}` must be an optax.GradientTransformation (with .init and "
            f".update) or None, got {type(value).__name__}."
        )


def is_masked(x: Any) -> bool:
    """Leaves that ``optax.masked`` / ``optax.partition`` hide from a transform."""
    return isinstance(x, optax.MaskedNode)


def check_like(where: str, name: str, tree: Any, ref_name: str, ref: Any, fix: str) -> None:
    """Checks that ``tree`` has the structure and leaf shapes of ``ref``."""
    if tree is None:
        return
    s_tree, s_ref = jax.tree.structure(tree), jax.tree.structure(ref)
    if s_tree != s_ref:
        raise ValueError(
            f"{where}: `{name}` does not have the tree structure of `{ref_name}`.\n"
            f"  {name}: {s_tree}\n  {ref_name}: {s_ref}\n{fix}"
        )
    for path, a, b in zip(
        jax.tree_util.tree_flatten_with_path(tree)[0],
        jax.tree.leaves(tree),
        jax.tree.leaves(ref),
        strict=True,
    ):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"{where}: leaf {jax.tree_util.keystr(path[0])} of `{name}` has shape "
                f"{np.shape(a)} but `{ref_name}` has {np.shape(b)}.\n{fix}"
            )


def leaves_aligned(
    where: str,
    name: str,
    other: Any,
    updates: Any,
    *,
    is_other_leaf: Callable[[Any], bool],
    fix: str,
) -> list[Any]:
    """Per-leaf values of ``other`` aligned with the leaves of ``updates``.

    ``other`` is a tree with the structure of the params whose leaves are
    ``is_other_leaf`` values (``None``, dimension numbers, arrays). Leaves that
    ``optax.partition``/``optax.masked`` replaced by ``MaskedNode`` in
    ``updates`` are kept as positions (and returned as ``MaskedNode``), so a
    full-size ``other`` tree works inside a partition too.
    """
    up_leaves, up_def = jax.tree.flatten(updates, is_leaf=is_masked)
    try:
        vals = up_def.flatten_up_to(other)
    except (ValueError, TypeError) as e:
        # Same keys in another container (e.g. a plain dict for an nnx.State).
        vals = _align_by_path(updates, other, is_other_leaf)
        if vals is None:
            raise ValueError(
                f"{where}: `{name}` must be a tree with the structure of the params "
                f"({up_def}), got {jax.tree.structure(other, is_leaf=is_other_leaf)}.\n{fix}"
            ) from e
    out = []
    for u, v in zip(up_leaves, vals, strict=True):
        if is_masked(u):
            out.append(u)
            continue
        if not is_other_leaf(v):
            raise ValueError(
                f"{where}: every leaf of `{name}` must be one value per parameter; found "
                f"{type(v).__name__} where the params hold an array of shape {np.shape(u)}.\n{fix}"
            )
        out.append(v)
    return out


def leaf_paths(updates: Any) -> list[str]:
    paths, _ = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_masked)
    return [jax.tree_util.keystr(p) for p, _ in paths]


def all_arrays(tree: Any) -> bool:
    """False for placeholder trees (``optax.tree.map_params`` calls init on one)."""
    return all(
        hasattr(x, "shape") for x in jax.tree.leaves(tree, is_leaf=is_masked) if not is_masked(x)
    )


def _align_by_path(updates: Any, other: Any, is_other_leaf: Callable[[Any], bool]):
    """Values of ``other`` at the key paths of the leaves of ``updates``, or None."""
    flat, _ = jax.tree_util.tree_flatten_with_path(other, is_leaf=is_other_leaf)
    by_path = {jax.tree_util.keystr(p): v for p, v in flat}
    paths = leaf_paths(updates)
    if set(paths) != set(by_path):
        return None
    return [by_path[p] for p in paths]


def check_alias_args(where: str, learning_rate: Any, weight_decay: Any) -> None:
    """The two arguments every alias adds: learning rate and weight decay."""
    check_scalar(
        where,
        "learning_rate",
        learning_rate,
        low=0.0,
        fix="Use a positive float or an optax schedule.",
    )
    check_scalar(where, "weight_decay", weight_decay, low=0.0, fix="Use 0.0 to disable it.")
