"""The model registry: names, presets, overrides, extension by decorator."""

import dataclasses

import jax.numpy as jnp
import pytest
from flax import nnx

from nested_jax import models
from nested_jax.models import registry
from nested_jax.models.config import ModelConfig, Preset


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ChunkedConfig(ModelConfig):
    chunk_memory: int = 8
    chunk_other: int = 4
    PRESETS = {"tiny": Preset(1e3, dict(vocab_size=16, d_model=8, n_layers=1, n_heads=2,
                                        max_seq_len=64))}


class _Chunked(nnx.Module):
    def __init__(self, config, *, rngs):
        self.config = config
        self.w = nnx.Param(jnp.zeros((config.vocab_size, config.vocab_size)))

    def __call__(self, tokens_BxT):
        return self.w[...][tokens_BxT]


@pytest.fixture
def chunked_model():
    registry.register("test_chunked", _ChunkedConfig)(_Chunked)
    yield "test_chunked"
    registry._REGISTRY.pop("test_chunked")


def test_transformer_is_registered():
    assert "transformer" in models.names()
    assert set(models.presets("transformer")) >= {"tiny", "small", "125M", "340M", "760M", "1.3B"}


def test_unknown_name_lists_the_registered_models():
    with pytest.raises(ValueError, match=r"model='nope'.*transformer"):
        models.create("nope", "tiny", rngs=nnx.Rngs(0))


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match=r"preset='huge'.*tiny"):
        models.make_config("transformer", "huge")


def test_overrides_and_config_instances():
    model = models.create("transformer", "tiny", rngs=nnx.Rngs(0), vocab_size=100, n_layers=1)
    assert model.config.vocab_size == 100 and len(model.blocks) == 1
    cfg = models.make_config("transformer", "tiny")
    again = models.make_config("transformer", cfg, d_model=32)
    assert again.d_model == 32 and again.n_heads == cfg.n_heads
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 8


def test_a_new_model_registers_with_one_decorator(chunked_model):
    model = models.create(chunked_model, "tiny", rngs=nnx.Rngs(0))
    assert model(jnp.zeros((1, 3), jnp.int32)).shape == (1, 3, 16)
    assert models.count_params(model) == 256
    with pytest.raises(ValueError, match="already registered"):
        registry.register(chunked_model, _ChunkedConfig)(type("Other", (nnx.Module,), {}))


def test_chunk_fields_constrain_the_sequence_length(chunked_model):
    cfg = models.make_config(chunked_model, "tiny")
    assert cfg.seq_len_multiples() == {"chunk_memory": 8, "chunk_other": 4}
    cfg.check_seq_len(32)
    with pytest.raises(ValueError, match=r"seq_len=36.*model.chunk_memory=8"):
        cfg.check_seq_len(36)


@pytest.mark.parametrize("name", ["hope", "hope_attention", "titans", "transformer"])
def test_every_model_config_is_a_frozen_dataclass(name):
    """Configs of the four models are frozen (hashable, safe to close over in jit); a change
    goes through `replace`, which validates again and names the field it rejects."""
    cfg = models.make_config(name, "tiny")
    assert dataclasses.is_dataclass(cfg) and type(cfg).__dataclass_params__.frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 32
    hash(cfg)
    assert cfg.replace(n_layers=1).n_layers == 1 and cfg.n_layers != 1
    with pytest.raises(ValueError, match="^n_layers="):
        cfg.replace(n_layers=0)
