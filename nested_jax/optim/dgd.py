r"""Delta gradient descent (DGD) for linear layers (paper §2; decision #5).

For a linear layer ``y = x W`` (flax layout: ``W`` is ``[D_in, D_out]``) and
one input ``x`` with surprise ``u = dL/dy``, the paper's DGD step (written for
``W x`` as ``W_{t+1} = W_t (I - eta' x x^T) - eta' u x^T``) is, in flax layout,

.. math::
  W_{t+1} = (I - \eta' x x^T) W_t - \eta' x u^T, \qquad
  \eta' = \frac{\eta}{1 + \eta \|x\|^2}.

It is the *exact* proximal step

.. math::
  W_{t+1} = \arg\min_W \langle W, G \rangle + \tfrac{1}{2}\|x^T W\|^2
            + \tfrac{1}{2\eta}\|W - W_t\|^2, \qquad G = x u^T,

(Sherman–Morrison gives ``eta'``): a GD step on the linear surprise plus an
l2 penalty on the layer's output, which forgets what ``W`` maps ``x`` to.

Reading for a batch of ``N`` inputs ``X`` (rows) with a mean-reduced loss
(``G = X^T U / N``): the same proximal step with the mean penalty
``1/(2N) ||X W||^2``,

.. math::
  W_{t+1} = (I + \tfrac{\eta}{N} X^T X)^{-1}(W_t - \eta G),

solved exactly: by Woodbury through an ``N x N`` system when ``N <= D_in``,
else through the ``D_in x D_in`` one. ``N = 1`` is the paper's formula. Cost:
``O(N D_in D_out)`` plus ``O(min(N, D_in)^2 max(N, D_in))``, i.e. linear in
the layer's parameters for a fixed batch. As an optax transform it returns the
direction ``D`` with ``W_{t+1} - W_t = -eta D``:

.. math::
  D = (I + \tfrac{\eta}{N} X^T X)^{-1}\,(G + \tfrac{1}{N} X^T X W_t).
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import optax

from nested_jax.optim import _common, _validate


class DGDState(NamedTuple):
    """State of :func:`scale_by_dgd`."""

    count: jax.Array  # shape=(), dtype=int32: for the learning-rate schedule.


def _dgd_matrix(g: jax.Array, w: jax.Array, x: jax.Array, lr: Any) -> jax.Array:
    """The DGD direction for one ``[D_in, D_out]`` matrix and inputs ``[N, D_in]``."""
    n, d_in = x.shape
    s = lr / n
    r = g + x.T @ (x @ w) / n  # G + C W / N
    # Both systems are symmetric positive definite (identity + PSD): Cholesky.
    if n <= d_in:  # Woodbury: (I + s X^T X)^-1 = I - s X^T (I + s X X^T)^-1 X
        k = jnp.eye(n, dtype=x.dtype) + s * (x @ x.T)
        return r - s * (x.T @ _spd_solve(k, x @ r))
    a = jnp.eye(d_in, dtype=x.dtype) + s * (x.T @ x)
    return _spd_solve(a, r)


def _spd_solve(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a, lower=True), b)


def _dgd_leaf(where: str, path: str, g, w, x, lr):
    if w.ndim < 2:
        raise ValueError(
            f"{where}: parameter {path} has shape {w.shape}; DGD inputs are only for linear "
            "weights [..., D_in, D_out]. Give None for this leaf in `inputs`."
        )
    d_in = w.shape[-2]
    lead = w.shape[:-2]
    if x.ndim < 2 or x.shape[-1] != d_in or x.shape[: len(lead)] != lead:
        raise ValueError(
            f"{where}: inputs for parameter {path} (shape {w.shape}) must have shape "
            f"{lead + ('N', d_in)} (leading axes of a stacked weight, then any number of "
            f"example axes, then D_in={d_in}); got {x.shape}."
        )
    cdt = _common.compute_dtype(g.dtype, w.dtype, x.dtype)

    mat = w.shape[-2:]

    def direction(g, w, x):
        n_lead = math.prod(lead)
        x = x.astype(cdt).reshape((n_lead, -1, d_in))
        g = g.astype(cdt).reshape((n_lead,) + mat)
        w = w.astype(cdt).reshape((n_lead,) + mat)
        lr_ = jnp.asarray(lr, cdt)
        # lax.map, not vmap: one unbatched solve per matrix. jaxlib's batched LAPACK
        # kernels wait on XLA's CPU thread pool from inside it and were seen to
        # deadlock next to concurrent matmuls on a 2-core machine (jax 0.10).
        d = jax.lax.map(lambda a: _dgd_matrix(*a, lr_), (g, w, x))
        return d.reshape(lead + mat)

    return _common.sharded_like(direction, g, w, x).astype(g.dtype)


def scale_by_dgd(
    learning_rate: optax.ScalarOrSchedule,
) -> optax.GradientTransformationExtraArgs:
    r"""The DGD direction for linear layers; needs the layer inputs.

    .. math::
      D = (I + \tfrac{\eta}{N} X^T X)^{-1}(G + \tfrac{1}{N} X^T X W),
      \qquad W \leftarrow W - \eta D

    ``update(grads, state, params, inputs=...)``: ``inputs`` is a tree with the
    structure of the params whose leaves are the input activations
    ``[..., N, D_in]`` of each linear weight ``[..., D_in, D_out]`` (leading
    axes of a stacked weight first; example axes are flattened), or ``None``
    for parameters that get a plain gradient step (DGD with ``x = 0``).
    ``inputs=None`` makes the whole step plain GD. ``params`` is required when
    any input is given.

    Args:
      learning_rate: ``eta``, a float or schedule; it enters the exact step
        non-linearly, so pass the same value as the final learning-rate scale
        (:func:`dgd` does).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> from nested_jax.optim import scale_by_dgd
      >>> tx = scale_by_dgd(0.5)
      >>> w, x = jnp.eye(2), jnp.array([[1.0, 0.0]])
      >>> d, _ = tx.update(jnp.zeros((2, 2)), tx.init(w), w, inputs=x)
      >>> jnp.round(w - 0.5 * d, 4)  # zero surprise: forget along x by eta' ||x||^2 = 1/3
      Array([[0.6667, 0.    ],
             [0.    , 1.    ]], dtype=float32)

    References:
      Paper §2 row "DGD"; decision #5 (Sherman–Morrison step).
    """
    where = "scale_by_dgd"
    _validate.check_scalar(
        where, "learning_rate", learning_rate, low=0.0, fix="Use a positive step size."
    )

    def init_fn(params):
        del params
        return DGDState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, inputs=None, **extra_args):
        del extra_args
        count = _common.safe_increment(state.count)
        if params is not None:
            _validate.check_like(
                where,
                "updates",
                updates,
                "params",
                params,
                "Pass the params of the same model whose gradients these are.",
            )
        if inputs is None:
            return updates, DGDState(count=count)
        if params is None:
            raise ValueError(f"{where}: `params` is required when `inputs` are given.")
        lr = _common.scale_value(learning_rate, state.count)
        xs = _validate.leaves_aligned(
            where,
            "inputs",
            inputs,
            updates,
            is_other_leaf=lambda v: v is None or hasattr(v, "shape"),
            fix="Give the layer-input activations for each linear weight and None elsewhere.",
        )
        leaves, treedef = jax.tree.flatten(updates, is_leaf=_validate.is_masked)
        ws = jax.tree.leaves(params, is_leaf=_validate.is_masked)
        paths = _validate.leaf_paths(updates)
        out = []
        for path, g, w, x in zip(paths, leaves, ws, xs, strict=True):
            if _validate.is_masked(g) or x is None or _validate.is_masked(x):
                out.append(g)
            else:
                out.append(_dgd_leaf(where, path, g, w, x, lr))
        return jax.tree.unflatten(treedef, out), DGDState(count=count)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Delta gradient descent for linear layers, with weight decay and learning rate.

    .. math::
      W_{t+1} = (I + \tfrac{\eta}{N} X^T X)^{-1}(W_t - \eta G) - \eta \lambda W_t

    For one input ``x``: ``W_{t+1} = (I - eta' x x^T) W_t - eta' x u^T`` with
    ``eta' = eta / (1 + eta ||x||^2)`` (tested against this formula and against
    the proximal objective it solves). Call ``update(grads, state, params,
    inputs=...)``; see :func:`scale_by_dgd`.

    Args:
      learning_rate: a float or an optax schedule.
      weight_decay: decoupled weight decay, scaled by the learning rate.
      weight_decay_mask: optax mask for the decay.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp
      >>> from nested_jax.optim import dgd
      >>> x = jnp.array([[1.0, 2.0]])  # one input to a 2 -> 3 linear layer
      >>> w, g = jnp.ones((2, 3)), x.T @ jnp.ones((1, 3))  # G = x u^T
      >>> tx = dgd(0.1)
      >>> u, _ = tx.update(g, tx.init(w), w, inputs=x)
      >>> eta_ = 0.1 / (1 + 0.1 * 5.0)  # eta / (1 + eta ||x||^2)
      >>> paper = (jnp.eye(2) - eta_ * x.T @ x) @ w - eta_ * g
      >>> bool(jnp.allclose(w + u, paper))
      True

    References:
      Paper §2 row "DGD".
    """
    _validate.check_alias_args("dgd", learning_rate, weight_decay)
    return optax.chain(
        scale_by_dgd(learning_rate),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
