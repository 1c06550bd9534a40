"""The optimizers under test: one entry per public alias (both delta-momentum forms).

Options of an alias (nesterov, M3's cumulative moments) are exercised by the
alias's own tests; the battery is about wrappers. Every alias is built with its
defaults for structure (no dimension numbers, no static arguments): params of
any rank and ``optax.inject_hyperparams`` must work out of the box.
"""

import dataclasses
from typing import Any

import nested_jax.optim as no


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    factory: Any
    kwargs: dict

    def build(self, **overrides):
        return self.factory(**{**self.kwargs, **overrides})

    def __str__(self):
        return self.name


CASES = (
    Case("momentum_memory", no.momentum_memory, {"learning_rate": 1e-2}),
    Case("preconditioned_momentum", no.preconditioned_momentum, {"learning_rate": 1e-2}),
    Case("delta_momentum_neurips", no.delta_momentum, {"learning_rate": 1e-2}),
    Case("delta_momentum_arxiv", no.delta_momentum, {"learning_rate": 1e-2, "form": "arxiv"}),
    Case("deep_momentum", no.deep_momentum, {"learning_rate": 1e-2}),
    Case("newton_schulz_momentum", no.newton_schulz_momentum, {"learning_rate": 1e-2}),
    Case("adam_memory", no.adam_memory, {"learning_rate": 1e-2, "weight_decay": 1e-3}),
    Case("m3", no.m3, {"learning_rate": 1e-3, "every": 3}),
    Case("dgd", no.dgd, {"learning_rate": 1e-2}),
)

BY_NAME = {c.name: c for c in CASES}
