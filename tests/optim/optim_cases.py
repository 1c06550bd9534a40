"""The optimizers under test: one entry per public alias (both delta-momentum forms).

Options of an alias (nesterov, M3's cumulative moments) are exercised by the
alias's own tests; the battery is about wrappers.

Each entry says how to build the alias and which of its arguments are
structural (``static_args`` of ``optax.inject_hyperparams``: they fix shapes or
loop lengths, or are callables that are not schedules).
"""

import dataclasses
from typing import Any

import nested_jax.optim as no


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    factory: Any
    kwargs: dict
    static_args: tuple = ()

    def build(self, **overrides):
        return self.factory(**{**self.kwargs, **overrides})

    def __str__(self):
        return self.name


_NS = {"weight_dimension_numbers": no.matrix_dimension_numbers}

CASES = (
    Case("momentum_memory", no.momentum_memory, {"learning_rate": 1e-2}),
    Case("preconditioned_momentum", no.preconditioned_momentum, {"learning_rate": 1e-2}),
    Case("delta_momentum_neurips", no.delta_momentum, {"learning_rate": 1e-2}, ("axis",)),
    Case(
        "delta_momentum_arxiv",
        no.delta_momentum,
        {"learning_rate": 1e-2, "form": "arxiv"},
        ("axis",),
    ),
    Case("deep_momentum", no.deep_momentum, {"learning_rate": 1e-2}, ("hidden",)),
    Case(
        "newton_schulz_momentum",
        no.newton_schulz_momentum,
        {"learning_rate": 1e-2, **_NS},
        ("ns_steps", "weight_dimension_numbers"),
    ),
    Case("adam_memory", no.adam_memory, {"learning_rate": 1e-2, "weight_decay": 1e-3}),
    Case(
        "m3",
        no.m3,
        {"learning_rate": 1e-3, "every": 3, **_NS},
        ("every", "ns_steps", "weight_dimension_numbers"),
    ),
    Case("dgd", no.dgd, {"learning_rate": 1e-2}),
)

BY_NAME = {c.name: c for c in CASES}
