"""Optimizers by name: a registry of small optimizer configs, each building its optax chain.

In levanter's style, every optimizer is one frozen dataclass registered by name
(`OPTIMIZERS`), whose fields are exactly the arguments it uses and whose
``build(learning_rate)`` returns the optax transformation. The user-facing `OptimConfig`
(nested_jax/train/config.py) picks one with ``optim.name`` and fills it
(`optimizer_config`):

* the shared fields ``optim.b1``, ``b2``, ``eps`` and ``weight_decay`` fill the fields of
  the same name; one set away from its default that the optimizer has no field for is
  refused;
* ``optim.kwargs`` fills the other fields; an unknown key, or a value of the wrong type,
  is refused. Every error names the field and the fix.

Besides the registered names, any other optax alias works by name (its arguments are its
fields: the shared ones from `OptimConfig`, the rest from ``optim.kwargs``), and so does
``package.module:factory``, called as ``factory(learning_rate=schedule, **optim.kwargs)``
(its arguments all come from ``optim.kwargs``). docs/training.md lists them.

Every optimizer gets the same learning-rate schedule (linear warmup, then cosine, linear
or constant) and, first in the chain, global-norm gradient clipping.
"""

import dataclasses
import functools
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import jax
import jax.numpy as jnp
import optax

import nested_jax.optim as deep
from nested_jax.config_checks import fail

# OptimConfig fields that fill an optimizer field of the same name.
SHARED_FIELDS = ("b1", "b2", "eps", "weight_decay")

# A field holding a dtype name ("bfloat16"), checked with jnp.dtype.
Dtype = Annotated[str | None, "dtype"]


def schedule(cfg: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup to cfg.learning_rate, then cosine/linear decay to min_lr_ratio, or flat."""
    peak, warmup = cfg.learning_rate, min(cfg.warmup_steps, max(total_steps - 1, 0))
    final = peak * cfg.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, warmup + decay_steps, final)
    if cfg.schedule == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)),
             optax.linear_schedule(peak, final, decay_steps)], [warmup])
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
        [warmup])


def decay_mask(params: Any) -> Any:
    """Weight decay on tensors of 2+ axes: matrices (and stacks of them), but also the
    self-modifying layer's [3, H] gate biases and [3, H, K] gate read-outs and the depthwise
    convolution filters (``VECTOR_STACKS``); norm scales and 1-axis biases are not decayed.
    Every language-model result in experiments/results was trained with this mask."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


# Parameters of 2+ axes that are stacks of vectors, not linear maps: depthwise causal
# convolution filters ([width, (groups,) channels]) and the self-modifying layer's gate
# read-outs and biases ([3, H, K], [3, H]).  Orthogonalizing the update of a [3, H] bias gives
# it a spectral norm of ~1 a step: under M3 and Muon this blew HopeLM up in warmup (train loss
# 8.3 -> 11.4 by step 48, gradient norms 1e4-1e9; experiments/lm/notes/optimizers.md).
# tests/train/test_optimizers.py checks that every model's parameters of 2+ axes are either
# named here or matrices, so a new parameter needs a decision here.
VECTOR_STACKS = frozenset({"conv", "gate_w", "gate_b"})


def path_names(path: Any) -> set[str]:
    """The names along a parameter's path (dict keys, attribute names): what `ns_skip` and
    `VECTOR_STACKS` match."""
    return {str(getattr(k, "key", getattr(k, "name", ""))) for k in path}


def hidden_matrix(path: Any, p: Any) -> bool:
    """Whether Newton-Schulz orthogonalizes ``p``'s update: a linear map inside the network
    (its last two axes the map's input and output, leading axes a stack: heads, memories),
    not the tied embedding / LM head, not a vector or a stack of vectors."""
    return (p.ndim >= 2 and "embed" not in jax.tree_util.keystr(path)
            and not path_names(path) & VECTOR_STACKS)


def _dimensions(params: Any, make: Any, skip: tuple[str, ...] = ()) -> Any:
    """``make(reduction_axis, output_axis)`` for each hidden matrix (its last two axes), None
    for every other tensor and for those whose path names one of ``skip`` (``ns_skip``)."""
    if isinstance(skip, str) or not all(isinstance(n, str) for n in skip):
        fail("optim.kwargs.ns_skip", skip, "expects a tuple of names, e.g. ('levels',)")
    # optax.masked hands the Newton-Schulz branch the params with the others as MaskedNodes
    # (no leaves): count their paths too, or a skipped name would look unknown there.
    paths = jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    unknown = set(skip) - set().union(*(path_names(path) for path, _ in paths))
    if unknown:
        fail("optim.kwargs.ns_skip", tuple(skip), f"{sorted(unknown)} names no parameter; use "
             "names from the model's parameter paths, e.g. ('levels',) for the CMS levels")
    return jax.tree_util.tree_map_with_path(
        lambda path, p: (make(p.ndim - 2, p.ndim - 1)
                         if hidden_matrix(path, p) and not path_names(path) & set(skip) else None),
        params)


def _muon_dimensions(params: Any, skip: tuple[str, ...] = ()) -> Any:
    """Muon orthogonalizes the hidden matrices (``hidden_matrix``; a stack of them matrix by
    matrix) but those named in ``skip``; the embedding/LM head and vectors go to its Adam."""
    return _dimensions(params, optax.contrib.MuonDimensionNumbers, skip)


def _ns_dimensions(params: Any, skip: tuple[str, ...] = ()) -> Any:
    """Newton-Schulz optimizers (M3) orthogonalize the hidden matrices, as Muon does: the tied
    embedding/LM head, vectors and ``skip`` get None (M3's update without the
    orthogonalization)."""
    return _dimensions(params, deep.DimensionNumbers, skip)


# ---- the registry ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """An optimizer's arguments as fields; ``build`` makes its optax transformation.

    Shared fields (`SHARED_FIELDS`) default to `OptimConfig`'s defaults, the others to the
    optimizer's own (both tested).
    """

    def build(self, learning_rate: optax.Schedule) -> optax.GradientTransformation:
        raise NotImplementedError


OPTIMIZERS: dict[str, type[OptimizerConfig]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a frozen, keyword-only dataclass and register it as `name`."""

    def add(cls: type) -> type:
        if name in OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} is registered twice")
        OPTIMIZERS[name] = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
        return OPTIMIZERS[name]

    return add


@register("adamw")
class AdamW(OptimizerConfig):
    """optax.adamw, decay on matrices only."""

    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    eps_root: float = 0.0
    nesterov: bool = False
    mu_dtype: Dtype = None

    def build(self, learning_rate):
        return optax.adamw(learning_rate, b1=self.b1, b2=self.b2, eps=self.eps,
                           eps_root=self.eps_root, mu_dtype=self.mu_dtype,
                           weight_decay=self.weight_decay, mask=decay_mask,
                           nesterov=self.nesterov)


@register("adam")
class Adam(OptimizerConfig):
    """optax.adam (no weight decay: use adamw)."""

    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    eps_root: float = 0.0
    nesterov: bool = False
    mu_dtype: Dtype = None

    def build(self, learning_rate):
        return optax.adam(learning_rate, b1=self.b1, b2=self.b2, eps=self.eps,
                          eps_root=self.eps_root, mu_dtype=self.mu_dtype, nesterov=self.nesterov)


@register("lion")
class Lion(OptimizerConfig):
    """optax.lion, decay on matrices only."""

    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1

    def build(self, learning_rate):
        return optax.lion(learning_rate, b1=self.b1, b2=self.b2, weight_decay=self.weight_decay,
                          mask=decay_mask)


@register("sgd")
class SGD(OptimizerConfig):
    """optax.sgd; ``b1`` is the momentum (0 for none)."""

    b1: float = 0.9
    nesterov: bool = False

    def build(self, learning_rate):
        return optax.sgd(learning_rate, momentum=self.b1, nesterov=self.nesterov)


@register("adafactor")
class Adafactor(OptimizerConfig):
    """optax.adafactor; its own decay is ``weight_decay_rate`` (matrices only)."""

    eps: float = 1e-8
    decay_rate: float = 0.8
    clipping_threshold: float | None = 1.0
    momentum: float | None = None
    factored: bool = True
    min_dim_size_to_factor: int = 128
    multiply_by_parameter_scale: bool = True
    weight_decay_rate: float | None = None

    def build(self, learning_rate):
        return optax.adafactor(
            learning_rate, min_dim_size_to_factor=self.min_dim_size_to_factor,
            decay_rate=self.decay_rate,
            multiply_by_parameter_scale=self.multiply_by_parameter_scale,
            clipping_threshold=self.clipping_threshold, momentum=self.momentum,
            weight_decay_rate=self.weight_decay_rate, eps=self.eps, factored=self.factored,
            weight_decay_mask=decay_mask)


@register("lamb")
class Lamb(OptimizerConfig):
    """optax.lamb, decay on matrices only."""

    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    eps_root: float = 0.0

    def build(self, learning_rate):
        return optax.lamb(learning_rate, b1=self.b1, b2=self.b2, eps=self.eps,
                          eps_root=self.eps_root, weight_decay=self.weight_decay, mask=decay_mask)


@register("lars")
class Lars(OptimizerConfig):
    """optax.lars, decay on matrices only (optax's default decays every parameter)."""

    eps: float = 1e-8
    weight_decay: float = 0.1
    trust_coefficient: float = 0.001
    momentum: float = 0.9
    nesterov: bool = False

    def build(self, learning_rate):
        return optax.lars(learning_rate, weight_decay=self.weight_decay,
                          weight_decay_mask=decay_mask, trust_coefficient=self.trust_coefficient,
                          eps=self.eps, momentum=self.momentum, nesterov=self.nesterov)


@register("adan")
class Adan(OptimizerConfig):
    """optax.adan, decay on matrices only."""

    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    b3: float = 0.99
    eps_root: float = 1e-8

    def build(self, learning_rate):
        return optax.adan(learning_rate, b1=self.b1, b2=self.b2, b3=self.b3, eps=self.eps,
                          eps_root=self.eps_root, weight_decay=self.weight_decay, mask=decay_mask)


@register("muon")
class Muon(OptimizerConfig):
    """optax.contrib.muon on the hidden matrices; the embedding and vectors go to its Adam.

    ``b1`` is Muon's momentum and Adam's first moment, ``b2`` Adam's second,
    ``weight_decay`` both decays (matrices only).  ``ns_skip``: parameter-path names whose
    matrices go to the Adam too; ``('levels',)`` keeps the CMS levels' initial weights off
    Newton-Schulz, whose updates of them blow HopeLM's gradients up in warmup
    (experiments/lm/notes/optimizers.md).
    """

    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    ns_steps: int = 5
    ns_coeffs: tuple | str = deep.MUON_NS_COEFFS  # optax's default too
    nesterov: bool = True
    adaptive: bool = False
    preconditioning: str = "frobenius"
    consistent_rms: float | None = None
    adam_eps_root: float = 0.0
    mu_dtype: Dtype = None
    ns_skip: tuple = ()

    def build(self, learning_rate):
        return optax.contrib.muon(
            learning_rate, ns_coeffs=self.ns_coeffs, ns_steps=self.ns_steps, beta=self.b1,
            eps=self.eps, weight_decay=self.weight_decay, weight_decay_mask=decay_mask,
            mu_dtype=self.mu_dtype, nesterov=self.nesterov, adaptive=self.adaptive,
            preconditioning=self.preconditioning, adam_b1=self.b1, adam_b2=self.b2,
            adam_eps_root=self.adam_eps_root, adam_weight_decay=self.weight_decay,
            muon_weight_dimension_numbers=functools.partial(_muon_dimensions, skip=self.ns_skip),
            consistent_rms=self.consistent_rms)


@register("m3")
class M3(OptimizerConfig):
    """nested_jax.optim.m3 (Algorithm 1 with the readings of nested_jax/optim/m3.py); hidden
    matrices are orthogonalized, the embedding, vectors and the matrices ``ns_skip`` names
    (as Muon's) skip Newton-Schulz."""

    eps: float = 1e-8
    weight_decay: float = 0.1
    beta1: float = 0.95
    beta2: float = 0.999
    beta3: float = 0.9
    alpha: float = 1.0
    every: int = 100
    ns_steps: int = 5
    ns_coeffs: tuple = deep.MUON_NS_COEFFS
    moments: str = "ema"
    precondition: str = "before_ns"
    accumulator_dtype: Dtype = None
    ns_skip: tuple = ()

    def build(self, learning_rate):
        return deep.m3(
            learning_rate, self.beta1, self.beta2, self.beta3, self.alpha, self.eps,
            every=self.every, ns_steps=self.ns_steps, ns_coeffs=self.ns_coeffs,
            moments=self.moments, precondition=self.precondition,
            weight_dimension_numbers=functools.partial(_ns_dimensions, skip=self.ns_skip),
            weight_decay=self.weight_decay,
            weight_decay_mask=decay_mask, accumulator_dtype=self.accumulator_dtype)


@register("delta_momentum")
class DeltaMomentum(OptimizerConfig):
    """nested_jax.optim.delta_momentum, decay on matrices only."""

    weight_decay: float = 0.1
    alpha: float = 0.9
    beta: float = 1.0
    form: str = "neurips"
    axis: int | None = None
    accumulator_dtype: Dtype = None

    def build(self, learning_rate):
        return deep.delta_momentum(
            learning_rate, self.alpha, self.beta, form=self.form, axis=self.axis,
            weight_decay=self.weight_decay, weight_decay_mask=decay_mask,
            accumulator_dtype=self.accumulator_dtype)


@register("deep_momentum")
class DeepMomentum(OptimizerConfig):
    """nested_jax.optim.deep_momentum (DMGD), decay on matrices only."""

    weight_decay: float = 0.1
    alpha: float = 0.9
    eta_mlp: float = 0.01
    eta: float = 1.0
    hidden: int | None = None
    objective: str = "dot"
    seed: int = 0
    accumulator_dtype: Dtype = None

    def build(self, learning_rate):
        return deep.deep_momentum(
            learning_rate, self.alpha, self.eta_mlp, self.eta, hidden=self.hidden,
            objective=self.objective, seed=self.seed, weight_decay=self.weight_decay,
            weight_decay_mask=decay_mask, accumulator_dtype=self.accumulator_dtype)


# ---- optimizers known by their signature: other optax aliases, package.module:factory ----------


def signature_config(label: str, factory: Callable, *, fixed: Mapping[str, Any],
                     extra: Any = ()) -> type[OptimizerConfig]:
    """A config class for a factory known only by its signature: one field per argument
    (with the factory's default), less ``learning_rate`` and the ``fixed`` ones; a factory
    that takes ``**kwargs`` also gets a field for each name in ``extra``."""
    try:
        params = dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # no signature: take what is given
        params = {}
    var_keyword = not params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    specs = []
    for p in params.values():
        if (p.name == "learning_rate" or p.name in fixed
                or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)):
            continue
        if p.default is p.empty:
            specs.append((p.name, Any, dataclasses.field()))
        else:  # a factory: defaults such as arrays are not valid dataclass defaults
            specs.append((p.name, Any, dataclasses.field(default_factory=lambda d=p.default: d)))
    if var_keyword:
        known = {name for name, _, _ in specs}
        specs += [(name, Any, dataclasses.field()) for name in extra if name not in known]

    def build(self, learning_rate):
        args = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return factory(learning_rate=learning_rate, **fixed, **args)

    return dataclasses.make_dataclass(label, specs, bases=(OptimizerConfig,), frozen=True,
                                      kw_only=True, namespace={"build": build})


def _resolve(cfg: Any) -> tuple[type[OptimizerConfig], tuple[str, ...]]:
    """The config class for cfg.name and the shared OptimConfig fields that fill it."""
    name = cfg.name
    if name in OPTIMIZERS:
        cls = OPTIMIZERS[name]
    elif ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"optim.name={name!r}: cannot import {attr} from {module}") from e
        # factory(learning_rate=schedule, **optim.kwargs): nothing comes from OptimConfig.
        return signature_config(attr, factory, fixed={}, extra=cfg.kwargs), ()
    elif callable(getattr(optax, name, None)):
        factory = getattr(optax, name)
        takes_mask = "mask" in _parameters(factory)
        cls = signature_config(name, factory, fixed={"mask": decay_mask} if takes_mask else {})
    else:
        fail("optim.name", name, f"unknown; use {', '.join(OPTIMIZERS)}, another optax alias, "
             "or package.module:factory")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls, tuple(f for f in SHARED_FIELDS if f in fields)


def _parameters(factory: Callable) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}


def _takes(cls: type, shared: tuple[str, ...]) -> str:
    own = [f.name for f in dataclasses.fields(cls) if f.name not in shared]
    parts = [f"optim.{f}" for f in shared]
    parts.append(f"optim.kwargs: {', '.join(own)}" if own else "no optim.kwargs")
    return "it takes " + "; ".join(parts)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` as the field's type (ints for floats, 'true' for True), else the error."""
    dtype = typing.get_origin(hint) is Annotated and "dtype" in hint.__metadata__
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    options = (typing.get_args(hint)
               if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,))
    for t in options:
        if t is Any or (t is type(None) and value is None):
            return value
        if t is bool and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool) and t is not bool:
            continue
        if t is float and isinstance(value, int | float):
            return float(value)
        if t is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if t is tuple and isinstance(value, list | tuple):
            return tuple(tuple(v) if isinstance(v, list) else v for v in value)
        if t in (bool, int, str) and isinstance(value, t):
            if dtype:
                try:
                    jnp.dtype(value)
                except TypeError:
                    fail(key, value, "is not a dtype; use e.g. 'bfloat16' or 'float32'")
            return value
    names = " or ".join("None" if t is type(None) else getattr(t, "__name__", str(t))
                        for t in options)
    fail(key, value, f"expects {names}")


def optimizer_config(cfg: Any) -> OptimizerConfig:
    """The optimizer config that an `OptimConfig` names, filled from its fields.

    Raises ValueError, naming the field and the fix, for a shared field set away from its
    default that the optimizer does not take, an ``optim.kwargs`` key it has no field for,
    or a value of the wrong type.
    """
    cls, shared = _resolve(cfg)
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    values = {}
    for field in SHARED_FIELDS:
        value = getattr(cfg, field)
        if field in shared:
            values[field] = value
        elif value != defaults[field]:
            fail(f"optim.{field}", value, f"optim.name={cfg.name!r} does not take it; leave it at "
                 f"{defaults[field]} ({_takes(cls, shared)})")
    for key, value in cfg.kwargs.items():
        if key in shared:
            fail(f"optim.kwargs.{key}", value, f"set optim.{key} instead")
        if key not in fields:
            fix = f"optim.name={cfg.name!r} has no such argument ({_takes(cls, shared)})"
            if cfg.name in OPTIMIZERS and callable(getattr(optax, cfg.name, None)):
                fix += f"; optim.name='optax:{cfg.name}' passes any argument of the factory"
            fail(f"optim.kwargs.{key}", value, fix)
        values[key] = _coerce(f"optim.kwargs.{key}", value, hints.get(key, Any))
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        fail("optim.kwargs", dict(cfg.kwargs), f"optim.name={cfg.name!r} requires "
             f"{', '.join(missing)}; set optim.kwargs.{missing[0]}=...")
    return cls(**values)


def build(cfg: Any, total_steps: int) -> optax.GradientTransformation:
    """The optax transformation for an `OptimConfig`: clipping, then the named optimizer."""
    tx = optimizer_config(cfg).build(schedule(cfg, total_steps))
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx
