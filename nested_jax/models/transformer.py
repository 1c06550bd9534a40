"""Transformer++: the attention baseline of the paper's tables (decision 16).

Pre-norm RMSNorm blocks, RoPE, SwiGLU MLP, causal attention through
`jax.nn.dot_product_attention`, a final norm and tied input/output embeddings.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nested_jax.config_checks import check_choice, check_divisible, fail
from nested_jax.models import layers
from nested_jax.models.config import ModelConfig, Preset
from nested_jax.models.lm import LanguageModel
from nested_jax.models.registry import register

ATTENTION_IMPLS = (None, "xla", "cudnn", "blockwise", "auto", "splash", "splash_interpret")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig(ModelConfig):
    """Transformer++ hyper-parameters (fields of `ModelConfig` plus these).

    Attributes:
      d_ff: F, the SwiGLU width; 0 means 8/3 * d_model rounded up to a multiple of 256.
      n_kv_heads: G, key/value heads (grouped-query attention); 0 means n_heads.
      rope_theta: RoPE base frequency.
      norm_eps: RMSNorm epsilon.
      attention_impl: `jax.nn.dot_product_attention` implementation: None (XLA picks),
        "xla", "cudnn" (flash attention on NVIDIA GPUs, bf16/fp16 only), or "blockwise"
        (``layers.blockwise_attention``: [512, T] live scores, for long T without a kernel);
        or the Pallas splash (flash) kernel on TPU (``kernels/splash.py``): "splash" (an
        error off TPU or for a sequence length that is not a multiple of 128), "auto" (splash
        on TPU where the shapes suit it, else exactly the None path), "splash_interpret"
        (the kernel interpreted on CPU, for tests).  The paper-size presets (125M-1.3B) set
        "auto"; the others None.
      remat: rematerialize each block in the backward pass (saves activation memory).
    """

    d_ff: int = 0
    n_kv_heads: int = 0
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    attention_impl: str | None = None
    remat: bool = False

    PRESETS = {
        # nominal sizes count the tied embedding once, at the preset's vocabulary.
        "tiny": Preset(0.123e6, dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                                     d_ff=192, max_seq_len=256)),
        "small": Preset(23e6, dict(d_model=384, n_layers=6, n_heads=6, d_ff=1024,
                                   max_seq_len=1024)),
        "125M": Preset(125e6, dict(d_model=768, n_layers=12, n_heads=12, d_ff=2560,
                                   max_seq_len=4096, attention_impl="auto")),
        "340M": Preset(340e6, dict(d_model=1024, n_layers=24, n_heads=16, d_ff=2816,
                                   max_seq_len=4096, attention_impl="auto")),
        "760M": Preset(760e6, dict(d_model=1536, n_layers=24, n_heads=12, d_ff=4096,
                                   max_seq_len=4096, attention_impl="auto")),
        "1.3B": Preset(1.3e9, dict(d_model=2048, n_layers=24, n_heads=16, d_ff=5632,
                                   max_seq_len=4096, attention_impl="auto")),
    }

    def validate(self) -> None:
        super().validate()
        if self.d_ff < 0:
            fail("d_ff", self.d_ff, "must be >= 0 (0 picks 8/3 * d_model rounded to 256)")
        if self.n_kv_heads < 0 or (self.n_kv_heads and self.n_heads % self.n_kv_heads):
            fail("n_kv_heads", self.n_kv_heads,
                 f"must divide n_heads={self.n_heads} (or be 0 for n_heads)")
        if self.head_dim % 2:
            fail("d_model", self.d_model,
                 f"d_model / n_heads = {self.head_dim} must be even for RoPE")
        check_choice(self, "attention_impl", ATTENTION_IMPLS)
        if self.rope_theta <= 0:
            fail("rope_theta", self.rope_theta, "must be positive")
        check_divisible(self, "d_model", "n_heads")

    def check_seq_len(self, seq_len: int, field: str = "seq_len") -> None:
        super().check_seq_len(seq_len, field)
        if self.attention_impl in ("splash", "splash_interpret") and seq_len % 128:
            fail(field, seq_len, f"must be a multiple of 128 for model.attention_impl="
                 f"{self.attention_impl!r} (the splash kernel's key blocks); use "
                 f"{max(128, seq_len - seq_len % 128)}, or attention_impl='auto' (XLA there)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or layers.swiglu_width(self.d_model)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


class KVCache(NamedTuple):
    """Decode state: per-layer keys/values of every position so far.

    k, v: [L, B, S, G, K] in the compute dtype, S = max_seq_len.
    pos: int32 scalar, the position the next token is written to (shared by the batch).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array


class Block(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        out_std = layers.residual_out_std(cfg.n_layers)
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        self.attn_norm = layers.rms_norm(cfg.d_model, eps=cfg.norm_eps,
                                         param_dtype=cfg.weight_dtype, rngs=rngs)
        self.attn = layers.CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads,
                                               rope_theta=cfg.rope_theta, out_std=out_std,
                                               impl=cfg.attention_impl, **kw)
        self.mlp_norm = layers.rms_norm(cfg.d_model, eps=cfg.norm_eps,
                                        param_dtype=cfg.weight_dtype, rngs=rngs)
        self.mlp = layers.SwiGLU(cfg.d_model, cfg.ff_dim, out_std=out_std, **kw)

    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, docs=None) -> jax.Array:
        x = x_BxTxD + self.attn(layers.apply_norm(self.attn_norm, x_BxTxD), positions_BxT, docs)
        return x + self.mlp(layers.apply_norm(self.mlp_norm, x))

    def decode(self, x_Bx1xD, kv: tuple[jax.Array, jax.Array], pos):
        """One token; kv = this layer's cache (k, v), each [B, S, G, K]."""
        h, cache_k, cache_v = self.attn.decode(layers.apply_norm(self.attn_norm, x_Bx1xD),
                                               *kv, pos)
        x = x_Bx1xD + h
        return x + self.mlp(layers.apply_norm(self.mlp_norm, x)), (cache_k, cache_v)


def positions(x_BxTxD: jax.Array) -> jax.Array:
    """int32 [B, T] token positions 0..T-1 (RoPE's input)."""
    B, T, _ = x_BxTxD.shape
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))


def empty_kv(config: TransformerConfig, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """One layer's empty KV cache (k, v), each [B, S, G, K] with S = max_seq_len."""
    c = config
    shape = (batch_size, c.max_seq_len, c.kv_heads, c.head_dim)
    return jnp.zeros(shape, c.compute_dtype), jnp.zeros(shape, c.compute_dtype)


def attention_flops(config: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token of the attention scores and mixing: 12 L D T (PaLM, app. B)."""
    return 12.0 * config.n_layers * config.d_model * seq_len


@register("transformer", TransformerConfig)
class Transformer(LanguageModel):
    """Transformer++ language model: `model(tokens_BxT) -> logits_BxTxV` (float32).

    The decode state is a `KVCache`; positions past `max_seq_len` are not representable, the
    caller stops there.  FLOPs: 6 N + 12 L D T.
    """

    Block = Block

    def block_context(self, x_BxTxD, docs=None):
        if docs is None:
            return (positions(x_BxTxD),)
        return docs.positions, docs  # RoPE restarts at 0 in every document

    def decode_context(self, state: KVCache, emb_Bx1xD):
        return (state.pos,)

    def init_block_state(self, block: Block, batch_size: int):
        return empty_kv(self.config, batch_size)

    def block_state(self, state: KVCache, i: int):
        return state.k[i], state.v[i]

    def pack_state(self, block_states, pos) -> KVCache:
        ks, vs = zip(*block_states, strict=True)
        return KVCache(k=jnp.stack(ks), v=jnp.stack(vs), pos=pos)

    def extra_flops(self, seq_len: int):
        return (attention_flops(self.config, seq_len),)
