"""Checks shared by the model tests."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def check_bf16_step(model: nnx.Module, tokens_BxT: jax.Array, vocab: int) -> None:
    """One bf16 forward + backward from random init: float32 logits, the next-token loss near
    log V (an untrained model), and every parameter gradient finite, with some non-zero."""

    def loss(m):
        logits = m(tokens_BxT[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1)), logits

    (value, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    assert np.isfinite(float(value)) and abs(float(value) - np.log(vocab)) < 1.0, float(value)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
    for path, g in leaves:
        assert bool(jnp.all(jnp.isfinite(g))), path
    assert any(bool(jnp.any(g != 0)) for _, g in leaves)
