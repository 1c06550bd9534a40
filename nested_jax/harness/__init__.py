"""Benchmark a trained run with lm-evaluation-harness (docs/training.md, "Zero-shot benchmarks").

  requests   token conventions of a scoring request (pure Python)
  scorer     `Scorer`: batched log-likelihoods, rolling log-likelihoods and greedy generation
             of a restored run (JAX; no lm_eval needed)
  adapter    `NestedJaxLM`, the lm_eval model registered as "nested_jax" (the `harness` extra)
  __main__   `python -m nested_jax.harness ...`: lm-eval's own command line with the model
             registered

Importing this package imports neither lm_eval nor JAX.
"""
