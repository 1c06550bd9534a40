r"""Delta momentum: momentum with a gradient-dependent decay (paper §2).

The paper gives two forms of a momentum trained on an l2 (delta-rule)
objective instead of the dot product of plain momentum:

* NeurIPS: ``m = (alpha I - g^T g) m - eta P g``
* arXiv:   ``m = beta m - eta (m g - P) g^T``

Reading for tensors (stated once here). ``g^T g`` acts per *row*: a gradient
tensor is a stack of rows along ``axis`` (the last by default) and each row
``mu_r`` of the memory is decayed along its own gradient row ``g_r``; all
operations are row dot products, so the cost is linear in the parameter
count. Both forms are gradient steps on the l2 term ``1/2 (m . g)^2``, whose
explicit step ``I - beta g g^T`` is unstable once ``beta ||g||^2 > 2``. We take
the *exact proximal* step instead, the same Sherman–Morrison step the paper
uses for DGD (decision #5):

.. math::
  (I + \beta g g^T)^{-1} = I - \beta' g g^T, \qquad
  \beta' = \frac{\beta}{1 + \beta \|g\|^2}.

In this package's sign (``mu = -m / eta``, optax convention), per row:

* ``form="neurips"``: ``mu <- alpha (I - beta' g g^T) mu + P g``. The
  memory first forgets along ``g`` (prox of ``beta/2 (m . g)^2``), then
  decays by ``alpha`` and writes ``P g`` as plain momentum does.
* ``form="arxiv"``: ``mu <- (I - beta' g g^T)(alpha mu + beta P g)``, the
  exact minimizer of the arXiv objective ``1/2 (m . g)^2 - <m, P g>`` (its
  gradient is the printed ``(m g - P) g^T``) with step ``beta`` from
  ``alpha mu``. The write is damped too: along ``g`` it is ``beta'``, so a
  large gradient is written with less weight (a trust region).

Along ``g`` the memory keeps ``alpha / (1 + beta ||g||^2)`` of itself, in every
orthogonal direction ``alpha``: stale momentum is forgotten along the
directions the gradient now points in, the more the larger the gradient, and
the decay is always in ``(0, alpha]``, so the recurrence is stable for any
``beta >= 0``. ``beta`` has units ``1 / ||g||^2``: forgetting sets in once
``||g_r||^2 >~ 1 / beta``. A scale-free alternative (a unit key
``g / ||g||``) forgets at the same rate for every gradient size; on the toy
landscape of ``experiments/bench_optim_landscape.py`` it lost to plain
momentum, while this reading beats it (see that benchmark).
"""

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


def _forget(mu: jax.Array, g: jax.Array, beta: Any, axis: int) -> jax.Array:
    """``(I - beta' g g^T) mu`` per row: the exact proximal step on ``beta/2 (mu . g)^2``."""
    n2 = _row_sum(g * g, axis)
    return mu - beta / (1 + beta * n2) * _row_sum(mu * g, axis) * g


def delta_momentum_loss(
    m: jax.Array,
    mu: jax.Array,
    g: jax.Array,
    pg: jax.Array,
    *,
    alpha: Any,
    beta: Any,
    form: str,
    axis: int = -1,
) -> jax.Array:
    """The proximal objective whose minimizer over ``m`` is the new memory.

    ``neurips``: ``sum_r 1/2 (m_r . g_r)^2 + ||m - mu||^2 / (2 beta)`` (the
    forgetting step; the transform then returns ``alpha m* + P g``);
    ``arxiv``: ``sum_r 1/2 (m_r . g_r)^2 - <m, P g> + ||m - alpha mu||^2 / (2 beta)``.
    The slow oracle of the closed form (tests minimize it with a linear solve).
    """
    read = 0.5 * jnp.sum(_row_sum(m * g, axis) ** 2)
    if form == "neurips":
        return read + jnp.sum((m - mu) ** 2) / (2 * beta)
    return read - jnp.vdot(m, pg) + jnp.sum((m - alpha * mu) ** 2) / (2 * beta)


def _delta_step(mu, g, pg, alpha, beta, form, axis):
    cdt = _common.compute_dtype(mu.dtype, g.dtype, pg.dtype)
    m, g, p = mu.astype(cdt), g.astype(cdt), pg.astype(cdt)
    if form == "neurips":
        return alpha * _forget(m, g, beta, axis) + p
    return _forget(alpha * m + beta * p, g, beta, axis)


def scale_by_delta_momentum(
    alpha: float = 0.9,
    beta: float = 1.0,
    *,
    form: str = "neurips",
    axis: int | None = None,
    preconditioner: optax.GradientTransformation | None = None,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Momentum that forgets its component along the current gradient.

    Per row ``r`` along ``axis`` (module docstring: the reading), with
    ``beta' = beta / (1 + beta ||g_r||^2)``:

    .. math::
      \text{neurips:}\quad \mu_t = \alpha (I - \beta' g g^T)\,\mu_{t-1} + P g_t
      \qquad
      \text{arxiv:}\quad \mu_t = (I - \beta' g g^T)(\alpha \mu_{t-1} + \beta P g_t)

    and the update is ``u_t = mu_t``. Each is the minimizer of
    :func:`delta_momentum_loss` (tested). ``beta = 0`` (neurips) is
    :func:`scale_by_momentum_memory` exactly.

    Args:
      alpha: retention in ``[0, 1]`` (the paper's ``alpha`` / arXiv ``beta``).
      beta: step of the l2 (delta) objective, ``>= 0``, in units of
        ``1 / ||g||^2``: along ``g`` the memory keeps ``alpha / (1 + beta ||g||^2)``.
        For ``arxiv`` it also scales the write (the paper's ``eta``).
      form: ``"neurips"`` or ``"arxiv"``.
      axis: the axis along which rows are taken (scalars are one row); ``None``:
        the last. It picks array axes, so it must be a Python int: under
        ``optax.inject_hyperparams`` (which turns ints into arrays) pass it in
        ``static_args`` (the ``None`` default needs nothing).
      preconditioner: optional transform computing ``P g`` (``None``: ``P = I``).
      accumulator_dtype: dtype of ``mu``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> from nested_jax.optim import scale_by_delta_momentum
      >>> tx = scale_by_delta_momentum(alpha=0.9, beta=1.0)
      >>> state = tx.init(jnp.zeros(2))
      >>> _, state = tx.update(jnp.array([1.0, 1.0]), state)
      >>> u, state = tx.update(jnp.array([1.0, 0.0]), state)
      >>> u  # old memory: 0.9 kept across the gradient, 0.9 / (1 + 1) along it
      Array([1.45, 0.9 ], dtype=float32)

    References:
      Paper §2 row "delta momentum" (NeurIPS and arXiv forms); decision #5
      (the Sherman–Morrison step).
    """
    where = "scale_by_delta_momentum"
    _validate.check_scalar(where, "alpha", alpha, low=0.0, high=1.0, fix="Use e.g. 0.9.")
    _validate.check_scalar(
        where,
        "beta",
        beta,
        low=0.0,
        fix="It is the step of the forgetting term, in units of 1/||g||^2; e.g. 1.0.",
    )
    _validate.check_choice(where, "form", form, FORMS)
    # None, not -1, as the default: inject_hyperparams leaves None alone, while it
    # would turn -1 into an array, which cannot pick an axis.
    if axis is None:
        axis = -1
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise ValueError(
            f"{where}: `axis` must be an int or None (the last axis), got {axis!r}. Under "
            "optax.inject_hyperparams pass static_args=('axis',)."
        )
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
    beta: float = 1.0,
    *,
    form: str = "neurips",
    axis: int | None = None,
    preconditioner: optax.GradientTransformation | None = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Delta momentum with weight decay and learning rate.

    .. math::
      \mu_t = \alpha (I - \beta' g g^T)\mu_{t-1} + P g_t, \qquad
      W_t = W_{t-1} - \eta_t (\mu_t + \lambda W_{t-1})

    (NeurIPS form; see :func:`scale_by_delta_momentum` for the arXiv form).

    Args:
      learning_rate: a float or an optax schedule.
      alpha: retention.
      beta: step of the forgetting term (units ``1 / ||g||^2``).
      form: ``"neurips"`` or ``"arxiv"``.
      axis: row axis; ``None``: the last.
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
      0.55
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
