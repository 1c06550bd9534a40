"""The project's config error and the checks built on it: one home for both.

Every bad setting raises ``ValueError("FIELD=VALUE: how to fix it")`` before any work starts, so a
message always names the field (with its dotted prefix, e.g. ``optim.learning_rate``) and the fix.
Models, the trainer and the CLI use these; ``nested_jax.optim`` keeps its own checks so that the
optimizers stay a leaf package of the light core install.
"""

from __future__ import annotations

from typing import Any


def fail(field: str, value: Any, fix: str) -> None:
    """Raise the project's config error: the field, its bad value and the fix."""
    raise ValueError(f"{field}={value!r}: {fix}")


def check_positive(cfg: Any, *fields: str, prefix: str = "") -> None:
    """Each named field of ``cfg`` is a positive int (not a bool)."""
    for name in fields:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            fail(prefix + name, value, "must be a positive integer")


def check_divisible(cfg: Any, field: str, by: str) -> None:
    value, divisor = getattr(cfg, field), getattr(cfg, by)
    if value % divisor:
        fail(field, value, f"must be divisible by {by}={divisor}; pick a multiple of {divisor}")


def check_choice(cfg: Any, field: str, choices: tuple[Any, ...]) -> None:
    value = getattr(cfg, field)
    if value not in choices:
        fail(field, value, f"must be one of {list(choices)}")
