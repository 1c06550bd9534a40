"""Frozen, validated model configs and the size-preset machinery.

Every model config subclasses `ModelConfig`: a frozen, keyword-only dataclass
validated in `__post_init__`. A bad value fails when the config is built, with a
`ValueError` that names the field and says how to fix it. Presets are a class-level
table `name -> Preset(nominal_params, fields)`; `nominal_params` is the size the
preset is named for, and tests hold the real count within 10% of it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from nested_jax.config_checks import check_choice, check_divisible, check_positive, fail

DTYPES = ("float32", "bfloat16", "float16")
# How a model runs a linear memory: the kernels' ``impl`` on the engine's "pallas" path, or "xla"
# for the model's own ``memory_path`` (TitansLM's memory, Hope's M_memory).
MEMORY_IMPLS = ("auto", "pallas", "interpret", "xla")


def memory_route(linear: bool, impl: str, path: str) -> dict:
    """``memory.apply`` keywords for a model's memory: the kernels for a linear one unless
    ``impl="xla"``, else the model's ``memory_path`` (no kernel runs an MLP memory)."""
    if linear and impl != "xla":
        return dict(path="pallas", impl=impl)
    return dict(path=path)


PRESET_ORDER = ("tiny", "small", "125M", "340M", "760M", "1.3B")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named size: the parameter count it is named for and the fields it sets."""

    nominal_params: float
    fields: Mapping[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Fields every language model shares.

    Attributes:
        vocab_size: V, the number of token ids (the trainer sets it from the tokenizer).
        d_model: D, the residual width.
        n_layers: L, the number of blocks.
        n_heads: H, the number of attention (or memory) heads.
        max_seq_len: the longest sequence the model accepts; the decode cache length.
        dtype: compute dtype of activations ("bfloat16" for mixed precision).
        param_dtype: dtype the parameters are stored in.
        scan_layers: run the blocks' forward pass as one ``lax.scan`` over their stacked
            parameters instead of a Python loop (models/lm.py).  Same numbers, same parameter
            tree; XLA then compiles one block instead of L, which is what keeps a deep model's
            compile time (and a TPU pod's) in minutes.  Decoding keeps the loop.
    """

    vocab_size: int = 32_000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    max_seq_len: int = 2048
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False

    PRESETS: ClassVar[Mapping[str, Preset]] = {}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field. Subclasses extend this."""
        check_positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len")
        check_divisible(self, "d_model", "n_heads")
        if not isinstance(self.scan_layers, bool):
            fail("scan_layers", self.scan_layers, "must be a bool")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) != "float64":
                check_choice(self, name, DTYPES)
            elif not jax.config.jax_enable_x64:  # else jnp would quietly compute in float32
                fail(name, "float64", f"is for the exactness tests and needs "
                     f"jax.config.update('jax_enable_x64', True); else use one of {list(DTYPES)}")

    # ---- presets -------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> ModelConfig:
        """Build the preset `preset`, then apply `overrides` (field names are checked)."""
        if preset not in cls.PRESETS:
            fail("preset", preset, f"unknown for {cls.__name__}; choose one of {list(cls.PRESETS)}")
        fields = dict(cls.PRESETS[preset].fields)
        cls.check_field_names(overrides)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def check_field_names(cls, names: Mapping[str, Any] | tuple[str, ...]) -> None:
        known = {f.name for f in dataclasses.fields(cls)}
        for name in names:
            if name not in known:
                fail(name, names[name] if isinstance(names, Mapping) else None,
                     f"{cls.__name__} has no such field; valid fields: {sorted(known)}")

    def replace(self, **overrides: Any) -> ModelConfig:
        """`dataclasses.replace` that names an unknown field instead of a TypeError."""
        self.check_field_names(overrides)
        return dataclasses.replace(self, **overrides)

    # ---- derived -------------------------------------------------------------------------------

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def seq_len_multiples(self) -> dict[str, int]:
        """Fields a training sequence length must be a multiple of: every int field named *chunk*.

        Chunked models (Hope, Titans, CMS) get the check for free by naming their chunk
        sizes e.g. `chunk_memory`; override for anything subtler.
        """
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if "chunk" in f.name and type(value) is int and value > 0:
                out[f.name] = value
        return out

    def alignment_fields(self) -> dict[str, Any]:
        """Every chunk size and CMS period of the model (name -> value): where its chunked levels'
        chunks start.  Int fields named *chunk* and ``cms_periods``; override for others."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if "chunk" in f.name and type(getattr(self, f.name)) is int}
        if getattr(self, "cms_periods", None):
            out["cms_periods"] = tuple(self.cms_periods)
        return out

    def document_alignment(self) -> int:
        """R, where a document of a packed row may start: the lcm of ``alignment_fields`` (1
        without chunked levels).  A document starting at a multiple of R has its chunks where
        they are when it runs alone (models/documents.py; docs/decisions.md #23)."""
        sizes = [x for v in self.alignment_fields().values()
                 for x in (v if isinstance(v, tuple) else (v,))]
        return math.lcm(1, *sizes)

    def alignment_reason(self) -> str:
        """``document_alignment``'s provenance for error messages, e.g. 'lcm of chunk_size=8'."""
        fields = self.alignment_fields()
        return "lcm of " + ", ".join(f"{k}={v}" for k, v in fields.items()) if fields else ""

    def check_seq_len(self, seq_len: int, field: str = "seq_len") -> None:
        """Raise ValueError unless a training sequence of `seq_len` tokens fits this model."""
        if seq_len > self.max_seq_len:
            fail(field, seq_len, f"exceeds the model's max_seq_len={self.max_seq_len}; "
                 f"lower {field} or raise model.max_seq_len")
        for name, multiple in self.seq_len_multiples().items():
            if seq_len % multiple:
                nearest = max(multiple, seq_len - seq_len % multiple)
                fail(field, seq_len, f"must be a multiple of model.{name}={multiple} (chunked "
                     f"memory); use {nearest} or change model.{name}")
