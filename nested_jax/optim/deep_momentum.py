r"""Deep momentum gradient descent (DMGD): the momentum memory is an MLP (paper §2).

Paper: ``W_{i+1} = W_i + m_{i+1}(u_i)`` with ``u_i`` the gradient and ``m`` an
MLP updated by its own gradient step ``m_{i+1} = alpha m_i - eta grad
L2(m_i; u_i)`` at every outer step.

Reading for tensors (decision #18). A gradient tensor of shape ``[..., F]`` is
a stack of ``R`` rows of width ``F``; the memory acts along the last axis:

.. math::
  m_\phi(g_r) = b_r + \tanh(\bar g_r W_{in}) W_{out}, \qquad
  \bar g_r = g_r / \mathrm{rms}(g_r),

with ``W_in: [F, H]`` and ``W_out: [H, F]`` shared by the rows of the tensor
(one small MLP per parameter tensor) and the output bias ``b`` per row (it has
the parameter's shape). Cost per step: a few ``R x F x H`` matmuls, i.e.
``O(H)`` per parameter -- linear in the parameter count. A per-parameter MLP
would be quadratic and does not scale.

* The input is RMS-normalized per row so that the MLP's features do not depend
  on the gradient's scale; its output is linear in ``W_out``, which is
  written with gradients, so the whole read-out has gradient units.
* ``W_out`` starts at 0, so the memory starts as the constant ``b``: with the
  MLP's step ``eta_mlp = 0`` DMGD is exactly momentum (tested).
* Objective (``objective="dot"``, default): the paper's dot-product momentum
  objective ``L2 = -sum_r <m(g_r), g_r>`` (for a constant memory it is
  ``<m, g>``, which gives plain momentum). ``objective="l2"``:
  ``1/2 sum_r ||m(g_r) - g_r||^2``.
* The inner step on the shared weights is averaged over rows (``eta_mlp / R``)
  so that it does not grow with the tensor's size.
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from nested_jax.optim import _common, _validate

OBJECTIVES = ("dot", "l2")
HIDDEN = 16
"""The MLP's default hidden width ``H`` (``hidden=None``)."""


class DeepMomentumState(NamedTuple):
    """State of :func:`scale_by_deep_momentum` (one MLP per parameter tensor)."""

    count: jax.Array  # shape=(), dtype=int32.
    bias: optax.Updates  # like params, dtype=accumulator_dtype or the params': b.
    # Trees with the structure of the params but the MLP's shapes (like optax's
    # factored moments): per tensor with last axis F,
    w_in: optax.Updates  # [F, H], dtype=float32 (float64 for float64 params).
    w_out: optax.Updates  # [H, F], same dtype as w_in.


def _normalize_rows(g: jax.Array) -> jax.Array:
    ms = jnp.mean(g * g, axis=-1, keepdims=True)
    return jnp.where(ms > 0, g * jax.lax.rsqrt(jnp.where(ms > 0, ms, 1)), 0)


def deep_momentum_readout(phi: tuple, g: jax.Array) -> jax.Array:
    """``m_phi(g_r)`` for every row ``g_r`` along the last axis of ``g [..., F]``.

    ``b + tanh(normalize(g) W_in) W_out``; no reshape, so a sharded leading axis
    stays sharded.
    """
    b, w_in, w_out = phi
    return b + jnp.tanh(_normalize_rows(g) @ w_in) @ w_out


def deep_momentum_loss(phi: tuple, g: jax.Array, objective: str = "dot") -> jax.Array:
    """The memory's inner objective ``L2(m_phi; g)``, summed over the rows of ``g``."""
    out = deep_momentum_readout(phi, jax.lax.stop_gradient(g))
    if objective == "dot":
        return -jnp.sum(out * g)
    return 0.5 * jnp.sum((out - g) ** 2)


def _leaf_step(g, b, w_in, w_out, alpha, eta, eta_mlp, objective):
    cdt = w_in.dtype
    shape = g.shape
    g = g.astype(cdt).reshape(shape or (1,))  # a scalar is one row of width 1
    phi = (b.astype(cdt).reshape(g.shape), w_in, w_out)
    gb, gwi, gwo = jax.grad(deep_momentum_loss)(phi, g, objective)
    n_rows = g.size // g.shape[-1]
    b_new = alpha * phi[0] - eta * gb
    w_in_new = alpha * w_in - (eta_mlp / n_rows) * gwi
    w_out_new = alpha * w_out - (eta_mlp / n_rows) * gwo
    out = deep_momentum_readout((b_new, w_in_new, w_out_new), g)
    return out.reshape(shape), b_new.reshape(shape), w_in_new, w_out_new


def scale_by_deep_momentum(
    alpha: float = 0.9,
    eta: float = 1.0,
    eta_mlp: float = 0.01,
    *,
    hidden: int | None = None,
    objective: str = "dot",
    seed: int = 0,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""DMGD: an MLP memory along the last axis, trained by one GD step per update.

    With ``phi = (b, W_in, W_out)`` and ``L2`` from :func:`deep_momentum_loss`:

    .. math::
      \phi_t = \alpha \phi_{t-1} - \eta\, \nabla_\phi L_2(\phi_{t-1}; g_t),
      \qquad u_t = m_{\phi_t}(g_t)

    (per-group steps: ``eta`` for ``b``, ``eta_mlp / R`` for the shared weights).
    See the module docstring for the reading; ``eta_mlp = 0`` is plain momentum.

    Args:
      alpha: retention of the memory in ``[0, 1]``.
      eta: inner step of the per-row bias (1: plain momentum when the MLP is off).
      eta_mlp: inner step of the shared MLP weights (``>= 0``). The MLP adds a
        second, learned momentum path of gain up to ``~eta_mlp H / (1 - alpha)``;
        0.01 keeps it below the bias path (0.1 diverged on the toy landscape of
        ``experiments/bench_optim_landscape.py`` where 0.01 beat momentum).
      hidden: hidden width ``H`` of the MLP; ``None``: :data:`HIDDEN` (16). It
        shapes the state, so it must be a concrete int when the state is
        initialized: ``optax.inject_hyperparams`` makes an int traced under a
        jitted ``init``, so there pass it in ``static_args`` (the ``None``
        default needs nothing).
      objective: ``"dot"`` (paper) or ``"l2"``. With ``"l2"`` the memory
        regresses onto the gradient, so its retention is ``alpha - eta``: use
        e.g. ``alpha=1, eta=0.1`` (an EMA), not the ``"dot"`` defaults.
      seed: seed of ``W_in``'s initialization (``N(0, 1/F)``).
      accumulator_dtype: dtype of ``b``.

    Returns:
      An ``optax.GradientTransformation`` with :class:`DeepMomentumState`.

    Example:
      >>> import jax.numpy as jnp
      >>> from nested_jax.optim import scale_by_deep_momentum
      >>> tx = scale_by_deep_momentum(hidden=4)
      >>> state = tx.init({'w': jnp.zeros((3, 5))})
      >>> u, state = tx.update({'w': jnp.ones((3, 5))}, state)
      >>> state.w_in['w'].shape, state.w_out['w'].shape, u['w'].shape  # W_in, W_out: [F, H], [H, F]
      ((5, 4), (4, 5), (3, 5))

    References:
      Paper §2 row "DMGD (deep momentum)"; decision #18 (linear cost).
    """
    where = "scale_by_deep_momentum"
    _validate.check_scalar(where, "alpha", alpha, low=0.0, high=1.0, fix="Use e.g. 0.9.")
    _validate.check_scalar(where, "eta", eta, low=0.0, fix="Use 1.0 (plain momentum).")
    _validate.check_scalar(
        where, "eta_mlp", eta_mlp, low=0.0, fix="Use e.g. 0.01; 0 freezes the MLP."
    )
    # None, not 16, as the default: inject_hyperparams leaves None alone, while it
    # would turn 16 into an array, traced under a jitted init, that cannot shape W_in.
    width = HIDDEN if hidden is None else _validate.check_int(where, "hidden", hidden, low=1)
    _validate.check_integer(where, "seed", seed, fix="Use e.g. 0.")
    _validate.check_choice(where, "objective", objective, OBJECTIVES)
    acc_dtype = None if accumulator_dtype is None else jnp.dtype(accumulator_dtype)

    def init_fn(params):
        if width is None:
            raise ValueError(
                f"{where}: `hidden`={hidden!r} is traced, but it is the MLP's width and "
                "shapes the state. Under optax.inject_hyperparams pass "
                "static_args=('hidden',), or leave the default hidden=None (16)."
            )
        key = jax.random.key(seed)
        leaves, treedef = jax.tree.flatten(params)
        w_in, w_out = [], []
        for i, p in enumerate(leaves):
            f = p.shape[-1] if jnp.ndim(p) else 1
            cdt = _common.compute_dtype(jnp.result_type(p))
            k = jax.random.fold_in(key, i)
            w_in.append(jax.random.normal(k, (f, width), cdt) / math.sqrt(f))
            w_out.append(jnp.zeros((width, f), cdt))
        return DeepMomentumState(
            count=jnp.zeros([], jnp.int32),
            bias=_common.zeros_like(params, acc_dtype),
            w_in=jax.tree.unflatten(treedef, w_in),
            w_out=jax.tree.unflatten(treedef, w_out),
        )

    def update_fn(updates, state, params=None):
        del params
        _validate.check_like(
            where,
            "updates",
            updates,
            "state.bias",
            state.bias,
            "Initialize the optimizer with params of the same structure as the gradients.",
        )
        leaves, treedef = jax.tree.flatten(updates)
        outs, new_b, new_wi, new_wo = [], [], [], []
        for g, b, wi, wo in zip(
            leaves,
            jax.tree.leaves(state.bias),
            jax.tree.leaves(state.w_in),
            jax.tree.leaves(state.w_out),
            strict=True,
        ):
            out, b1, wi1, wo1 = _common.sharded_like(
                lambda g, b, wi, wo: _leaf_step(g, b, wi, wo, alpha, eta, eta_mlp, objective),
                g,
                b,
                wi,
                wo,
                out_specs=lambda spec: (spec, spec, P(), P()),  # the MLP is replicated
            )
            outs.append(out.astype(g.dtype))
            new_b.append(b1.astype(b.dtype))
            new_wi.append(wi1.astype(wi.dtype))
            new_wo.append(wo1.astype(wo.dtype))
        unflatten = functools.partial(jax.tree.unflatten, treedef)
        return unflatten(outs), DeepMomentumState(
            count=_common.safe_increment(state.count),
            bias=unflatten(new_b),
            w_in=unflatten(new_wi),
            w_out=unflatten(new_wo),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def deep_momentum(
    learning_rate: optax.ScalarOrSchedule,
    alpha: float = 0.9,
    eta_mlp: float = 0.01,
    eta: float = 1.0,
    *,
    hidden: int | None = None,
    objective: str = "dot",
    seed: int = 0,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""DMGD with weight decay and learning rate.

    .. math::
      W_t = W_{t-1} - \eta_t\,(m_{\phi_t}(g_t) + \lambda W_{t-1})

    with the MLP memory of :func:`scale_by_deep_momentum`.

    Args:
      learning_rate: a float or an optax schedule.
      alpha: retention of the memory.
      eta_mlp: inner step of the MLP weights.
      eta: inner step of the per-row bias (see :func:`scale_by_deep_momentum`).
      hidden: MLP width; ``None``: 16 (see :func:`scale_by_deep_momentum`).
      objective: ``"dot"`` or ``"l2"``.
      seed: initialization seed.
      weight_decay: decoupled weight decay, scaled by the learning rate.
      weight_decay_mask: optax mask for the decay.
      accumulator_dtype: dtype of the per-row bias.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp
      >>> from nested_jax.optim import deep_momentum, momentum_memory
      >>> p = jnp.zeros((2, 3))
      >>> def updates(tx, steps=3):
      ...   s, out = tx.init(p), []
      ...   for k in range(steps):
      ...     u, s = tx.update(jnp.full((2, 3), 1.0 + k), s, p)
      ...     out.append(u)
      ...   return jnp.stack(out)
      >>> frozen_mlp = deep_momentum(0.1, eta_mlp=0.0)
      >>> bool(jnp.allclose(updates(frozen_mlp), updates(momentum_memory(0.1))))
      True

    References:
      Paper §2 row "DMGD".
    """
    _validate.check_alias_args("deep_momentum", learning_rate, weight_decay)
    return optax.chain(
        scale_by_deep_momentum(
            alpha,
            eta,
            eta_mlp,
            hidden=hidden,
            objective=objective,
            seed=seed,
            accumulator_dtype=accumulator_dtype,
        ),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
