"""The harness model's settings (lm-eval's `--model_args key=value,...`), checked by name.

Kept apart from the lm_eval adapter so the checks run (and are tested) without lm_eval:

  workdir       the run's --workdir (required); its newest checkpoint is scored
  batch_size    requests per forward pass (default 8)
  max_length    longest input the model reads (default and maximum: the model's max_seq_len)
  max_gen_toks  default number of tokens generate_until may produce (default 256)
  freeze        memories scored with inner learning rates at 0, joined by "+"
                (self_modifying, cms; as `nested-jax eval --freeze`)
  device        a JAX device: cpu, gpu (or cuda), tpu, optionally ":N" (default: JAX's first
                device); a platform JAX does not have here falls back to that default, so
                lm-eval's own `--device` default ("cuda:0") is harmless on a TPU or CPU host
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from nested_jax.config_checks import fail

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = dict(workdir=None, batch_size=8, max_length=None, max_gen_toks=256,
                                freeze=None, device=None)
# Passed by lm-eval itself (simple_evaluate's additional config), never by the user.
HARNESS_ONLY = ("max_batch_size",)
PLATFORMS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}
EXAMPLE = "--model_args workdir=runs/demo,batch_size=8"


def positive_int(field: str, value: Any, example: str) -> int:
    """`value` (an int, or a string of digits) as a positive int, else a named error."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        fail(field, value, f"must be a positive integer (e.g. {example})")
    return value


def parse(args: Mapping[str, Any]) -> dict[str, Any]:
    """The settings with defaults filled in; unknown keys and bad values name the field."""
    unknown = sorted(k for k in args if k not in DEFAULTS and k not in HARNESS_ONLY)
    if unknown:
        fail(unknown[0], args[unknown[0]], f"unknown model_args key; nested_jax takes "
             f"{', '.join(DEFAULTS)} (e.g. {EXAMPLE})")
    out = {**DEFAULTS, **{k: v for k, v in args.items() if k in DEFAULTS}}
    if not out["workdir"]:
        fail("workdir", out["workdir"], f"required: the --workdir of a trained run "
             f"(e.g. {EXAMPLE})")
    out["workdir"] = str(out["workdir"])
    if str(out["batch_size"]).startswith("auto"):
        fail("batch_size", out["batch_size"], "nested_jax has no automatic batch size; pass "
             "a positive integer (e.g. batch_size=8)")
    out["batch_size"] = positive_int("batch_size", out["batch_size"], "batch_size=8")
    if out["max_length"] is not None:
        out["max_length"] = positive_int("max_length", out["max_length"], "max_length=2048")
    out["max_gen_toks"] = positive_int("max_gen_toks", out["max_gen_toks"], "max_gen_toks=256")
    out["freeze"] = parse_freeze(out["freeze"])
    if out["device"] is not None:
        name = str(out["device"]).partition(":")[0].lower()
        if name not in PLATFORMS and name != "auto":
            fail("device", out["device"], f"unknown; use one of {sorted(PLATFORMS)}, "
                 "optionally with :N")
    return out


def parse_freeze(value: Any) -> tuple[str, ...]:
    """"self_modifying+cms" (or a list) -> the names; checked against the model on load."""
    if value in (None, "", False):
        return ()
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value)
    return tuple(v for v in str(value).split("+") if v)


def jax_device(spec: str | None):
    """The JAX device a torch-style device string names; None: JAX's first device."""
    import jax

    if spec is None or str(spec).lower() == "auto":
        return None
    name, _, index = str(spec).partition(":")
    platform = PLATFORMS[name.lower()]
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        log.warning("device=%s: JAX has no %s backend here; using %s", spec, platform,
                    jax.devices()[0])
        return None
    i = int(index) if index.isdigit() else 0
    if i >= len(devices):
        fail("device", spec, f"JAX sees {len(devices)} {platform} device(s); pick an index "
             f"below {len(devices)}")
    return devices[i]
