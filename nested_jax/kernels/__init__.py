"""Pallas kernels for the chunked linear-memory update (TPU Mosaic and GPU Triton).

``linear_memory(level, state, q, k, v, gates, chunk_size, impl="auto")`` has the contract of
``nested_jax.memory.apply`` for LinearMemory levels and equals its dual path.  Layout:

  plan.py        which implementation runs (kernel variant, padding, tiles, fallbacks)
  prep.py        state-independent per-chunk terms, all chunks in parallel (XLA)
  chunk_math.py  state-dependent per-chunk maths, forward and hand-written backward
  mosaic.py      TPU kernels (chunk loop = "arbitrary" grid axis, state in VMEM)
  triton.py      GPU kernels (chunk loop inside each program, state in registers)
  scan_xla.py    the kernels' loop as lax.scan: their oracle in tests
  vjp.py         custom_vjp: forward kernel + backward kernel
  linear.py      the public entry point, ragged tails, shard_map
"""

from nested_jax.kernels.linear import flags_for, linear_memory
from nested_jax.kernels.plan import IMPLS, KERNELS, Plan, make_plan, target_platform

__all__ = ["IMPLS", "KERNELS", "Plan", "flags_for", "linear_memory", "make_plan",
           "target_platform"]
