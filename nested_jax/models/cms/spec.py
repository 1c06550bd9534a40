"""CMS hyper-parameters: the resolved per-block ``CMSSpec``, its validation, and the
``CMSFields`` mixin that gives a model config its ``cms_*`` fields."""

from __future__ import annotations

import dataclasses
from typing import Any

from nested_jax.config_checks import fail

VARIANTS = ("sequential", "independent", "nested")
SIGNALS = ("teach", "reconstruction")
TEACH_AT = ("output", "input")
DECAY_TO = ("zero", "init")


def _per_level(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


@dataclasses.dataclass(frozen=True, kw_only=True)
class CMSSpec:
    """Resolved CMS hyper-parameters of one block (validated when built).

    Attributes:
      d_model: D, the residual width.
      periods: C^(l) per level, in tokens of the context flow (decisions.md #12), chain order.
      d_ff: SwiGLU width per level (a single int is used for every level).
      lr: inner learning-rate scale lr_l per level (0 = static level; a float for all).
      variant: "sequential" | "independent" | "nested".
      signal: "teach" | "reconstruction" (inner objective, decisions.md #13).
      teach_at: "output" (delta at each level's output, the default) or "input" (once per block
        at the CMS input, shared by the levels: cheaper).
      momentum: constant inner momentum beta (0 = plain GD, the fast path).
      retention: alpha, weight-decay gate of the inner rule (1 = none).
      decay_to: what retention < 1 decays the fast weights toward: "zero" (weight decay, the
        rule's own form) or "init" (the level's initial, meta-learned weights: only the
        in-context change decays, decisions.md #28).
      teach_stop_grad: the earlier form of the teach signal's outer gradient (decisions.md
        #13 as first written): outer gradients skip delta's dependence on the level's weights.
        Not the gradient of the forward, and it grows with the context (decisions.md #28).
      first_order: the first-order outer gradient (decisions.md #29): every chunk step is
        differentiated through its inputs only, not through the boundary weights it is taken at
        nor through the teach target delta.  The forward is unchanged; the outer gradient stays
        bounded where the exact one grows exponentially with the context (a periodic text makes
        each chunk step full-batch GD past its stability limit: ``lm_long_bf16.md``).
      norm_eps: epsilon of each level's RMSNorm.
      stop_grad: engine ablation (decisions.md #4): outer gradients skip the inner updates.
      remat_chunks: chunks per level state the backward pass stores (``memory.apply``'s
        ``remat``): 1 stores one state (the level's weights) per chunk, T / C of them; g > 1
        stores one per g chunks and recomputes a group's, T / (C g) + g states for one more
        forward of each level.  Memory only: the values are the same.
    """

    d_model: int
    periods: tuple[int, ...] = (16, 64, 256)
    d_ff: int | tuple[int, ...] = 512  # one value for every level, or one per level
    lr: float | tuple[float, ...] = 1e-2
    variant: str = "sequential"
    signal: str = "teach"
    teach_at: str = "output"
    momentum: float = 0.0
    retention: float = 1.0
    decay_to: str = "zero"
    teach_stop_grad: bool = False
    first_order: bool = False
    norm_eps: float = 1e-6
    stop_grad: bool = False
    remat_chunks: int = 1

    def __post_init__(self):
        validate_spec(self, prefix="")
        if not isinstance(self.d_model, int) or self.d_model <= 0:
            fail("d_model", self.d_model, "must be a positive int")
        n = len(self.periods)
        object.__setattr__(self, "d_ff", _per_level(self.d_ff, n))
        object.__setattr__(self, "lr", tuple(float(x) for x in _per_level(self.lr, n)))
        if min(self.d_ff) <= 0:
            fail("d_ff", self.d_ff, "level widths must be positive ints")

    @property
    def n_levels(self) -> int:
        return len(self.periods)

    def level_chunk(self, i: int) -> int:
        return self.periods[i]


def validate_spec(spec: Any, prefix: str = "cms_", max_seq_len: int | None = None) -> None:
    """Errors name the field (``prefix`` + name) and the fix."""
    name = lambda f: prefix + f
    periods = spec.periods
    if not isinstance(periods, tuple) or not periods:
        fail(name("periods"), periods, "must be a non-empty tuple of positive ints, e.g. (16, 64)")
    for p in periods:
        if not isinstance(p, int) or isinstance(p, bool) or p <= 0:
            fail(name("periods"), periods, "every period must be a positive int (tokens)")
    if max_seq_len is not None and max(periods) > max_seq_len:
        fail(name("periods"), periods, f"a period above max_seq_len={max_seq_len} never updates "
             "in context; lower it or raise max_seq_len")
    n = len(periods)
    for f in ("d_ff", "lr"):
        v = getattr(spec, f)
        if isinstance(v, tuple) and len(v) != n:
            fail(name(f), v, f"needs one value per level ({n} levels, from {name('periods')}) "
                 "or a single value")
    for d in _per_level(spec.d_ff, n):
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            fail(name("d_ff"), spec.d_ff, "level widths must be ints >= 0 (0 = automatic)")
    for lr in _per_level(spec.lr, n):
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0:
            fail(name("lr"), spec.lr, "inner learning rates must be floats >= 0 (0 = static)")
    r = spec.remat_chunks
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        fail(name("remat_chunks"), r, "must be an int >= 1 (chunks per stored state; 1 = one "
             "per chunk, e.g. 16 for a period-16 level at T = 4096)")
    if spec.variant not in VARIANTS:
        fail(name("variant"), spec.variant, f"must be one of {list(VARIANTS)}")
    if spec.signal not in SIGNALS:
        fail(name("signal"), spec.signal, f"must be one of {list(SIGNALS)}")
    if spec.teach_at not in TEACH_AT:
        fail(name("teach_at"), spec.teach_at, f"must be one of {list(TEACH_AT)}")
    if not 0.0 <= spec.momentum < 1.0:
        fail(name("momentum"), spec.momentum, "must lie in [0, 1) (0 = plain GD)")
    if not 0.0 < spec.retention <= 1.0:
        fail(name("retention"), spec.retention, "must lie in (0, 1] (1 = no weight decay)")
    for flag in ("teach_stop_grad", "first_order"):
        if not isinstance(getattr(spec, flag), bool):
            fail(name(flag), getattr(spec, flag), "must be True or False")
    if spec.decay_to not in DECAY_TO:
        fail(name("decay_to"), spec.decay_to, f"must be one of {list(DECAY_TO)}")
    if spec.decay_to == "init" and spec.variant == "nested":
        fail(name("decay_to"), spec.decay_to, "the nested variant hands weights between levels; "
             "use decay_to='zero' or the sequential / independent variant")
    if spec.variant == "nested":
        for a, b in zip(periods, periods[1:], strict=False):
            if not (a > b and a % b == 0):
                fail(name("periods"), periods, "the nested variant needs decreasing periods, each "
                     "dividing the previous (e.g. (256, 64, 16))")
        if len(set(_per_level(spec.d_ff, n))) != 1:
            fail(name("d_ff"), spec.d_ff, "the nested variant shares one MLP across levels; "
                 "give one width")
        if any(lr > 1.0 for lr in _per_level(spec.lr, n)[:-1]):
            fail(name("lr"), spec.lr, "nested meta-steps lambda of the slower levels must be <= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CMSFields:
    """Config mixin: the ``cms_*`` fields of a model with CMS blocks (see ``CMSSpec``).

    Use as ``class MyConfig(CMSFields, ModelConfig)`` and call ``self.validate_cms()`` from
    ``validate``.  ``cms_d_ff=0`` gives every level ``default_d_ff // n_levels`` rounded up to a
    multiple of 64 (parameter-matched to one MLP of width ``default_d_ff``).
    """

    cms_periods: tuple[int, ...] = (16, 64, 256)
    cms_d_ff: int | tuple[int, ...] = 0
    cms_lr: float | tuple[float, ...] = 1e-2
    cms_variant: str = "sequential"
    cms_signal: str = "teach"
    cms_teach_at: str = "output"
    cms_momentum: float = 0.0
    cms_retention: float = 1.0
    cms_decay_to: str = "zero"
    cms_teach_stop_grad: bool = False
    cms_first_order: bool = False
    cms_stop_grad: bool = False
    cms_remat_chunks: int = 1

    @property
    def cms_fields(self) -> dict[str, Any]:
        return dict(periods=self.cms_periods, d_ff=self.cms_d_ff, lr=self.cms_lr,
                    variant=self.cms_variant, signal=self.cms_signal, teach_at=self.cms_teach_at,
                    momentum=self.cms_momentum, retention=self.cms_retention,
                    decay_to=self.cms_decay_to, teach_stop_grad=self.cms_teach_stop_grad,
                    first_order=self.cms_first_order, remat_chunks=self.cms_remat_chunks)

    def validate_cms(self) -> None:
        view = type("_View", (), self.cms_fields)
        validate_spec(view, prefix="cms_", max_seq_len=getattr(self, "max_seq_len", None))

    def cms_spec(self, default_d_ff: int) -> CMSSpec:
        n = len(self.cms_periods)
        auto = max(64, -(-default_d_ff // n // 64) * 64)
        d_ff = tuple(d or auto for d in _per_level(self.cms_d_ff, n))
        if self.cms_variant == "nested":
            d_ff = (d_ff[0],) * n
        return CMSSpec(d_model=self.d_model, periods=self.cms_periods, d_ff=d_ff,
                       lr=self.cms_lr,
                       variant=self.cms_variant, signal=self.cms_signal,
                       teach_at=self.cms_teach_at, momentum=self.cms_momentum,
                       retention=self.cms_retention, decay_to=self.cms_decay_to,
                       teach_stop_grad=self.cms_teach_stop_grad,
                       first_order=self.cms_first_order,
                       norm_eps=getattr(self, "norm_eps", 1e-6), stop_grad=self.cms_stop_grad,
                       remat_chunks=self.cms_remat_chunks)
