"""Pallas kernels for the chunked linear-memory update (TPU Mosaic and GPU Triton).

A leaf package: plain arrays in and out, nothing from ``nested_jax.memory`` or the models.  The
engine runs them as ``nested_jax.memory.apply(..., path="pallas")`` (``memory/pallas.py`` owns
gates, padding, ragged tails and the ``shard_map`` wrapper).  Layout:

  plan.py        which implementation runs (kernel variant, padding, tiles, fallbacks)
  prep.py        state-independent per-chunk terms, all chunks in parallel (XLA)
  triangular.py  segment products and unit lower-triangular solves (shared with the engine)
  chunk_math.py  state-dependent per-chunk maths, forward and hand-written backward
  mosaic.py      TPU kernels (chunk loop = "arbitrary" grid axis, state in VMEM)
  triton.py      GPU kernels (chunk loop inside each program, state in registers)
  scan_xla.py    the kernels' loop as lax.scan: their oracle in tests
  vjp.py         custom_vjp: forward kernel + backward kernel
"""

from nested_jax.kernels.plan import IMPLS, KERNELS, Plan, make_plan, target_platform

__all__ = ["IMPLS", "KERNELS", "Plan", "make_plan", "target_platform"]
