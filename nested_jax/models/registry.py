"""The model registry: name -> (config class, module class), and `create`.

A model file registers itself with one decorator line::

    @register("hope", HopeConfig)
    class HopeLM(nnx.Module):
        def __init__(self, config: HopeConfig, *, rngs: nnx.Rngs): ...

Nothing else has to change: `create("hope", ...)` imports every module of
`nested_jax.models` the first time it meets a name it does not know yet, so a new
model file is found without editing `__init__.py`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from nested_jax.models.config import ModelConfig

_REGISTRY: dict[str, tuple[type[ModelConfig], type[nnx.Module]]] = {}
_import_errors: dict[str, BaseException] = {}
_discovered = False


def register(name: str, config_cls: type[ModelConfig]) -> Callable[[type], type]:
    """Class decorator: make `create(name, ...)` build `cls(config_cls(...), rngs=...)`."""

    def wrap(cls: type) -> type:
        old = _REGISTRY.get(name)
        if old is not None and old[1].__qualname__ != cls.__qualname__:
            raise ValueError(f"model name {name!r} is already registered to {old[1].__qualname__}")
        _REGISTRY[name] = (config_cls, cls)
        return cls

    return wrap


def _discover() -> None:
    """Import every module of this package once so their `@register` lines run."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module("nested_jax.models")
    for info in pkgutil.iter_modules(package.__path__):
        try:
            importlib.import_module(f"nested_jax.models.{info.name}")
        except Exception as e:  # reported by lookup() when the name asked for is missing
            _import_errors[info.name] = e


def names() -> list[str]:
    """Every registered model name."""
    _discover()
    return sorted(_REGISTRY)


def lookup(name: str) -> tuple[type[ModelConfig], type[nnx.Module]]:
    """(config class, module class) for `name`, or a ValueError listing what exists."""
    if name not in _REGISTRY:
        _discover()
    if name not in _REGISTRY:
        broken = "".join(f"\n  nested_jax.models.{m} failed to import: {e!r}"
                         for m, e in _import_errors.items())
        raise ValueError(f"model={name!r}: unknown model; registered models are "
                         f"{sorted(_REGISTRY)}{broken}")
    return _REGISTRY[name]


def presets(name: str) -> dict[str, float]:
    """Preset name -> nominal parameter count for model `name`."""
    config_cls, _ = lookup(name)
    return {k: p.nominal_params for k, p in config_cls.PRESETS.items()}


def make_config(name: str, preset: str | ModelConfig = "tiny", **overrides: Any) -> ModelConfig:
    """The validated config of `name` at `preset` (a preset name or a config) with overrides."""
    config_cls, _ = lookup(name)
    if isinstance(preset, ModelConfig):
        if not isinstance(preset, config_cls):
            raise ValueError(f"preset: a {type(preset).__name__} was given for model {name!r}, "
                             f"which takes a {config_cls.__name__}")
        return preset.replace(**overrides)
    return config_cls.from_preset(preset, **overrides)


def create(name: str, preset: str | ModelConfig = "tiny", *, rngs: nnx.Rngs,
           **overrides: Any) -> nnx.Module:
    """Build model `name` at size `preset` (a preset name or a ready config).

    Args:
      name: a registered model name, e.g. "transformer" or "hope".
      preset: "tiny", "small", "125M", "340M", "760M", "1.3B", or a config instance.
      rngs: the `nnx.Rngs` for parameter initialization.
      **overrides: config fields to change, e.g. `vocab_size=256, dtype="bfloat16"`.

    Returns:
      An `nnx.Module` with `model(tokens_BxT) -> logits_BxTxV` (float32),
      `model.init_state(batch_size)` and `model.decode_step(state, tokens_B)`.
    """
    config = make_config(name, preset, **overrides)
    _, module_cls = lookup(name)
    return module_cls(config, rngs=rngs)


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (`nnx.Param` entries); works on `nnx.eval_shape` output."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_model(name: str, preset: str | ModelConfig = "tiny", **overrides: Any) -> nnx.Module:
    """The model with shapes only (no memory, no FLOPs): for parameter counts and shardings."""
    return nnx.eval_shape(lambda: create(name, preset, rngs=nnx.Rngs(0), **overrides))
