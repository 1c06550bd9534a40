"""Flax NNX language models behind one API.

    model = nested_jax.models.create("transformer", "small", rngs=nnx.Rngs(0), vocab_size=256)
    logits_BxTxV = model(tokens_BxT)                      # float32
    logits_BxTxV = model(tokens_BxT, segment_ids=seg_BxT) # packed rows: documents kept apart
    state = model.init_state(batch_size)
    logits_BxV, state = model.decode_step(state, tokens_B)

Packed rows (``documents.py``, ``packing.pack_aligned``): documents start at multiples of
``config.document_alignment()``.

A model file adds itself with `@register(name, ConfigClass)` (see `registry.py`);
`create` finds files added to this package without any edit here.
"""

from nested_jax.models import transformer as _transformer  # noqa: F401  (registers "transformer")
from nested_jax.models.config import ModelConfig, Preset
from nested_jax.models.registry import (
    abstract_model,
    count_params,
    create,
    lookup,
    make_config,
    names,
    presets,
    register,
)

__all__ = [
    "ModelConfig",
    "Preset",
    "abstract_model",
    "count_params",
    "create",
    "lookup",
    "make_config",
    "names",
    "presets",
    "register",
]
