"""nested_jax: Nested Learning (Behrouz et al., NeurIPS 2025) in JAX.

Subpackages:
  memory  -- NL levels as pure functions: memories, inner objectives, update rules, paths.
  optim   -- deep optimizers as optax gradient transforms.
  kernels -- Pallas kernels for the chunked memory update.
  models  -- Flax NNX models: Hope, Hope-Attention, Titans, Transformer++.
  data    -- grain pipelines and tokenizers.
  train   -- trainer, checkpoints, sharding.
"""

__version__ = "0.1.0"
