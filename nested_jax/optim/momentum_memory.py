"""Momentum as an associative memory (paper §1-2).

Sign convention of this package: the paper's memory ``m`` is added to the
weights (``W += m``); optax transforms return a gradient-like direction that
``optax.scale_by_learning_rate`` negates. The state ``mu`` of every memory here
is therefore ``mu = -m / eta``: same recurrence, gradient sign.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nested_jax.optim import _common, _validate


class MomentumMemoryState(NamedTuple):
    """State of :func:`scale_by_momentum_memory`."""

    count: jax.Array  # shape=(), dtype=int32: number of updates so far.
    mu: optax.Updates  # like params, dtype=accumulator_dtype or the params': the memory.


def momentum_memory_loss(mu: jax.Array, g: jax.Array) -> jax.Array:
    """The memory's inner objective ``-<mu, g>`` (paper: ``<m g^T, I> = <m, g>``).

    One gradient step of size ``eta`` on it with retention ``alpha`` is the
    momentum recurrence; the transform below is that step in closed form.
    """
    return -jnp.vdot(mu, g)


def check_momentum_args(where: str, alpha: Any, eta: Any) -> None:
    _validate.check_scalar(
        where,
        "alpha",
        alpha,
        low=0.0,
        high=1.0,
        fix="It is the retention of the memory; use e.g. 0.9.",
    )
    _validate.check_scalar(
        where,
        "eta",
        eta,
        low=0.0,
        low_open=True,
        fix="It is the memory's inner step size; use 1.0 (plain momentum) or 1 - alpha (EMA).",
    )


def scale_by_momentum_memory(
    alpha: float = 0.9,
    eta: float = 1.0,
    *,
    nesterov: bool = False,
    debias: bool = False,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Momentum as a 2-level associative memory of past gradients.

    The memory ``mu`` takes one gradient step of size ``eta`` on its objective
    ``-<mu, g>`` (:func:`momentum_memory_loss`), with retention ``alpha`` (which
    adds an l2 penalty on the memory, paper §1):

    .. math::
      \mu_{t} = \alpha \mu_{t-1} + \eta g_t, \qquad u_t = \mu_t

    or, with ``nesterov``, ``u_t = alpha mu_t + eta g_t``. With ``debias`` the
    two terms are divided by ``1 - alpha^(t+1)`` and ``1 - alpha^t`` as in
    optax's Adam/Muon (meant for ``eta = 1 - alpha``). With the defaults this is
    exactly ``optax.trace(alpha)`` (tested).

    Args:
      alpha: retention in ``[0, 1]`` (the paper's ``alpha``).
      eta: inner step size of the memory (> 0); ``1 - alpha`` gives an EMA.
      nesterov: read the memory one step ahead.
      debias: Adam-style bias correction.
      accumulator_dtype: dtype of ``mu``; ``None`` keeps the params'.

    Returns:
      An ``optax.GradientTransformation`` with :class:`MomentumMemoryState`.

    Example:
      >>> import jax.numpy as jnp
      >>> from nested_jax.optim import scale_by_momentum_memory
      >>> tx = scale_by_momentum_memory(alpha=0.5)
      >>> state = tx.init(jnp.zeros(2))
      >>> u, state = tx.update(jnp.array([1.0, 2.0]), state)
      >>> u, state = tx.update(jnp.array([1.0, 2.0]), state)
      >>> u
      Array([1.5, 3. ], dtype=float32)

    References:
      Paper §1 and §2 row "momentum as memory": ``m = alpha m - eta g``, ``W += m``.
    """
    where = "scale_by_momentum_memory"
    check_momentum_args(where, alpha, eta)
    acc_dtype = None if accumulator_dtype is None else jnp.dtype(accumulator_dtype)

    def init_fn(params):
        return MomentumMemoryState(
            count=jnp.zeros([], jnp.int32), mu=_common.zeros_like(params, acc_dtype)
        )

    def update_fn(updates, state, params=None):
        del params
        _validate.check_like(
            where,
            "updates",
            updates,
            "state.mu",
            state.mu,
            "Initialize the optimizer with params of the same structure as the gradients.",
        )
        count = _common.safe_increment(state.count)
        mu = jax.tree.map(lambda g, m: alpha * m + eta * g, updates, state.mu)
        if nesterov:
            if debias:
                out = jax.tree.map(
                    lambda m, g: (
                        alpha * (m / _common.debias(alpha, count + 1, m.dtype))
                        + eta * (g / _common.debias(alpha, count, g.dtype))
                    ),
                    mu,
                    updates,
                )
            else:
                out = jax.tree.map(lambda m, g: alpha * m + eta * g, mu, updates)
        else:
            out = (
                jax.tree.map(lambda m: m / _common.debias(alpha, count, m.dtype), mu)
                if debias
                else mu
            )
        out = _common.cast_like(out, updates)
        mu = _common.cast_tree(mu, acc_dtype) if acc_dtype else _common.cast_like(mu, state.mu)
        return out, MomentumMemoryState(count=count, mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


def momentum_memory(
    learning_rate: optax.ScalarOrSchedule,
    alpha: float = 0.9,
    *,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""SGD with momentum read as an associative memory (paper §2).

    .. math::
      \mu_t = \alpha \mu_{t-1} + g_t, \qquad
      W_{t} = W_{t-1} - \eta_t (\mu_t + \lambda W_{t-1})

    Equal to ``optax.sgd(learning_rate, momentum=alpha, nesterov=nesterov)``
    when ``weight_decay=0`` (tested).

    Args:
      learning_rate: a float or an optax schedule.
      alpha: retention of the memory.
      nesterov: Nesterov read-out.
      weight_decay: decoupled weight decay, scaled by the learning rate.
      weight_decay_mask: optax mask (tree or callable) for the decay.
      accumulator_dtype: dtype of the memory.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from nested_jax.optim import momentum_memory
      >>> tx, ref = momentum_memory(0.1, alpha=0.9), optax.sgd(0.1, momentum=0.9)
      >>> p, s, s_ref = jnp.ones(2), tx.init(jnp.ones(2)), ref.init(jnp.ones(2))
      >>> for g in (jnp.array([1.0, -1.0]), jnp.array([0.5, 2.0])):
      ...   u, s = tx.update(g, s, p)
      ...   u_ref, s_ref = ref.update(g, s_ref, p)
      >>> bool(jnp.array_equal(u, u_ref))
      True

    References:
      Paper §2 row "momentum as memory".
    """
    _validate.check_alias_args("momentum_memory", learning_rate, weight_decay)
    return optax.chain(
        scale_by_momentum_memory(alpha, nesterov=nesterov, accumulator_dtype=accumulator_dtype),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
