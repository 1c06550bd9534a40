"""Optimizers by name: optax aliases, the deep optimizers of `nested_jax.optim`, any factory.

Every optimizer gets the same learning-rate schedule (linear warmup, then cosine,
linear or constant) and, first in the chain, global-norm gradient clipping.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import jax
import optax

from nested_jax.models.config import fail

# Deep optimizers from the colleague-owned `nested_jax.optim` (imported on first use).
NESTED_OPTIMIZERS = ("m3", "delta_momentum", "deep_momentum")


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
    """Weight decay on matrices only, not on norm scales or biases."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _muon_dimensions(params: Any) -> Any:
    """Muon orthogonalizes hidden matrices; the embedding/LM head and vectors go to Adam."""

    def dims(path, p):
        if p.ndim == 2 and "embed" not in jax.tree_util.keystr(path):
            return optax.contrib.MuonDimensionNumbers()
        return None

    return jax.tree_util.tree_map_with_path(dims, params)


def _ns_dimensions(params: Any) -> Any:
    """Newton-Schulz optimizers (M3) orthogonalize hidden matrices, as Muon does: the tied
    embedding/LM head and vectors get None (M3's update without the orthogonalization)."""
    from nested_jax.optim import DimensionNumbers

    def dims(path, p):
        if p.ndim >= 2 and "embed" not in jax.tree_util.keystr(path):
            return DimensionNumbers(p.ndim - 2, p.ndim - 1)
        return None

    return jax.tree_util.tree_map_with_path(dims, params)


def _nested_optimizer(name: str) -> Callable[..., optax.GradientTransformation]:
    try:
        module = importlib.import_module("nested_jax.optim")
    except ImportError as e:
        raise ValueError(f"optim.name={name!r} needs nested_jax.optim, which failed to import "
                         f"({e}); use adamw or muon meanwhile") from e
    factory = getattr(module, name, None)
    if factory is None:
        fail("optim.name", name, "nested_jax.optim has no such optimizer yet; use adamw or muon")
    return factory


# Factory arguments that carry an OptimConfig field (the rest are structural: masks, dims).
_FIELD_OF = {"b1": "b1", "b2": "b2", "eps": "eps", "weight_decay": "weight_decay",
             "momentum": "b1", "beta": "b1", "adam_b1": "b1", "adam_b2": "b2",
             "adam_weight_decay": "weight_decay"}
_SHARED_FIELDS = ("b1", "b2", "eps", "weight_decay")


def _check_used(cfg: Any, used: set[str]) -> None:
    """A shared field set away from its default that this optimizer does not take is an error
    (it used to be dropped silently, e.g. optim.b1 under m3), naming the way to reach the
    optimizer's own parameters."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for field in _SHARED_FIELDS:
        value = getattr(cfg, field)
        if field not in used and field not in cfg.kwargs and value != defaults[field]:
            fail(f"optim.{field}", value, f"optim.name={cfg.name!r} does not take it; leave it at "
                 f"{defaults[field]} and pass the optimizer's own arguments through optim.kwargs "
                 f"(e.g. --set optim.kwargs='{{\"<argument>\": ...}}')")


def _call(factory: Callable, lr: optax.Schedule, cfg: Any, **defaults: Any):
    """factory(learning_rate=lr, **defaults it accepts, **cfg.kwargs); a shared OptimConfig
    field the factory does not take is refused when set (``_check_used``)."""
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepted = {}
    kwargs = {k: v for k, v in defaults.items() if k in accepted}
    _check_used(cfg, {_FIELD_OF[k] for k in kwargs if k in _FIELD_OF})
    kwargs.update(cfg.kwargs)
    return factory(learning_rate=lr, **kwargs)


def build(cfg: Any, total_steps: int) -> optax.GradientTransformation:
    """The optax transformation for an `OptimConfig`."""
    lr = schedule(cfg, total_steps)
    common = dict(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                  mask=decay_mask)
    name = cfg.name
    if name in ("adamw", "lion", "adafactor", "lamb", "lars", "adan"):
        tx = _call(getattr(optax, name), lr, cfg, **common)
    elif name == "adam":
        tx = _call(optax.adam, lr, cfg, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif name == "sgd":
        tx = _call(optax.sgd, lr, cfg, momentum=cfg.b1)
    elif name == "muon":
        tx = _call(optax.contrib.muon, lr, cfg, beta=cfg.b1, adam_b1=cfg.b1, adam_b2=cfg.b2,
                   eps=cfg.eps, weight_decay=cfg.weight_decay, weight_decay_mask=decay_mask,
                   adam_weight_decay=cfg.weight_decay,
                   muon_weight_dimension_numbers=_muon_dimensions)
    elif name in NESTED_OPTIMIZERS:
        factory = _nested_optimizer(name)
        tx = _call(factory, lr, cfg, weight_decay=cfg.weight_decay, weight_decay_mask=decay_mask,
                   weight_dimension_numbers=_ns_dimensions)
    elif ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"optim.name={name!r}: cannot import {attr} from {module}") from e
        tx = _call(factory, lr, cfg)
    elif callable(getattr(optax, name, None)):
        tx = _call(getattr(optax, name), lr, cfg, **common)
    else:
        fail("optim.name", name, "unknown; use adamw, adam, lion, sgd, muon, m3, delta_momentum, "
             "deep_momentum, another optax alias, or package.module:factory")
    if cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx
