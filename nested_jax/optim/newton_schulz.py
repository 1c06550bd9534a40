"""Newton–Schulz orthogonalization: the non-linear output sigma of a memory.

The paper (§1-2) reads Newton–Schulz as gradient descent on
``||O^T O - I||^2`` started from the memory's output, and the update
``W += sigma(m(u))`` with ``sigma = NS`` and a linear momentum ``m`` as Muon.
:func:`scale_by_newton_schulz` is that sigma as a stateless transform that
chains after any memory of this package; :func:`newton_schulz_momentum` is the
linear-momentum case and matches ``optax.contrib.muon`` (tested).

Sharding (FSDP). ``orthogonalize`` is matmuls, transposes and reshapes only,
so it runs on sharded arrays without an explicit gather, and its result is
sharded like its input (tested on 8 devices). The collectives XLA inserts,
read from the compiled HLO for a ``1024 x 256`` matrix on 8 devices:

* sharded along the *long* side (the usual FSDP layout of a weight sharded
  on its larger axis, and of a stacked ``[L, D, F]`` weight sharded on ``D >
  F``): the Gram matrix ``X X^T`` contracts over the sharded axis, so each
  step all-reduces one ``min(m, n)^2`` matrix (plus one scalar for the
  Frobenius norm); nothing is gathered;
* sharded along the *short* side: XLA all-gathers the matrix and the step's
  intermediates (3 gathers per step). Shard the larger axis, or keep such
  tensors out of Newton–Schulz, if that traffic matters.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nested_jax.optim import _validate
from nested_jax.optim._common import compute_dtype, sharded_like

MUON_NS_COEFFS = (3.4445, -4.7750, 2.0315)
"""Quintic coefficients of Muon (Jordan 2024), as in ``optax.contrib.muon``."""


class DimensionNumbers(NamedTuple):
    """Which axes of a tensor form the matrix that Newton–Schulz orthogonalizes.

    The matrix is ``(prod of reduction axes) x (prod of output axes)``; every
    other axis is a batch axis and each index of it is orthogonalized on its
    own. A stacked ``[L, D, F]`` weight uses ``DimensionNumbers(1, 2)``: ``L``
    matrices of shape ``D x F``. Same meaning as ``optax.contrib``'s
    ``MuonDimensionNumbers``, which is accepted too.
    """

    reduction_axis: int | tuple[int, ...] = 0
    output_axis: int | tuple[int, ...] = 1


WeightDimensionNumbers = DimensionNumbers | Any | Callable[[optax.Params], Any] | None


def is_dimension_numbers(x: Any) -> bool:
    """A ``DimensionNumbers`` or an ``optax.contrib.MuonDimensionNumbers``."""
    return isinstance(x, tuple) and hasattr(x, "reduction_axis") and hasattr(x, "output_axis")


def matrix_dimension_numbers(params: Any) -> Any:
    """The default rule: orthogonalize the last two axes of every tensor of rank >= 2.

    Leading axes are batch axes (``[L, D, F]`` gives ``L`` matrices ``D x F``,
    as ``optax.contrib.MuonDimensionNumbers(1, 2)`` would); tensors of rank < 2
    get ``None``: they pass through Newton–Schulz unchanged, so the memory's own
    update reaches them (Muon's momentum for :func:`newton_schulz_momentum`, the
    Adam-like ratio for M3). ``weight_dimension_numbers=None`` means this rule;
    pass a tree or another function to change it (e.g. to keep an embedding out).

    >>> import jax.numpy as jnp
    >>> from nested_jax.optim import matrix_dimension_numbers
    >>> matrix_dimension_numbers({'w': jnp.zeros((4, 8, 16)), 'b': jnp.zeros(16)})
    {'b': None, 'w': DimensionNumbers(reduction_axis=1, output_axis=2)}
    """
    return jax.tree.map(
        lambda x: DimensionNumbers(x.ndim - 2, x.ndim - 1) if jnp.ndim(x) >= 2 else None,
        params,
    )


def _axes(spec: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    spec = (spec,) if isinstance(spec, int) else tuple(spec)
    for ax in spec:
        if not -ndim <= ax < ndim:
            raise ValueError(
                f"orthogonalize: axis {ax} of dimension numbers is out of range for a tensor of "
                f"rank {ndim}."
            )
    return tuple(ax % ndim for ax in spec)


def _matrix_view(shape: tuple[int, ...], dn: Any):
    """Permutation and shapes that view a tensor as a batch of matrices."""
    ndim = len(shape)
    red, out = _axes(dn.reduction_axis, ndim), _axes(dn.output_axis, ndim)
    if not red or not out or set(red) & set(out):
        raise ValueError(
            f"orthogonalize: reduction axes {red} and output axes {out} must be non-empty and "
            f"disjoint (tensor shape {shape})."
        )
    batch = tuple(a for a in range(ndim) if a not in red + out)
    perm = batch + red + out
    inv = tuple(sorted(range(ndim), key=lambda i: perm[i]))
    size = lambda axes: math.prod(shape[a] for a in axes)
    flat = (size(batch), size(red), size(out))
    unflat = tuple(shape[a] for a in perm)
    return perm, inv, flat, unflat, (size(red), size(out))


def _ns_step(x: jax.Array, c: jax.Array) -> jax.Array:
    a = x @ x.T
    b = c[1] * a + c[2] * a @ a
    return c[0] * x + b @ x


def _ns_matrix(x: jax.Array, coeffs: jax.Array, steps: Any, eps: Any) -> jax.Array:
    """Newton–Schulz on one matrix (Frobenius-normalized start), as optax does.

    ``coeffs`` is an ``(n, 3)`` table (one row per step) or one ``(3,)`` row applied
    ``steps`` times; ``steps`` is traced under ``optax.inject_hyperparams`` (it turns
    every int into an array), then the steps run in a ``fori_loop`` of that length.
    """
    transposed = x.shape[0] > x.shape[1]
    if transposed:  # f(X) = f(X^T)^T; the Gram matrix of the short side is cheaper
        x = x.T
    x = x / (jnp.linalg.norm(x, ord="fro") + eps)
    if coeffs.ndim == 2:
        for c in coeffs:
            x = _ns_step(x, c)
    elif isinstance(steps, int):
        for _ in range(steps):
            x = _ns_step(x, coeffs)
    else:
        x = jax.lax.fori_loop(0, steps, lambda _, y: _ns_step(y, coeffs), x)
    return x.T if transposed else x


def _coeff_table(ns_coeffs: Any) -> jax.Array:
    table = jnp.asarray(ns_coeffs)
    if table.shape == (3,) or (table.ndim == 2 and table.shape[-1] == 3):
        return table
    raise ValueError(
        f"newton_schulz: `ns_coeffs` must have shape (3,) or (n, 3), got {table.shape}."
    )


def orthogonalize(
    x: jax.Array,
    *,
    ns_coeffs: Any = MUON_NS_COEFFS,
    ns_steps: int = 5,
    eps: float = 1e-8,
    dimension_numbers: DimensionNumbers | None = None,
) -> jax.Array:
    r"""Approximately orthogonalizes a matrix (or a batch of them) by Newton–Schulz.

    With ``X_0 = G / (||G||_F + eps)`` (transposed to the wide orientation), each
    step applies the odd polynomial

    .. math::
      X_{k+1} = a X_k + (b A_k + c A_k^2) X_k, \qquad A_k = X_k X_k^T,

    which drives the singular values of ``X`` towards 1 (to about [0.7, 1.2]
    with Muon's coefficients), so the result is close to ``U V^T`` for
    ``G = U S V^T``. Computed in at least float32 and cast back.

    Args:
      x: a matrix, or any tensor together with ``dimension_numbers``.
      ns_coeffs: ``(a, b, c)``, or an ``(n, 3)`` table with one row per step (then
        ``ns_steps`` is ignored).
      ns_steps: number of steps (an int; a traced one runs a ``fori_loop``).
      eps: added to the Frobenius norm before dividing.
      dimension_numbers: the matrix axes of a tensor that is not a matrix; other
        axes are batch axes.

    Returns:
      An array of the shape and dtype of ``x``.

    Raises:
      ValueError: ``x`` is not a matrix and no ``dimension_numbers`` are given.

    Example:
      >>> import jax.numpy as jnp
      >>> from nested_jax.optim import orthogonalize
      >>> o = orthogonalize(jnp.array([[3.0, 0.0], [0.0, 0.5]]), ns_steps=10)
      >>> bool(jnp.all(jnp.abs(jnp.diag(o) - 1.0) < 0.35))
      True

    References:
      Paper §1 (Newton–Schulz as GD on ``||O^T O - I||^2``); Jordan, Muon (2024).
    """
    if dimension_numbers is None:
        if x.ndim != 2:
            raise ValueError(
                f"orthogonalize: got a tensor of shape {x.shape}; Newton–Schulz needs a matrix. "
                "Pass dimension_numbers=DimensionNumbers(reduction_axis, output_axis) to say "
                "which axes form the matrix (e.g. DimensionNumbers(1, 2) for a stacked [L, D, F] "
                "weight)."
            )
        dimension_numbers = DimensionNumbers(0, 1)
    if not is_dimension_numbers(dimension_numbers):
        raise ValueError(
            f"orthogonalize: `dimension_numbers` must be a DimensionNumbers, got "
            f"{dimension_numbers!r}."
        )
    steps = _check_ns_args("orthogonalize", ns_coeffs, ns_steps, eps)
    perm, inv, flat, unflat, _ = _matrix_view(x.shape, dimension_numbers)
    cdt = compute_dtype(x.dtype)
    coeffs = _coeff_table(ns_coeffs).astype(cdt)

    def ns(x):
        mats = x.astype(cdt).transpose(perm).reshape(flat)
        out = jax.vmap(lambda m: _ns_matrix(m, coeffs, steps, eps))(mats)
        return out.reshape(unflat).transpose(inv).astype(x.dtype)

    return sharded_like(ns, x)


def resolve_dimension_numbers(where: str, weight_dimension_numbers: Any, updates: Any) -> list:
    """One ``DimensionNumbers`` or ``None`` (pass through) per leaf of ``updates``."""
    leaves = jax.tree.leaves(updates, is_leaf=_validate.is_masked)
    wdn = weight_dimension_numbers
    if wdn is None:
        wdn = matrix_dimension_numbers
    if is_dimension_numbers(wdn):
        return [None if _validate.is_masked(x) else wdn for x in leaves]
    if callable(wdn):
        wdn = wdn(updates)
    fix = (
        "Give one DimensionNumbers (orthogonalize) or None (pass through) per parameter, "
        "or a function of the params returning such a tree, e.g. "
        "nested_jax.optim.matrix_dimension_numbers."
    )
    dims = _validate.leaves_aligned(
        where,
        "weight_dimension_numbers",
        wdn,
        updates,
        is_other_leaf=lambda v: v is None or is_dimension_numbers(v),
        fix=fix,
    )
    return [None if _validate.is_masked(d) else d for d in dims]


def _width_scale(x: jax.Array, dn: Any) -> jax.Array:
    """Muon's width scaling ``sqrt(max(1, fan_out / fan_in))``."""
    _, _, _, _, (fan_in, fan_out) = _matrix_view(x.shape, dn)
    return x * jnp.sqrt(jnp.maximum(1.0, fan_out / fan_in)).astype(x.dtype)


def newton_schulz_tree(
    where: str,
    tree: Any,
    weight_dimension_numbers: Any,
    *,
    ns_coeffs: Any,
    ns_steps: int,
    eps: Any,
    width_scaling: bool = False,
) -> Any:
    """Applies :func:`orthogonalize` to each leaf per its dimension numbers."""
    dims = resolve_dimension_numbers(where, weight_dimension_numbers, tree)
    leaves, treedef = jax.tree.flatten(tree, is_leaf=_validate.is_masked)
    out = []
    for leaf, dn in zip(leaves, dims, strict=True):
        if dn is None or _validate.is_masked(leaf):
            out.append(leaf)
            continue
        o = orthogonalize(
            leaf, ns_coeffs=ns_coeffs, ns_steps=ns_steps, eps=eps, dimension_numbers=dn
        )
        out.append(_width_scale(o, dn) if width_scaling else o)
    return jax.tree.unflatten(treedef, out)


def _check_ns_args(where: str, ns_coeffs: Any, ns_steps: Any, eps: Any) -> Any:
    """The step count: an int, or the traced one that inject_hyperparams passes."""
    steps = _validate.check_int(where, "ns_steps", ns_steps, low=1)
    _coeff_table(ns_coeffs)
    _validate.check_scalar(where, "eps", eps, low=0.0, fix="Use a small value such as 1e-8.")
    return ns_steps if steps is None else steps


def scale_by_newton_schulz(
    ns_coeffs: Any = MUON_NS_COEFFS,
    ns_steps: int = 5,
    eps: float = 1e-8,
    *,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    width_scaling: bool = False,
) -> optax.GradientTransformation:
    r"""The non-linear output ``sigma = Newton–Schulz`` of a memory (stateless).

    .. math::
      u \mapsto \mathrm{NS}_T(u) \approx U V^T, \qquad u = U S V^T,

    applied per matrix. Chain it after a memory: ``optax.chain(memory,
    scale_by_newton_schulz(), ...)`` realizes the paper's ``W += sigma(m(u))``.

    Args:
      ns_coeffs: polynomial coefficients, see :func:`orthogonalize`.
      ns_steps: Newton–Schulz steps ``T`` (injectable: a traced count runs a
        ``fori_loop``).
      eps: added to the Frobenius norm of each matrix.
      weight_dimension_numbers: ``None`` (the default rule,
        :func:`matrix_dimension_numbers`: the last two axes of every tensor of
        rank >= 2, rank < 2 passes through), one :class:`DimensionNumbers` for
        all, a tree of ``DimensionNumbers``/``None`` (``None`` = pass through
        unchanged), or a function of the params returning that tree (a function
        is a callable, so ``optax.inject_hyperparams`` needs it in
        ``static_args``; the default needs nothing).
      width_scaling: multiply by ``sqrt(max(1, fan_out / fan_in))`` as Muon does.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from nested_jax.optim import scale_by_momentum_memory, scale_by_newton_schulz
      >>> tx = optax.chain(scale_by_momentum_memory(0.9), scale_by_newton_schulz())
      >>> params = {'w': jnp.ones((3, 4))}
      >>> u, _ = tx.update({'w': jnp.eye(3, 4)}, tx.init(params))
      >>> u['w'].shape
      (3, 4)

    References:
      Paper §2 "nonlinear output": ``W += sigma(m(u))``, sigma = Newton–Schulz.
    """
    where = "scale_by_newton_schulz"
    steps = _check_ns_args(where, ns_coeffs, ns_steps, eps)

    def init_fn(params):
        if _validate.all_arrays(params):  # fail at init, not at the first step
            resolve_dimension_numbers(where, weight_dimension_numbers, params)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        out = newton_schulz_tree(
            where,
            updates,
            weight_dimension_numbers,
            ns_coeffs=ns_coeffs,
            ns_steps=steps,
            eps=eps,
            width_scaling=width_scaling,
        )
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


def newton_schulz_momentum(
    learning_rate: optax.ScalarOrSchedule,
    beta: float = 0.95,
    ns_coeffs: Any = MUON_NS_COEFFS,
    ns_steps: int = 5,
    eps: float = 1e-8,
    *,
    nesterov: bool = True,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    width_scaling: bool = True,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Linear momentum memory with the Newton–Schulz output: Muon (paper §2).

    .. math::
      \mu_t = \beta \mu_{t-1} + (1 - \beta) g_t, \qquad
      W_t = W_{t-1} - \eta_t \left( s\, \mathrm{NS}_T(\hat\mu_t) + \lambda W_{t-1} \right)

    with the debiased Nesterov read-out ``mu_hat`` and width scale
    ``s = sqrt(max(1, fan_out / fan_in))``, exactly as ``optax.contrib.muon``
    treats its matrix parameters (tested equal). Parameters of any rank work
    out of the box, by the rule of :func:`matrix_dimension_numbers`: stacked
    ``[L, D, F]`` weights are orthogonalized per matrix (``optax.contrib.muon``
    would send them to Adam), and vectors and scalars get the momentum without
    Newton–Schulz (Muon gives them Adam).

    Args:
      learning_rate: a float or an optax schedule.
      beta: momentum decay (EMA).
      ns_coeffs: Newton–Schulz coefficients.
      ns_steps: Newton–Schulz steps (injectable, see :func:`scale_by_newton_schulz`).
      eps: epsilon of the Frobenius normalization.
      nesterov: Nesterov read-out.
      weight_dimension_numbers: see :func:`scale_by_newton_schulz`.
      width_scaling: Muon's ``sqrt(max(1, fan_out / fan_in))``.
      weight_decay: decoupled weight decay, scaled by the learning rate.
      weight_decay_mask: optax mask for the decay.
      accumulator_dtype: dtype of the momentum.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from nested_jax.optim import newton_schulz_momentum
      >>> p, g = {'w': jnp.ones((4, 3))}, {'w': jnp.arange(12.0).reshape(4, 3)}
      >>> a, _ = newton_schulz_momentum(0.02).update(g, newton_schulz_momentum(0.02).init(p), p)
      >>> b, _ = optax.contrib.muon(0.02).update(g, optax.contrib.muon(0.02).init(p), p)
      >>> bool(jnp.allclose(a['w'], b['w'], atol=1e-6))
      True

    References:
      Paper §2 row "nonlinear output" (sigma = Newton–Schulz, linear m => Muon).
    """
    _validate.check_alias_args("newton_schulz_momentum", learning_rate, weight_decay)
    _validate.check_scalar(
        "newton_schulz_momentum",
        "beta",
        beta,
        low=0.0,
        high=1.0,
        high_open=True,
        fix="It is the momentum's EMA decay; use e.g. 0.95.",
    )
    from nested_jax.optim.momentum_memory import scale_by_momentum_memory

    return optax.chain(
        scale_by_momentum_memory(
            beta, 1 - beta, nesterov=nesterov, debias=True, accumulator_dtype=accumulator_dtype
        ),
        scale_by_newton_schulz(
            ns_coeffs,
            ns_steps,
            eps,
            weight_dimension_numbers=weight_dimension_numbers,
            width_scaling=width_scaling,
        ),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
