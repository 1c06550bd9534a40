"""The training config: frozen dataclasses, `--set key=value` overrides, JSON round trip.

A run is fully described by one `TrainConfig` (plus the working directory). It is
written to `WORKDIR/config.json`; `eval`, `generate` and a resumed `train` read it
back. Python config files in big_vision's style return one from `get_config(variant)`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import pathlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from nested_jax.config_checks import check_positive, fail


def _finite(obj: Any, prefix: str) -> None:
    """Every float field must be a finite number (nan and inf pass `x <= 0` checks)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            fail(prefix + f.name, value, "must be a finite number")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the tokens come from.

    Attributes:
      path: text file, directory, JSONL, ArrayRecord, glob, a token shard directory
        (`nested-jax prepare-data`), or builtin:wikipedia.
      tokenizer: byte | mistral | sentencepiece:PATH | sentencepiece-train:VOCAB.
      seq_len: T, tokens per training sequence.
      batch_size: sequences per optimizer step, over all processes and microbatches.
      eval_fraction: share of documents held out for perplexity (0 disables evaluation).
      text_field: the JSON field holding the text in JSONL / ArrayRecord records.
      num_threads: grain reader threads per process.
      decode_errors: "strict" refuses a file that is not UTF-8 text (naming the file and
        the byte offset); "replace" decodes it lossily (U+FFFD for bad bytes, NULs dropped).
      pack_documents: rows of whole documents, each starting at a multiple of the model's
        `document_alignment()`, with segment ids (0 = padding), so the model runs every
        document as if alone and no memory carries one into the next (docs/decisions.md #23).
        False: documents are concatenated and split into rows (no padding).
    """

    path: str = "builtin:wikipedia"
    tokenizer: str = "byte"
    seq_len: int = 256
    batch_size: int = 16
    eval_fraction: float = 0.01
    text_field: str = "text"
    num_threads: int = 2
    decode_errors: str = "strict"
    pack_documents: bool = False

    def __post_init__(self):
        _finite(self, "data.")
        check_positive(self, "seq_len", "batch_size", "num_threads", prefix="data.")
        if not isinstance(self.pack_documents, bool):
            fail("data.pack_documents", self.pack_documents, "must be true or false")
        if self.decode_errors not in ("strict", "replace"):
            fail("data.decode_errors", self.decode_errors, "must be strict or replace")
        if not 0.0 <= self.eval_fraction < 1.0:
            fail("data.eval_fraction", self.eval_fraction, "must be in [0, 1)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The optimizer, its schedule and the gradient pipeline.

    The optimizer is a registered config (nested_jax/train/optimizers.py, `OPTIMIZERS`)
    whose fields are exactly its arguments: `b1`, `b2`, `eps` and `weight_decay` fill the
    fields of that name, `kwargs` the others. A field the optimizer does not have is
    refused when set (`b1` under m3, `kwargs.beta4`), naming what it takes.

    Attributes:
      name: adamw | adam | lion | sgd | adafactor | lamb | lars | adan | muon | m3 |
        delta_momentum | deep_momentum, any other optax alias by name, or
        "package.module:factory" (called as factory(learning_rate=schedule, **kwargs)).
      learning_rate: peak learning rate.
      schedule: cosine | linear | constant, after a linear warmup.
      warmup_steps: steps of linear warmup from 0.
      min_lr_ratio: final learning rate as a fraction of the peak (cosine, linear).
      weight_decay: decoupled weight decay (matrices only) for optimizers that take it.
      b1, b2, eps: Adam-family moments (sgd: b1 is the momentum; muon: b1 is also its
        momentum), for optimizers that take them.
      grad_clip: clip the global gradient norm to this (0 disables).
      grad_accum: microbatches per step (the batch is split, gradients averaged).
      kwargs: the optimizer's other arguments, e.g. {"beta3": 0.8, "every": 50} for m3.
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _finite(self, "optim.")
        check_positive(self, "grad_accum", prefix="optim.")
        if self.schedule not in ("cosine", "linear", "constant"):
            fail("optim.schedule", self.schedule, "must be cosine, linear or constant")
        if self.learning_rate <= 0:
            fail("optim.learning_rate", self.learning_rate, "must be positive")
        if self.warmup_steps < 0:
            fail("optim.warmup_steps", self.warmup_steps, "must be >= 0")
        if self.grad_clip < 0:
            fail("optim.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh shape over axes (data, fsdp, tensor); -1 takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            fail("mesh", sizes, "axis sizes must be positive, with at most one -1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run.

    Attributes:
      model, preset: a registered model name and one of its size presets.
      model_overrides: model config fields to change (`--set model.d_model=256`).
      steps: total optimizer steps (a resumed run continues to this).
      seed: parameter-init and data-order seed.
      bf16: compute in bfloat16 (parameters and optimizer state stay float32).
      log_every, eval_every, checkpoint_every: cadences in steps (0 disables periodic
        evaluation/checkpoints; the run still evaluates and saves at start and end).
      eval_batches: held-out batches per evaluation.
      keep_checkpoints: how many recent checkpoints to keep.
      async_checkpoints: write checkpoints in a background thread.
      max_bad_steps: abort after this many consecutive rejected updates (the guard: a
        NaN/Inf loss, gradient or result, or a parameter-norm jump; see train/step.py).
      max_norm_jump: reject an update that changes the global parameter norm by more than
        this factor, up or down (0 disables; legitimate steps change it by ~1%).
      peak_flops: one device's peak FLOP/s for MFU (0: look it up from the device kind).
    """

    model: str = "transformer"
    preset: str = "small"
    model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    steps: int = 1000
    seed: int = 0
    bf16: bool = False
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    max_bad_steps: int = 5
    max_norm_jump: float = 2.0
    peak_flops: float = 0.0

    def __post_init__(self):
        _finite(self, "")
        if self.max_norm_jump != 0 and self.max_norm_jump <= 1:
            fail("max_norm_jump", self.max_norm_jump, "must be > 1 (or 0 to disable)")
        if self.peak_flops < 0:
            fail("peak_flops", self.peak_flops, "must be >= 0 (0: look it up)")
        check_positive(self, "steps", "log_every", "eval_batches", "keep_checkpoints",
                       "max_bad_steps")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                fail(name, getattr(self, name), "must be >= 0 (0 disables)")
        if self.data.batch_size % self.optim.grad_accum:
            fail("data.batch_size", self.data.batch_size,
                 f"must be divisible by optim.grad_accum={self.optim.grad_accum}")

    # ---- serialization ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        return _build(cls, d, "")

    @classmethod
    def load(cls, path: str | pathlib.Path) -> TrainConfig:
        from etils import epath

        try:
            d = json.loads(epath.Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} is not a whole JSON config ({e}); a run killed while writing it or a full "
                "disk cuts it short. Every checkpoint records the "
                f"run's config: delete {path} and run again to use the newest checkpoint's"
            ) from e
        return cls.from_dict(d)


# Fields a resumed run may change; anything else must match the saved run.
RESUMABLE_FIELDS = ("steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                    "keep_checkpoints", "async_checkpoints", "max_bad_steps", "max_norm_jump",
                    "peak_flops", "data.path", "data.num_threads", "data.decode_errors",
                    "mesh.data", "mesh.fsdp", "mesh.tensor")
# Fields a resumed run may also change when asked explicitly (`train --reschedule`): the
# learning-rate schedule is a function of the step count, not part of the optimizer state.
SCHEDULE_FIELDS = ("optim.learning_rate", "optim.schedule", "optim.warmup_steps",
                   "optim.min_lr_ratio")


def _build(cls, d: Mapping[str, Any], prefix: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            fail(prefix + key, value, f"unknown field; valid: {sorted(names)}")
        sub = typing.get_type_hints(cls)[key]
        if dataclasses.is_dataclass(sub) and isinstance(value, Mapping):
            value = _build(sub, value, f"{prefix}{key}.")
        kwargs[key] = value
    return cls(**kwargs)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and k not in ("model_overrides", "kwargs"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(a: TrainConfig, b: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ as saved: compared after the JSON round trip config.json
    makes, so a tuple in `optim.kwargs` or `model_overrides` matches the list it reads back."""
    fa, fb = (flatten(json.loads(json.dumps(c.to_dict()))) for c in (a, b))
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


# ---- --set key=value --------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A Python literal if it parses as one (3e-4, True, None, [1, 2]), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            fail(key, value, "expects true or false")
    elif hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            fail(key, value, "expects an integer")
    elif hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            fail(key, value, "expects a number")
        value = float(value)
    elif hint is str:
        value = str(value)
    return value


def parse_assignments(assignments: Sequence[str]) -> list[tuple[str, Any]]:
    """`key=value` strings (`--set`) as (key, value) pairs: values parse as Python literals,
    else strings."""
    pairs = []
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            fail("--set", item, "expects key=value, e.g. optim.learning_rate=3e-4")
        pairs.append((key.strip(), parse_value(text.strip())))
    return pairs


def apply_overrides(cfg: TrainConfig, assignments: Sequence[str]) -> TrainConfig:
    """Apply `key=value` strings (`--set`), checked and coerced by `with_values`."""
    return with_values(cfg, parse_assignments(assignments))


def with_values(cfg: TrainConfig, pairs: Sequence[tuple[str, Any]]) -> TrainConfig:
    """Set dotted keys, e.g. ("optim.learning_rate", 3e-4); values are checked and coerced.

    `model.FIELD` goes to `model_overrides` (checked against the model config later),
    `optim.kwargs.NAME` to the optimizer's extra arguments.
    """
    d = cfg.to_dict()
    for key, value in pairs:
        parts = key.split(".")
        if parts[0] == "model" and len(parts) == 2:
            # model fields are checked by the model config later, so spell booleans as the
            # train config's own fields take them (bf16=true): true / false, any case
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            d["model_overrides"] = {**d["model_overrides"], parts[1]: value}
            continue
        if parts[:2] == ["optim", "kwargs"] and len(parts) == 3:
            d["optim"]["kwargs"] = {**d["optim"]["kwargs"], parts[2]: value}
            continue
        node, cls = d, TrainConfig
        for i, part in enumerate(parts):
            names = {f.name for f in dataclasses.fields(cls)}
            if part not in names:
                fail(key, value, f"unknown config key {'.'.join(parts[:i + 1])!r}; valid at this "
                     f"level: {sorted(names)}")
            hint = typing.get_type_hints(cls)[part]
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(hint):
                    fail(key, value, f"is a group; set one of its fields, e.g. {key}.<field>=...")
                node[part] = _coerce(value, hint, key)
            else:
                if not dataclasses.is_dataclass(hint):
                    fail(key, value, f"{'.'.join(parts[:i + 1])!r} is not a group")
                node, cls = node[part], hint
    return TrainConfig.from_dict(d)


def from_file(spec: str) -> TrainConfig:
    """Load `PATH.py[:VARIANT]` (or a packaged config NAME[:VARIANT], see train/configs/).

    The file defines `get_config(variant: str | None)` returning a TrainConfig or a dict.
    """
    path, _, variant = spec.partition(":")
    file = pathlib.Path(path)
    if not file.exists():
        packaged = pathlib.Path(__file__).parent / "configs" / f"{path}.py"
        if not packaged.exists():
            known = sorted(p.stem for p in packaged.parent.glob("*.py") if p.stem != "__init__")
            fail("--config", spec, f"no such file, nor a packaged config (packaged: {known})")
        file = packaged
    module_spec = importlib.util.spec_from_file_location(f"_nested_jax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        fail("--config", spec, "the file must define get_config(variant)")
    cfg = module.get_config(variant or None)
    return cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg)
