r"""Delta momentum: momentum with a gradient-dependent decay (paper §2).

The paper gives two forms of a momentum trained on an l2 (delta-rule)
objective instead of the dot product of plain momentum:

* NeurIPS: ``m = (alpha I - g^T g) m - eta P g``
* arXiv:   ``m = beta m - eta (m g - P) g^T``

Reading for tensors (one choice, stated once here). ``g^T g`` is read per
*row*: a gradient tensor is a stack of rows along ``axis`` (the last axis by
default), and each row ``mu_r`` of the memory is decayed along its own
gradient row ``g_r``. The key is l2-normalized, ``k = g_r / ||g_r||`` (the
project normalizes keys, decision #11), which makes the decay independent of
the gradient's scale and bounded: the factor along ``k`` is a fixed number in
``[-1, 1]``, where the raw ``alpha I - g^T g`` blows up for ``||g|| > 2``. All
operations are row dot products: the cost is linear in the parameter count.
In this package's sign (``mu = -m / eta``, optax convention), per row:

* ``form="neurips"``: ``mu <- alpha mu - beta (mu . g_hat) g_hat + P g``
  -- one unit GD step, retention ``alpha``, on
  ``(beta/2) (mu . g_hat)^2 - <mu, P g>``; ``beta`` is the forgetting strength.
* ``form="arxiv"``: ``mu <- alpha mu - beta ((mu . k) - ||P g||) k`` with
  ``k = P g / ||P g||`` -- one GD step of size ``beta``, retention ``alpha``,
  on the l2 objective ``1/2 (mu . k - ||P g||)^2``: the memory's read-out
  along the key regresses onto the value. It writes ``beta P g``, so along
  ``k`` the memory is an EMA with rate ``beta`` of the (preconditioned)
  gradient.

Along ``g_hat`` (``k``) the memory keeps ``alpha - beta`` of itself; in every
orthogonal direction it keeps ``alpha``. Stale momentum that disagrees with
the current gradient is therefore forgotten faster: the point of the method.
With ``P = I`` the two forms span the same family up to a constant output scale
(``arxiv(alpha, beta) = beta * neurips(alpha, beta)``, tested); with a
preconditioner they differ in the direction that is forgotten (``g`` vs ``P g``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nested_jax.optim import _common, _validate

FORMS = ("neurips", "arxiv")


class DeltaMomentumState(NamedTuple):
    """State of :func:`scale_by_delta_momentum`."""

    count: jax.Array  # shape=(), dtype=int32.
    preconditioner: optax.OptState  # state of the pluggable P (its own shapes/dtypes).
    mu: optax.Updates  # like params, dtype=accumulator_dtype or the params': the memory.


def _row_sum(x: jax.Array, axis: int) -> jax.Array:
    return jnp.sum(x, axis=axis, keepdims=True) if x.ndim else x


def _key_coef(mu: jax.Array, key: jax.Array, axis: int) -> jax.Array:
    """``(mu . key) / ||key||^2`` per row; 0 on rows where the key is 0."""
    n2 = _row_sum(key * key, axis)
    return jnp.where(n2 > 0, _row_sum(mu * key, axis) / jnp.where(n2 > 0, n2, 1), 0)


def delta_momentum_loss(
    mu: jax.Array, g: jax.Array, pg: jax.Array, *, beta: Any, form: str, axis: int = -1
) -> jax.Array:
    """The inner objective whose GD step :func:`scale_by_delta_momentum` takes.

    ``neurips``: ``sum_r (beta/2)(mu_r . g_hat_r)^2 - <mu, P g>`` (unit step);
    ``arxiv``: ``sum_r 1/2 (mu_r . k_r - ||(P g)_r||)^2`` (step ``beta``).
    The slow oracle for the closed form (tests take ``jax.grad`` of it).
    """
    key = g if form == "neurips" else pg
    n2 = _row_sum(key * key, axis)
    norm = jnp.sqrt(n2)
    k = jnp.where(norm > 0, key / jnp.where(norm > 0, norm, 1), 0)
    read = _row_sum(mu * k, axis)
    if form == "neurips":
        return 0.5 * beta * jnp.sum(read**2) - jnp.vdot(mu, pg)
    return 0.5 * jnp.sum((read - norm) ** 2)


def _delta_step(mu, g, pg, alpha, beta, form, axis):
    cdt = _common.compute_dtype(mu.dtype, g.dtype, pg.dtype)
    m, g, p = mu.astype(cdt), g.astype(cdt), pg.astype(cdt)
    if form == "neurips":
        return alpha * m - beta * _key_coef(m, g, axis) * g + p
    return alpha * m - beta * _key_coef(m, p, axis) * p + beta * p


def scale_by_delta_momentum(
    alpha: float = 0.9,
    beta: float = 0.5,
    *,
    form: str = "neurips",
    axis: int = -1,
    preconditioner: optax.GradientTransformation | None = None,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Momentum that forgets its component along the current gradient faster.

    Per row ``r`` along ``axis`` (see the module docstring for the reading):

    .. math::
      \text{neurips:}\quad \mu_t = (\alpha I - \beta \hat g \hat g^T)\,\mu_{t-1} + P g_t
      \qquad
      \text{arxiv:}\quad \mu_t = (\alpha I - \beta \hat k \hat k^T)\,\mu_{t-1} + \beta P g_t

    with ``g_hat = g_r / ||g_r||``, ``k_hat = (P g)_r / ||(P g)_r||``; the update
    is ``u_t = mu_t``. Both are one GD step on :func:`delta_momentum_loss`.
    ``beta = 0`` (neurips) is :func:`scale_by_momentum_memory` exactly.

    Args:
      alpha: retention in ``[0, 1]`` (the paper's ``alpha`` / arXiv ``beta``).
      beta: forgetting strength along the key, in ``[0, 1]``; for ``arxiv`` it is
        also the step of the l2 objective (the paper's ``eta``). Along the key
        the memory keeps ``alpha - beta``.
      form: ``"neurips"`` or ``"arxiv"``.
      axis: the axis along which rows are taken (scalars are one row).
      preconditioner: optional transform computing ``P g`` (``None``: ``P = I``).
      accumulator_dtype: dtype of ``mu``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> from nested_jax.optim import scale_by_delta_momentum
      >>> tx = scale_by_delta_momentum(alpha=0.9, beta=0.5)
      >>> state = tx.init(jnp.zeros(2))
      >>> _, state = tx.update(jnp.array([1.0, 1.0]), state)
      >>> u, state = tx.update(jnp.array([1.0, 0.0]), state)
      >>> u  # old memory: 0.9 kept across the gradient, 0.9 - 0.5 along it
      Array([1.4, 0.9], dtype=float32)

    References:
      Paper §2 row "delta momentum" (NeurIPS and arXiv forms).
    """
    where = "scale_by_delta_momentum"
    _validate.check_scalar(where, "alpha", alpha, low=0.0, high=1.0, fix="Use e.g. 0.9.")
    _validate.check_scalar(
        where,
        "beta",
        beta,
        low=0.0,
        high=1.0,
        fix="It is the forgetting strength along the gradient; use e.g. 0.5.",
    )
    _validate.check_choice(where, "form", form, FORMS)
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise ValueError(f"{where}: `axis` must be an int, got {axis!r}.")
    _validate.check_transform(where, "preconditioner", preconditioner)
    precond = optax.with_extra_args_support(preconditioner or optax.identity())
    acc_dtype = None if accumulator_dtype is None else jnp.dtype(accumulator_dtype)

    def init_fn(params):
        return DeltaMomentumState(
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
        for leaf in jax.tree.leaves(updates):
            if leaf.ndim and not -leaf.ndim <= axis < leaf.ndim:
                raise ValueError(
                    f"{where}: `axis`={axis} is out of range for a gradient of shape {leaf.shape}."
                )
        pg, p_state = precond.update(updates, state.preconditioner, params, **extra_args)
        new = jax.tree.map(
            lambda m, g, p: _delta_step(m, g, p, alpha, beta, form, axis), state.mu, updates, pg
        )
        mu = _common.cast_tree(new, acc_dtype) if acc_dtype else _common.cast_like(new, state.mu)
        return _common.cast_like(new, updates), DeltaMomentumState(
            count=_common.safe_increment(state.count), preconditioner=p_state, mu=mu
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def delta_momentum(
    learning_rate: optax.ScalarOrSchedule,
    alpha: float = 0.9,
    beta: float = 0.5,
    *,
    form: str = "neurips",
    axis: int = -1,
    preconditioner: optax.GradientTransformation | None = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Delta momentum with weight decay and learning rate.

    .. math::
      \mu_t = (\alpha I - \beta \hat g \hat g^T)\mu_{t-1} + P g_t, \qquad
      W_t = W_{t-1} - \eta_t (\mu_t + \lambda W_{t-1})

    (NeurIPS form; see :func:`scale_by_delta_momentum` for the arXiv form).

    Args:
      learning_rate: a float or an optax schedule.
      alpha: retention.
      beta: forgetting strength along the gradient.
      form: ``"neurips"`` or ``"arxiv"``.
      axis: row axis.
      preconditioner: optional transform computing ``P g``.
      weight_decay: decoupled weight decay, scaled by the learning rate.
      weight_decay_mask: optax mask for the decay.
      accumulator_dtype: dtype of the memory.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> from nested_jax.optim import delta_momentum, momentum_memory
      >>> p, gs = jnp.zeros(2), [jnp.array([1.0, 0.0]), jnp.array([-1.0, 0.0])]
      >>> def last_update(tx):
      ...   s = tx.init(p)
      ...   for g in gs:
      ...     u, s = tx.update(g, s, p)
      ...   return u
      >>> round(float(last_update(delta_momentum(1.0))[0]), 4)  # follows the new gradient
      0.6
      >>> round(float(last_update(momentum_memory(1.0))[0]), 4)
      0.1

    References:
      Paper §2 row "delta momentum".
    """
    _validate.check_alias_args("delta_momentum", learning_rate, weight_decay)
    return optax.chain(
        scale_by_delta_momentum(
            alpha,
            beta,
            form=form,
            axis=axis,
            preconditioner=preconditioner,
            accumulator_dtype=accumulator_dtype,
        ),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
