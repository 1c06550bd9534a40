r"""Adam as the optimal associative memory of the gradients (paper Appendix B).

The paper: Adam is the optimal memory ``m`` (elementwise) for

.. math::
  \min_m \sum_i \|m \odot g_i - P\|^2 + \lambda \|m\|^2, \qquad
  P = \sqrt{\textstyle\sum_i g_i^2}.

The construction made exact. Weight the history with Adam's bias-corrected
EMA weights, ``w^{(1)}_i = (1-b_1) b_1^{t-i} / (1-b_1^t)`` (and ``w^{(2)}`` with
``b_2``), so ``sum_i w^{(1)}_i g_i = mu_hat`` and ``sum_i w^{(2)}_i g_i^2 =
nu_hat``; take ``P = sqrt(nu_hat)`` and ``lambda = eps * P``. The objective

.. math::
  L_t(m) = \sum_i w^{(2)}_i \|m \odot g_i\|^2
         - 2 \sum_i w^{(1)}_i \langle m \odot g_i, P \rangle
         + \sum_i w^{(1)}_i \|P\|^2 + \lambda \|m\|^2

is exactly the paper's ``sum_i w_i ||m * g_i - P||^2 + lambda ||m||^2`` when
``b_1 = b_2`` (with ``b_1 != b_2`` the key and the value terms forget at their
own rates). It is quadratic and separable, and its minimizer is

.. math::
  m^*_t = \frac{P\,\hat\mu_t}{\hat\nu_t + \epsilon P}
        = \frac{\hat\mu_t}{\sqrt{\hat\nu_t} + \epsilon},

Adam's update. :func:`scale_by_adam_memory` keeps the two sufficient
statistics of the objective (recurrently) and returns its minimizer in closed
form; :func:`adam_memory_loss` evaluates the objective from an explicit
gradient history (the oracle). Tests: minimizer of the oracle ==
``optax.adam`` == this transform, in float64.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nested_jax.optim import _common, _validate


class AdamMemoryState(NamedTuple):
    """State of :func:`scale_by_adam_memory`: the objective's sufficient statistics."""

    count: jax.Array  # shape=(), dtype=int32.
    mu: optax.Updates  # like params, dtype=accumulator_dtype or the params': EMA_b1 of g.
    nu: optax.Updates  # like params, dtype of the params: EMA_b2 of g**2.


def adam_memory_loss(
    m: jax.Array, grad_history: jax.Array, *, b1: float, b2: float, eps: float
) -> jax.Array:
    """The Appendix-B objective ``L_t(m)`` for a history ``[t, ...]`` of gradients."""
    t = grad_history.shape[0]
    age = jnp.arange(t - 1, -1, -1, dtype=grad_history.dtype)
    w1 = (1 - b1) * b1**age / (1 - b1**t)
    w2 = (1 - b2) * b2**age / (1 - b2**t)
    expand = lambda w: w.reshape((t,) + (1,) * (grad_history.ndim - 1))
    p = jnp.sqrt(jnp.sum(expand(w2) * grad_history**2, axis=0))
    mg = m[None] * grad_history
    lam = eps * p
    return (
        jnp.sum(expand(w2) * mg**2)
        - 2 * jnp.sum(expand(w1) * mg * p[None])
        + jnp.sum(w1) * jnp.sum(p**2)
        + jnp.sum(lam * m**2)
    )


def scale_by_adam_memory(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Adam built as the optimal associative memory of Appendix B.

    .. math::
      m^*_t = \arg\min_m L_t(m) = \frac{P_t \hat\mu_t}{\hat\nu_t + \epsilon P_t},
      \qquad P_t = \sqrt{\hat\nu_t}

    (see the module docstring for ``L_t``). Equals ``optax.scale_by_adam`` up to
    rounding (tested in float64). Coordinates with ``nu_hat = 0`` give 0.

    Args:
      b1: decay of the value statistic ``mu`` in ``[0, 1)``.
      b2: decay of the key statistic ``nu`` in ``[0, 1)``.
      eps: regularizer ``lambda = eps * P``, ``>= 0``.
      accumulator_dtype: dtype of ``mu``.

    Returns:
      An ``optax.GradientTransformation`` with :class:`AdamMemoryState`.

    Example:
      >>> import jax.numpy as jnp
      >>> from nested_jax.optim import scale_by_adam_memory
      >>> tx = scale_by_adam_memory(eps=0.0)
      >>> u, _ = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)))
      >>> jnp.round(u, 4)  # the first Adam step is sign(g)
      Array([ 1., -1.], dtype=float32)

    References:
      Paper §1 and Appendix B: "Adam = optimal associative memory".
    """
    where = "scale_by_adam_memory"
    _validate.check_scalar(where, "b1", b1, low=0.0, high=1.0, high_open=True, fix="Use e.g. 0.9.")
    _validate.check_scalar(
        where, "b2", b2, low=0.0, high=1.0, high_open=True, fix="Use e.g. 0.999."
    )
    _validate.check_scalar(where, "eps", eps, low=0.0, fix="Use e.g. 1e-8.")
    acc_dtype = None if accumulator_dtype is None else jnp.dtype(accumulator_dtype)

    def init_fn(params):
        return AdamMemoryState(
            count=jnp.zeros([], jnp.int32),
            mu=_common.zeros_like(params, acc_dtype),
            nu=_common.zeros_like(params),
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
        mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, updates, state.mu)
        nu = jax.tree.map(lambda g, v: (1 - b2) * (g * g) + b2 * v, updates, state.nu)

        def optimal_memory(m, v):
            m_hat = m / _common.debias(b1, count, m.dtype)
            v_hat = v / _common.debias(b2, count, v.dtype)
            p = jnp.sqrt(v_hat)  # the value P of Appendix B
            denom = v_hat + eps * p  # key statistic + lambda
            return jnp.where(denom > 0, p * m_hat / jnp.where(denom > 0, denom, 1), 0)

        out = _common.cast_like(jax.tree.map(optimal_memory, mu, nu), updates)
        mu = _common.cast_tree(mu, acc_dtype) if acc_dtype else _common.cast_like(mu, state.mu)
        return out, AdamMemoryState(count=count, mu=mu, nu=_common.cast_like(nu, state.nu))

    return optax.GradientTransformation(init_fn, update_fn)


def adam_memory(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""AdamW assembled from the Appendix-B memory (equals ``optax.adamw``).

    .. math::
      W_t = W_{t-1} - \eta_t\,(m^*_t + \lambda_{wd} W_{t-1})

    Args:
      learning_rate: a float or an optax schedule.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: epsilon (the memory's regularizer ``lambda = eps * P``).
      weight_decay: decoupled weight decay, scaled by the learning rate.
      weight_decay_mask: optax mask for the decay.
      accumulator_dtype: dtype of the first moment.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from nested_jax.optim import adam_memory
      >>> p, g = jnp.array([1.0, 2.0]), jnp.array([0.3, -0.1])
      >>> a, _ = adam_memory(0.1).update(g, adam_memory(0.1).init(p), p)
      >>> b, _ = optax.adam(0.1).update(g, optax.adam(0.1).init(p), p)
      >>> bool(jnp.allclose(a, b))
      True

    References:
      Paper Appendix B.
    """
    _validate.check_alias_args("adam_memory", learning_rate, weight_decay)
    return optax.chain(
        scale_by_adam_memory(b1, b2, eps, accumulator_dtype=accumulator_dtype),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
