"""Preconditioned momentum: the memory stores ``P g`` instead of ``g`` (paper §2).

The preconditioner ``P`` is pluggable: any ``optax.GradientTransformation``
mapping ``g`` to ``P g`` (it may keep state, e.g. a second moment). The default
is :func:`scale_by_diagonal_second_moment`.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nested_jax.optim import _common, _validate
from nested_jax.optim.momentum_memory import check_momentum_args


class DiagonalSecondMomentState(NamedTuple):
    """State of :func:`scale_by_diagonal_second_moment`."""

    count: jax.Array  # shape=(), dtype=int32.
    nu: optax.Updates  # like params, dtype of the params: EMA of g**2.


def scale_by_diagonal_second_moment(
    b2: float = 0.999, eps: float = 1e-8, *, debias: bool = True
) -> optax.GradientTransformation:
    r"""The diagonal preconditioner ``P g = g / (sqrt(nu_hat) + eps)``.

    .. math::
      \nu_t = b_2 \nu_{t-1} + (1 - b_2) g_t^2, \quad
      \hat\nu_t = \nu_t / (1 - b_2^t), \quad P_t g_t = g_t / (\sqrt{\hat\nu_t} + \epsilon)

    Coordinates whose second moment is zero map to 0 (so ``eps = 0`` is allowed
    and makes ``P g`` exactly invariant to a per-coordinate rescaling of the
    gradients).

    Args:
      b2: decay of the second moment, in ``[0, 1)``.
      eps: added to ``sqrt(nu_hat)``, ``>= 0``.
      debias: divide by ``1 - b2^t``.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp
      >>> from nested_jax.optim import scale_by_diagonal_second_moment
      >>> tx = scale_by_diagonal_second_moment(eps=0.0)
      >>> u, _ = tx.update(jnp.array([3.0, -0.5]), tx.init(jnp.zeros(2)))
      >>> jnp.round(u, 4)
      Array([ 1., -1.], dtype=float32)

    References:
      Paper §2 row "preconditioned momentum" (``P_i`` = diagonal second moment).
    """
    where = "scale_by_diagonal_second_moment"
    _validate.check_scalar(
        where, "b2", b2, low=0.0, high=1.0, high_open=True, fix="Use e.g. 0.999."
    )
    _validate.check_scalar(where, "eps", eps, low=0.0, fix="Use e.g. 1e-8.")

    def init_fn(params):
        return DiagonalSecondMomentState(
            count=jnp.zeros([], jnp.int32), nu=_common.zeros_like(params)
        )

    def update_fn(updates, state, params=None):
        del params
        _validate.check_like(
            where,
            "updates",
            updates,
            "state.nu",
            state.nu,
            "Initialize the optimizer with params of the same structure as the gradients.",
        )
        count = _common.safe_increment(state.count)
        nu = jax.tree.map(lambda g, v: (1 - b2) * (g * g) + b2 * v, updates, state.nu)

        def precondition(g, v):
            v_hat = v / _common.debias(b2, count, v.dtype) if debias else v
            denom = jnp.sqrt(v_hat) + eps
            return jnp.where(denom > 0, g / jnp.where(denom > 0, denom, 1), 0).astype(g.dtype)

        out = jax.tree.map(precondition, updates, nu)
        return out, DiagonalSecondMomentState(count=count, nu=_common.cast_like(nu, state.nu))

    return optax.GradientTransformation(init_fn, update_fn)


class PreconditionedMomentumState(NamedTuple):
    """State of :func:`scale_by_preconditioned_momentum`."""

    count: jax.Array  # shape=(), dtype=int32.
    preconditioner: optax.OptState  # state of the pluggable P (its own shapes/dtypes).
    mu: optax.Updates  # like params, dtype=accumulator_dtype or the params': the memory.


def scale_by_preconditioned_momentum(
    alpha: float = 0.9,
    *,
    preconditioner: optax.GradientTransformation | None = None,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Momentum whose memory writes the preconditioned gradient ``P_t g_t``.

    .. math::
      \mu_t = \alpha \mu_{t-1} + P_t g_t, \qquad u_t = \mu_t

    (``u_t = alpha mu_t + P_t g_t`` with ``nesterov``). In the paper's sign,
    ``m = alpha m - eta P g``: GD on ``-<mu, P g>``. Extra arguments of
    ``update`` are forwarded to the preconditioner.

    Args:
      alpha: retention in ``[0, 1]``.
      preconditioner: a transform computing ``P g``; ``None`` uses
        :func:`scale_by_diagonal_second_moment` with its defaults. Use
        ``optax.identity()`` for plain momentum.
      nesterov: Nesterov read-out.
      accumulator_dtype: dtype of ``mu``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from nested_jax.optim import scale_by_preconditioned_momentum
      >>> tx = scale_by_preconditioned_momentum(0.5, preconditioner=optax.scale(2.0))
      >>> state = tx.init(jnp.zeros(1))
      >>> u, state = tx.update(jnp.ones(1), state)
      >>> u, state = tx.update(jnp.ones(1), state)
      >>> u
      Array([3.], dtype=float32)

    References:
      Paper §2 row "preconditioned momentum": ``m = alpha m - eta P_i g``.
    """
    where = "scale_by_preconditioned_momentum"
    check_momentum_args(where, alpha, 1.0)
    _validate.check_transform(where, "preconditioner", preconditioner)
    precond = optax.with_extra_args_support(
        scale_by_diagonal_second_moment() if preconditioner is None else preconditioner
    )
    acc_dtype = None if accumulator_dtype is None else jnp.dtype(accumulator_dtype)

    def init_fn(params):
        return PreconditionedMomentumState(
            count=jnp.zeros([], jnp.int32),
            preconditioner=precond.init(params),
            mu=_common.zeros_like(params, acc_dtype),
        )

    def update_fn(updates, state, params=None, **extra_args):
        _validate.check_like(
            where,
            "updates",
            updates,
            "state.mu",
            state.mu,
            "Initialize the optimizer with params of the same structure as the gradients.",
        )
        pg, p_state = precond.update(updates, state.preconditioner, params, **extra_args)
        mu = jax.tree.map(lambda p, m: alpha * m + p, pg, state.mu)
        out = jax.tree.map(lambda m, p: alpha * m + p, mu, pg) if nesterov else mu
        mu = _common.cast_tree(mu, acc_dtype) if acc_dtype else _common.cast_like(mu, state.mu)
        return _common.cast_like(out, updates), PreconditionedMomentumState(
            count=_common.safe_increment(state.count), preconditioner=p_state, mu=mu
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def preconditioned_momentum(
    learning_rate: optax.ScalarOrSchedule,
    alpha: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    preconditioner: optax.GradientTransformation | None = None,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Momentum over preconditioned gradients, with weight decay and learning rate.

    .. math::
      \mu_t = \alpha \mu_{t-1} + P_t g_t, \qquad
      W_t = W_{t-1} - \eta_t (\mu_t + \lambda W_{t-1})

    ``P`` defaults to the diagonal second moment with ``b2`` and ``eps``; pass
    ``preconditioner`` to plug in another (then ``b2``/``eps`` are unused).

    Args:
      learning_rate: a float or an optax schedule.
      alpha: retention of the memory.
      b2: second-moment decay of the default preconditioner.
      eps: epsilon of the default preconditioner.
      preconditioner: optional transform computing ``P g``.
      nesterov: Nesterov read-out.
      weight_decay: decoupled weight decay, scaled by the learning rate.
      weight_decay_mask: optax mask for the decay.
      accumulator_dtype: dtype of the memory.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> from nested_jax.optim import preconditioned_momentum
      >>> tx, p = preconditioned_momentum(0.1, eps=0.0), jnp.zeros(2)
      >>> u1, _ = tx.update(jnp.array([1.0, 1.0]), tx.init(p), p)
      >>> u2, _ = tx.update(jnp.array([1e3, 1e-3]), tx.init(p), p)
      >>> bool(jnp.allclose(u1, u2))  # P removes the per-coordinate scale
      True

    References:
      Paper §2 row "preconditioned momentum".
    """
    _validate.check_alias_args("preconditioned_momentum", learning_rate, weight_decay)
    if preconditioner is None:
        preconditioner = scale_by_diagonal_second_moment(b2, eps)
    return optax.chain(
        scale_by_preconditioned_momentum(
            alpha,
            preconditioner=preconditioner,
            nesterov=nesterov,
            accumulator_dtype=accumulator_dtype,
        ),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
