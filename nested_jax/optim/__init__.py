"""Deep optimizers of Nested Learning as optax gradient transformations.

Each optimizer of the paper's §2 comes in optax's idiom: a ``scale_by_<name>``
transform with a ``NamedTuple`` state, and an alias taking ``learning_rate``
first that adds weight decay and the learning-rate scale. All work in
``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
``optax.partition`` and ``flax.nnx.Optimizer``. Map of equations to code and
tests: ``docs/paper_map/optim.md``.

Notes for wrappers and sharding:

* ``optax.inject_hyperparams(alias)(learning_rate=...)`` works with no
  ``static_args`` (as ``optax.contrib.muon``). It turns every int and float
  it is given into an array, traced under ``jit``, and every callable into a
  schedule. So the structural arguments default to ``None``, which it leaves
  alone (``hidden`` of DMGD, ``axis`` of delta momentum,
  ``weight_dimension_numbers``), and the ints that only enter arithmetic or a
  loop length work traced (``every`` of M3, ``ns_steps``). Set ``hidden`` or
  ``axis`` to an int, or ``weight_dimension_numbers`` to a function, and that
  argument goes in ``static_args``.
* Parameters of any rank work out of the box. Newton–Schulz (M3,
  ``newton_schulz_momentum``) orthogonalizes the last two axes of a tensor of
  rank >= 2 (a stacked ``[L, D, F]`` weight per layer) and passes vectors and
  scalars through (``matrix_dimension_numbers``); the other memories are
  elementwise or act along the last axis.
* Annotations are evaluated (no ``from __future__ import annotations``):
  optax's test battery reads ``learning_rate``'s annotation to know that an
  alias takes a schedule (``tests/optim/test_optim_optax_battery.py``).
* ``init`` lays the param-shaped state out like the params (eager, or jitted
  under explicit mesh axes; a jitted init under auto axes needs
  ``out_shardings``, as for any optax optimizer). Newton–Schulz and DGD's
  solves run under explicit sharding too (with auto axes inside).
"""

from nested_jax.optim.adam_memory import (
    AdamMemoryState,
    adam_memory,
    adam_memory_loss,
    scale_by_adam_memory,
)
from nested_jax.optim.deep_momentum import (
    DeepMomentumState,
    deep_momentum,
    deep_momentum_loss,
    deep_momentum_readout,
    scale_by_deep_momentum,
)
from nested_jax.optim.delta_momentum import (
    DeltaMomentumState,
    delta_momentum,
    delta_momentum_loss,
    scale_by_delta_momentum,
)
from nested_jax.optim.dgd import DGDState, dgd, scale_by_dgd
from nested_jax.optim.m3 import M3State, m3, scale_by_m3
from nested_jax.optim.momentum_memory import (
    MomentumMemoryState,
    momentum_memory,
    momentum_memory_loss,
    scale_by_momentum_memory,
)
from nested_jax.optim.newton_schulz import (
    MUON_NS_COEFFS,
    DimensionNumbers,
    matrix_dimension_numbers,
    newton_schulz_momentum,
    orthogonalize,
    scale_by_newton_schulz,
)
from nested_jax.optim.preconditioned_momentum import (
    DiagonalSecondMomentState,
    PreconditionedMomentumState,
    preconditioned_momentum,
    scale_by_diagonal_second_moment,
    scale_by_preconditioned_momentum,
)

__all__ = [
    "MUON_NS_COEFFS",
    "AdamMemoryState",
    "DGDState",
    "DeepMomentumState",
    "DeltaMomentumState",
    "DiagonalSecondMomentState",
    "DimensionNumbers",
    "M3State",
    "MomentumMemoryState",
    "PreconditionedMomentumState",
    "adam_memory",
    "adam_memory_loss",
    "deep_momentum",
    "deep_momentum_loss",
    "deep_momentum_readout",
    "delta_momentum",
    "delta_momentum_loss",
    "dgd",
    "m3",
    "matrix_dimension_numbers",
    "momentum_memory",
    "momentum_memory_loss",
    "newton_schulz_momentum",
    "orthogonalize",
    "preconditioned_momentum",
    "scale_by_adam_memory",
    "scale_by_deep_momentum",
    "scale_by_delta_momentum",
    "scale_by_dgd",
    "scale_by_diagonal_second_moment",
    "scale_by_m3",
    "scale_by_momentum_memory",
    "scale_by_newton_schulz",
    "scale_by_preconditioned_momentum",
]
