r"""M3, multi-scale momentum Muon (paper Algorithm 1): Adam + Muon + CMS.

Algorithm 1 as printed, for lower-frequency iteration ``k`` and step ``t``:

* slow (once per chunk of ``f`` steps, from the *previous* chunk's gradients):
  ``M2 += beta3 * sum_{i in chunk k-1} g_i``, ``O2 = NS_T(M2)``;
* fast (every step): ``M1 += beta1 g_t``, ``V += beta2 g_t^2``,
  ``O1 = NS_T(M1)``;
* ``theta -= eta (O1 + alpha O2) / sqrt(V + eps)``.

The paper publishes no defaults. Ours, and why:

* ``precondition="before_ns"`` (default): divide by ``sqrt(V + eps)`` *before*
  Newton–Schulz, ``theta -= eta (NS_T(M1 / D) + alpha NS_T(M2 / D))`` with
  ``D = sqrt(V + eps)`` (for ``M2``, the ``D`` of its chunk boundary). As
  printed (``"after_ns"``), a scale-free orthogonal matrix is divided by
  per-coordinate gradient scales: where a coordinate's gradients are ~0 (an
  embedding row of a token not in the batch, a zero entry of a target) while
  Newton–Schulz mixes a non-zero value into it, the step is up to
  ``eta / sqrt(eps) = 1e4 eta``, and as the gradients vanish near a minimum
  the steps grow without bound: on optax's matrix targets
  (``tests/optim/test_optim_optax_battery.py``) it did not converge at any
  learning rate from 1e-1 to 3e-4. Orthogonalizing Adam's direction
  ``M / sqrt(V)`` instead keeps every step's spectral norm below
  ``~1.2 (1 + alpha)``, as Muon's; for tensors that skip Newton–Schulz
  (vectors) the two orders differ only in the ``D`` used for ``M2``. In the
  trainer's small-model comparison (``experiments/results/
  train_optim_compare.md``: transformer/tiny, 200 steps, seeds 0 and 1, the
  best lr inside each grid) the best held-out loss was 2.203 [2.194, 2.212]
  nats/byte (lr 3e-2) with this order against 2.922 [2.914, 2.930] (lr 1e-1)
  with Algorithm 1's; Muon's was 2.106.
* ``moments="ema"`` (default): ``M1 = beta1 M1 + (1-beta1) g``, ``V = beta2 V +
  (1-beta2) g^2`` (debiased), ``M2 = beta3 M2 + (1-beta3) mean_chunk(g)``.
  The printed cumulative sums never forget, so ``O1`` would point along the
  sum of *all* past gradients; exponential forgetting is what every momentum
  method of the paper's §2 uses. ``moments="cumulative"`` is Algorithm 1
  as printed. Since NS is scale invariant, ``(1-beta)`` factors only matter
  for ``V``.
* ``beta1 = 0.95``: Muon's momentum, since the fast path is Muon's.
* ``beta2 = 0.999``: Adam's second moment.
* ``every = 100`` (``f``): the slow chunk of the community reimplementation,
  and the order of CMS's lowest frequencies; long enough that the slow memory
  sees a different timescale than ``M1`` (horizon ~20 steps at 0.95).
* ``beta3 = 0.9``: the slow memory averages ~10 chunks (~1000 steps).
* ``alpha = 1``: slow and fast directions have equal weight; both are
  (near-)orthogonal matrices of the same scale, so 1 is the neutral choice.
* ``ns_steps = 5`` with Muon's coefficients: Muon's tested setting.
* ``eps = 1e-8`` inside the square root, as printed.

Verbatim Algorithm 1 is ``moments="cumulative", precondition="after_ns"``
(tested against a loop transcription of it, as is the default).

State: 5 param-sized buffers (``M1, V, M2``, the cached ``O2`` -- ``M2`` only
changes at chunk boundaries, so its Newton–Schulz is computed once per chunk,
under ``lax.cond`` -- and the running sum of the current chunk).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nested_jax.optim import _common, _validate
from nested_jax.optim.newton_schulz import (
    MUON_NS_COEFFS,
    WeightDimensionNumbers,
    _check_ns_args,
    newton_schulz_tree,
    resolve_dimension_numbers,
)

MOMENTS = ("ema", "cumulative")
PRECONDITION = ("before_ns", "after_ns")


class M3State(NamedTuple):
    """State of :func:`scale_by_m3`; every buffer is like params."""

    count: jax.Array  # shape=(), dtype=int32: steps taken.
    m1: optax.Updates  # like params, dtype=accumulator_dtype or the params': fast momentum.
    v: optax.Updates  # like params, dtype of the params: second moment.
    m2: optax.Updates  # like params, dtype=accumulator_dtype or the params': slow momentum.
    o2: optax.Updates  # like params, dtype of the params: NS_T(m2 / D) (NS_T(m2) with
    #                    "after_ns"), fixed within a chunk.
    chunk: optax.Updates  # like params, dtype=accumulator_dtype or the params': sum of
    #                       the current chunk's gradients.


def scale_by_m3(
    beta1: float = 0.95,
    beta2: float = 0.999,
    beta3: float = 0.9,
    alpha: float = 1.0,
    eps: float = 1e-8,
    *,
    every: int = 100,
    ns_steps: int = 5,
    ns_coeffs: Any = MUON_NS_COEFFS,
    ns_eps: float = 1e-8,
    moments: str = "ema",
    precondition: str = "before_ns",
    weight_dimension_numbers: WeightDimensionNumbers = None,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Multi-scale momentum Muon (Algorithm 1), direction only.

    .. math::
      u_t = \mathrm{NS}_T(M_1 / D_t) + \alpha\, \mathrm{NS}_T(M_2 / D_s),
      \qquad D = \sqrt{V + \epsilon}

    with ``M2`` refreshed every ``every`` steps from the previous chunk's
    gradients, at step ``s`` (``precondition="after_ns"``: Algorithm 1's
    ``(NS_T(M1) + alpha NS_T(M2)) / D_t``; module docstring: moments, order and
    defaults).

    Args:
      beta1: fast momentum (decay for ``"ema"``, write weight for ``"cumulative"``).
      beta2: second moment (same two readings).
      beta3: slow momentum (same two readings).
      alpha: weight of the slow direction, ``>= 0``.
      eps: inside the square root, ``>= 0``.
      every: slow chunk length ``f`` (injectable: it only enters the step's arithmetic).
      ns_steps: Newton–Schulz steps ``T`` (injectable: a traced count runs a ``fori_loop``).
      ns_coeffs: Newton–Schulz coefficients.
      ns_eps: epsilon of the Newton–Schulz normalization.
      moments: ``"ema"`` or ``"cumulative"`` (Algorithm 1's sums).
      precondition: ``"before_ns"`` (orthogonalize ``M / sqrt(V + eps)``) or
        ``"after_ns"`` (Algorithm 1's order, unbounded steps where ``V`` ~ 0).
      weight_dimension_numbers: which axes Newton–Schulz treats as the matrix, see
        :func:`scale_by_newton_schulz`; ``None`` is :func:`matrix_dimension_numbers`:
        the last two axes of a tensor of rank >= 2 (stacked ``[L, D, F]``: per
        layer); rank < 2 tensors skip Newton–Schulz and get
        ``(M1 + alpha M2) / sqrt(V + eps)``, an Adam-like step.
      accumulator_dtype: dtype of ``m1``, ``m2`` and ``chunk``.

    Returns:
      An ``optax.GradientTransformation`` with :class:`M3State`.

    Example:
      >>> import jax.numpy as jnp
      >>> from nested_jax.optim import scale_by_m3
      >>> tx = scale_by_m3(every=2)
      >>> state = tx.init({'w': jnp.zeros((2, 3))})
      >>> for _ in range(3):
      ...   u, state = tx.update({'w': jnp.ones((2, 3))}, state)
      >>> bool(jnp.any(state.o2['w'] != 0))  # the slow memory was written at step 3
      True

    References:
      Paper §2, Algorithm 1 (M3).
    """
    where = "scale_by_m3"
    for name, val in (("beta1", beta1), ("beta2", beta2), ("beta3", beta3)):
        _validate.check_scalar(where, name, val, low=0.0, high=1.0, fix="Use a value in [0, 1].")
    _validate.check_scalar(
        where, "alpha", alpha, low=0.0, fix="Use e.g. 1.0; 0 disables the slow path."
    )
    _validate.check_scalar(where, "eps", eps, low=0.0, fix="Use e.g. 1e-8.")
    # A traced chunk length (inject_hyperparams) works as well: it is only arithmetic.
    chunk_len = _validate.check_int(where, "every", every, low=1)
    chunk_len = every if chunk_len is None else chunk_len
    steps = _check_ns_args(where, ns_coeffs, ns_steps, ns_eps)
    _validate.check_choice(where, "moments", moments, MOMENTS)
    _validate.check_choice(where, "precondition", precondition, PRECONDITION)
    after = precondition == "after_ns"
    acc_dtype = None if accumulator_dtype is None else jnp.dtype(accumulator_dtype)
    ema = moments == "ema"

    def ns(tree):
        return newton_schulz_tree(
            where, tree, weight_dimension_numbers, ns_coeffs=ns_coeffs, ns_steps=steps, eps=ns_eps
        )

    def init_fn(params):
        if _validate.all_arrays(params):
            resolve_dimension_numbers(where, weight_dimension_numbers, params)
        acc = lambda: _common.zeros_like(params, acc_dtype)
        return M3State(
            count=jnp.zeros([], jnp.int32),
            m1=acc(),
            v=_common.zeros_like(params),
            m2=acc(),
            o2=_common.zeros_like(params),
            chunk=acc(),
        )

    def update_fn(updates, state, params=None):
        del params
        _validate.check_like(
            where,
            "updates",
            updates,
            "state.m1",
            state.m1,
            "Initialize the optimizer with params of the same structure as the gradients.",
        )
        count = _common.safe_increment(state.count)

        # Second moment first: both levels divide by its D = sqrt(V + eps).
        if ema:
            v = jax.tree.map(lambda s, g: beta2 * s + (1 - beta2) * (g * g), state.v, updates)
            v_hat = jax.tree.map(lambda s: s / _common.debias(beta2, count, s.dtype), v)
        else:
            v = jax.tree.map(lambda s, g: s + beta2 * (g * g), state.v, updates)
            v_hat = v
        d = jax.tree.map(lambda s: jnp.sqrt(s + eps), v_hat)

        # Slow level: at the first step of chunk k (k >= 1), fold in chunk k-1.
        def refresh(m2, chunk):
            if ema:
                m2 = jax.tree.map(lambda m, c: beta3 * m + (1 - beta3) * (c / chunk_len), m2, chunk)
            else:
                m2 = jax.tree.map(lambda m, c: m + beta3 * c, m2, chunk)
            m2 = _common.cast_like(m2, state.m2)
            o2 = ns(m2 if after else jax.tree.map(jnp.divide, m2, d))
            return m2, _common.cast_like(o2, state.o2), _common.zeros_like(chunk)

        boundary = (state.count > 0) & (state.count % chunk_len == 0)
        m2, o2, chunk = jax.lax.cond(
            boundary, refresh, lambda m2, c: (m2, state.o2, c), state.m2, state.chunk
        )
        chunk = _common.cast_like(jax.tree.map(lambda c, g: c + g, chunk, updates), state.chunk)

        # Fast level.
        if ema:
            m1 = jax.tree.map(lambda m, g: beta1 * m + (1 - beta1) * g, state.m1, updates)
        else:
            m1 = jax.tree.map(lambda m, g: m + beta1 * g, state.m1, updates)
        m1 = _common.cast_like(m1, state.m1)
        if after:
            out = jax.tree.map(lambda a, b, s: (a + alpha * b) / s, ns(m1), o2, d)
        else:
            out = jax.tree.map(lambda a, b: a + alpha * b, ns(jax.tree.map(jnp.divide, m1, d)), o2)
        return _common.cast_like(out, updates), M3State(
            count=count, m1=m1, v=_common.cast_like(v, state.v), m2=m2, o2=o2, chunk=chunk
        )

    return optax.GradientTransformation(init_fn, update_fn)


def m3(
    learning_rate: optax.ScalarOrSchedule,
    beta1: float = 0.95,
    beta2: float = 0.999,
    beta3: float = 0.9,
    alpha: float = 1.0,
    eps: float = 1e-8,
    *,
    every: int = 100,
    ns_steps: int = 5,
    ns_coeffs: Any = MUON_NS_COEFFS,
    moments: str = "ema",
    precondition: str = "before_ns",
    weight_dimension_numbers: WeightDimensionNumbers = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""M3 with weight decay and learning rate.

    .. math::
      \theta_t = \theta_{t-1} - \eta_t \left(
        \mathrm{NS}_T(M_1 / D_t) + \alpha\,\mathrm{NS}_T(M_2 / D_s)
        + \lambda \theta_{t-1} \right)

    (see :func:`scale_by_m3` for ``D`` and Algorithm 1's order).

    Args:
      learning_rate: a float or an optax schedule.
      beta1: fast momentum.
      beta2: second moment.
      beta3: slow momentum.
      alpha: weight of the slow direction.
      eps: epsilon inside the square root.
      every: slow chunk length (injectable).
      ns_steps: Newton–Schulz steps (injectable).
      ns_coeffs: Newton–Schulz coefficients.
      moments: ``"ema"`` or ``"cumulative"``.
      precondition: ``"before_ns"`` or ``"after_ns"`` (Algorithm 1's order).
      weight_dimension_numbers: see :func:`scale_by_m3`.
      weight_decay: decoupled weight decay, scaled by the learning rate.
      weight_decay_mask: optax mask for the decay.
      accumulator_dtype: dtype of the momenta.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from nested_jax.optim import m3
      >>> tx = m3(optax.cosine_decay_schedule(1e-3, 1000), every=10)
      >>> params = {'w': jnp.zeros((2, 3))}
      >>> u, state = tx.update({'w': jnp.ones((2, 3))}, tx.init(params), params)
      >>> u['w'].shape, u['w'].dtype
      ((2, 3), dtype('float32'))

    References:
      Paper §2, Algorithm 1.
    """
    _validate.check_alias_args("m3", learning_rate, weight_decay)
    return optax.chain(
        scale_by_m3(
            beta1,
            beta2,
            beta3,
            alpha,
            eps,
            every=every,
            ns_steps=ns_steps,
            ns_coeffs=ns_coeffs,
            moments=moments,
            precondition=precondition,
            weight_dimension_numbers=weight_dimension_numbers,
            accumulator_dtype=accumulator_dtype,
        ),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
