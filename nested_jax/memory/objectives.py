"""Inner objectives L(M(k); v) of a level (paper §1: associative memory argmin_M L(M(k); v)).

Each objective is a loss on the read-out ``y = M(k)`` against a target ``v``; the inner
gradient w.r.t. the memory is obtained by the chain rule from ``error = dL/dy``.
"""

from __future__ import annotations

import jax.numpy as jnp

OBJECTIVES = ("l2", "dot")


def check(name: str) -> None:
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r} is unknown; use one of {OBJECTIVES}.")


def loss(name: str, y, v):
    """'l2': 1/2 ||y - v||^2 (delta rule); 'dot': -<y, v> (Hebbian / linear attention)."""
    if name == "l2":
        return 0.5 * jnp.sum((y - v) ** 2)
    if name == "dot":
        return -jnp.sum(y * v)
    check(name)


def error(name: str, y, v):
    """dL/dy, the local surprise signal u (paper §1)."""
    if name == "l2":
        return y - v
    if name == "dot":
        return -v
    check(name)
