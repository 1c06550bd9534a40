"""The memory engine: Nested Learning levels as pure functions over pytrees.

A level (``Level``) = a memory architecture (``LinearMemory``, ``MLPMemory``) + an inner
objective ("l2", "dot") + an inner update rule (``Rule``: GD, Titans momentum, DGD).  It consumes
its context flow with ``apply(..., path=...)``:

  "oracle"   per-token ``lax.scan``, the definition;
  "chunked"  generic chunk-parallel path, any architecture;
  "dual"     matmul dual forms for linear and 2-layer MLP memories;
  "pallas"   the Pallas kernels for linear memories (``pallas.py``; TPU Mosaic, GPU Triton,
             interpret mode on CPU), falling back to "dual" where none runs under impl="auto";
  "auto"     "pallas" for a linear memory, else "dual" where it applies, else "chunked".

All paths compute the same function (tests/memory).  ``apply(..., resets=r_BxT)`` returns the
state to its initial value at document starts (chunk starts only), so each document of a packed
row computes what it computes alone (``resets.py``; the kernels fall back to "dual" for it).
"""

from nested_jax.memory.api import (
    PATHS,
    apply,
    broadcast_state,
    causal_nonfinite,
    init_state,
    prior_read,
    resolve_path,
    stream_init,
    stream_step,
    validate,
)
from nested_jax.memory.level import Gates, Level, MemoryState
from nested_jax.memory.memories import LinearMemory, MLPMemory
from nested_jax.memory.rules import DELTA, DGD, GD, TITANS, Rule
from nested_jax.memory.streaming import StreamState

__all__ = [
    "DELTA",
    "DGD",
    "GD",
    "PATHS",
    "TITANS",
    "Gates",
    "Level",
    "LinearMemory",
    "MLPMemory",
    "MemoryState",
    "Rule",
    "StreamState",
    "apply",
    "broadcast_state",
    "causal_nonfinite",
    "init_state",
    "prior_read",
    "resolve_path",
    "stream_init",
    "stream_step",
    "validate",
]
