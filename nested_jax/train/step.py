"""The jitted train and eval steps, as pure functions of a state pytree.

The train state is a dict (what orbax saves):

  params      nnx.State of the model's nnx.Param variables
  rest        nnx.State of every other model variable (kept as is)
  opt_state   the optax state
  step        int32 [], optimizer steps taken (skipped ones included)
  bad_streak  int32 [], consecutive steps whose update the guard rejected
  bad_total   int32 [], all such steps

The guard judges the update's result before it is applied: a step is rejected,
leaving params and opt_state untouched and counting itself, when the loss, a gradient,
the new parameters or the new optimizer state hold a NaN/Inf, or when the parameters'
global norm would change by more than a factor `max_norm_jump` (either way). A huge
learning rate gives finite gradients at step 1 and a finite but blown-up result; that
step is rejected here instead of poisoning every later one. `optax.apply_if_finite` is
not used: it looks only at gradients and applies the update anyway after too many
failures, where the trainer must stop instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def next_token_loss(model: nnx.Module, tokens_BxT1: jax.Array,
                    segment_ids_BxT1: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(mean NLL, token count) of predicting tokens[:, 1:] from tokens[:, :-1].

    ``segment_ids_BxT1`` (packed rows, 0 = padding; ``models/packing.pack_aligned``): the model
    runs each document as if alone, and only a token's prediction of the next token of its own
    document counts (not padding, not a document's first token from the previous one's last).
    """
    if segment_ids_BxT1 is None:
        logits_BxTxV = model(tokens_BxT1[:, :-1])
        nll_BxT = optax.softmax_cross_entropy_with_integer_labels(
            logits_BxTxV.astype(jnp.float32), tokens_BxT1[:, 1:])
        return nll_BxT.mean(), jnp.asarray(nll_BxT.size, jnp.float32)
    logits_BxTxV = model(tokens_BxT1[:, :-1], segment_ids=segment_ids_BxT1[:, :-1])
    acc = jnp.promote_types(logits_BxTxV.dtype, jnp.float32)  # float64 in the exactness tests
    nll_BxT = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxTxV.astype(acc), tokens_BxT1[:, 1:])
    seg = segment_ids_BxT1
    counted = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)).astype(acc)
    count = counted.sum()
    return (nll_BxT * counted).sum() / jnp.maximum(count, 1.0), count


def _split_batch(batch):
    """A batch is a token array, or {"tokens": ..., "segment_ids": ...} for packed rows."""
    if isinstance(batch, dict):
        return batch["tokens"], batch["segment_ids"]
    return batch, None


# optax >= 0.2.5 has optax.tree.norm; global_norm is its deprecated older name.
_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *,
                    max_norm_jump: float = 0.0) -> Callable[[dict, jax.Array], tuple[dict, dict]]:
    """step(state, batch_AxBxT1) -> (state, metrics); A microbatches are averaged.  The batch
    may be {"tokens": AxBxT1, "segment_ids": AxBxT1} (packed rows, ``next_token_loss``).

    `max_norm_jump` > 0 rejects an update that multiplies or divides the global parameter
    norm by more than that factor (0 disables the check).
    """

    def loss_fn(params, rest, tokens, segment_ids=None):
        return next_token_loss(nnx.merge(graphdef, params, rest), tokens, segment_ids)[0]

    grad_fn = jax.value_and_grad(loss_fn)

    def step(state: dict, batch_AxBxT1) -> tuple[dict, dict]:
        params, rest = state["params"], state["rest"]
        n_micro = jax.tree.leaves(batch_AxBxT1)[0].shape[0]

        def micro(grads_sum, batch):
            loss, grads = grad_fn(params, rest, *_split_batch(batch))
            return jax.tree.map(jnp.add, grads_sum, grads), loss

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, losses = jax.lax.scan(micro, zeros, batch_AxBxT1)
        grads = jax.tree.map(lambda g: g / n_micro, grads)
        loss = losses.mean()
        finite = jnp.isfinite(loss) & all_finite(grads)

        updates, cand_opt_state = tx.update(grads, state["opt_state"], params)
        cand_params = optax.apply_updates(params, updates)
        old_norm, new_norm = _norm(params), _norm(cand_params)
        ratio = jnp.where(old_norm > 0, new_norm / jnp.where(old_norm > 0, old_norm, 1.0), 1.0)
        jump_ok = jnp.asarray(True)
        if max_norm_jump > 0:
            jump_ok = (ratio <= max_norm_jump) & (ratio >= 1.0 / max_norm_jump)
        accepted = (finite & all_finite(cand_params) & all_finite(cand_opt_state)
                    & jnp.isfinite(ratio) & jump_ok)

        def keep(new, old):
            return jnp.where(accepted, new, old)

        bad = (~accepted).astype(jnp.int32)
        new_state = dict(state, params=jax.tree.map(keep, cand_params, params),
                         opt_state=jax.tree.map(keep, cand_opt_state, state["opt_state"]),
                         step=state["step"] + 1,
                         bad_streak=(state["bad_streak"] + 1) * bad,
                         bad_total=state["bad_total"] + bad)
        metrics = dict(loss=loss, grad_norm=_norm(grads), finite=finite, accepted=accepted,
                       norm_ratio=ratio, param_norm=jnp.where(accepted, new_norm, old_norm),
                       bad_streak=new_state["bad_streak"], bad_total=new_state["bad_total"])
        return new_state, metrics

    return step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[Any, Any, jax.Array], jax.Array]:
    """eval(params, rest, batch_BxT1) -> [sum of NLL, token count] (float32); the batch may be
    {"tokens": ..., "segment_ids": ...} (packed rows, ``next_token_loss``)."""

    def evaluate(params, rest, batch_BxT1):
        mean, count = next_token_loss(nnx.merge(graphdef, params, rest), *_split_batch(batch_BxT1))
        return jnp.stack([mean * count, count])

    return evaluate


def init_guard_counters() -> dict[str, jax.Array]:
    zero = jnp.zeros((), jnp.int32)
    return dict(step=zero, bad_streak=zero, bad_total=zero)
