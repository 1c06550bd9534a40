"""Hope-Attention: Transformer++ blocks whose MLP is a Continuum Memory System (paper §6).

Each block is x + Attention(RMSNorm(x)) followed by the CMS (``models/cms/``, SwiGLU levels
updated in context every C^(l) tokens, decisions.md #12-#14).  Embeddings are tied; the teach signal
of the CMS levels goes through this model's own final norm and LM head.  With every inner learning
rate 0 the model is a static Transformer++ with several residual MLPs per block, and
``stack_from_transformer`` (ad-hoc level stacking, decision #15) reproduces a Transformer++'s
logits exactly.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nested_jax.models import layers
from nested_jax.models.cms import CMS, CMSFields, CMSState, TeachHead, next_embeddings
from nested_jax.models.config import Preset
from nested_jax.models.lm import LanguageModel
from nested_jax.models.registry import register
from nested_jax.models.transformer import (
    Transformer,
    TransformerConfig,
    attention_flops,
    empty_kv,
    positions,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HopeAttentionConfig(CMSFields, TransformerConfig):
    """Transformer++ fields plus the ``cms_*`` fields of ``CMSFields``.

    ``d_ff`` is the MLP width budget of a block: with ``cms_d_ff=0`` each of the K levels gets
    d_ff / K (rounded up to 64), so a preset has about Transformer++'s parameter count.
    ``remat`` rematerialises each block, attention and CMS together.  The engine already
    rematerialises every CMS level chunk by chunk, so this recomputes the levels once more in
    the backward pass; an attention-only remat left the 125M train step at 17.24 GB per v5e
    chip, the block-level one 2.75 GiB (experiments/results/tpu_compile.md).
    """

    PRESETS = {
        # Same shapes as Transformer++'s presets; the CMS splits each block's MLP into levels.
        "tiny": Preset(0.123e6, dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=192,
                                    max_seq_len=256, cms_periods=(4, 16, 64))),
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
        self.validate_cms()

    def cms(self):
        return self.cms_spec(self.ff_dim)


class HopeAttentionState(NamedTuple):
    """Decode state: the KV cache of every layer (as Transformer++) and every CMS's fast state.

    k, v: [L, B, S, G, K]; pos: int32 scalar; cms: one ``CMSState`` per layer.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    cms: tuple[CMSState, ...]


class Block(nnx.Module):
    def __init__(self, cfg: HopeAttentionConfig, *, rngs: nnx.Rngs):
        out_std = layers.residual_out_std(cfg.n_layers)
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        self.attn_norm = layers.rms_norm(cfg.d_model, eps=cfg.norm_eps,
                                         param_dtype=cfg.weight_dtype, rngs=rngs)
        self.attn = layers.CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads,
                                               rope_theta=cfg.rope_theta, out_std=out_std,
                                               impl=cfg.attention_impl, **kw)
        self.cms = CMS(cfg.cms(), n_layers=cfg.n_layers, **kw)

    def attention(self, x_BxTxD, positions_BxT, docs=None):
        return x_BxTxD + self.attn(layers.apply_norm(self.attn_norm, x_BxTxD), positions_BxT, docs)

    def __call__(self, x_BxTxD, positions_BxT, head: TeachHead, next_BxTxD, docs=None):
        if docs is None:
            return self.cms(self.attention(x_BxTxD, positions_BxT), head, next_BxTxD)
        return self.cms(self.attention(x_BxTxD, positions_BxT, docs), head, next_BxTxD, docs)

    def decode(self, x_Bx1xD, state: tuple[jax.Array, jax.Array, CMSState], pos, head,
               emb_Bx1xD):
        """One token; state = this layer's (cache k, cache v, CMS state)."""
        cache_k, cache_v, cms_state = state
        h, cache_k, cache_v = self.attn.decode(layers.apply_norm(self.attn_norm, x_Bx1xD),
                                               cache_k, cache_v, pos)
        x, cms_state = self.cms.decode(x_Bx1xD + h, cms_state, head, emb_Bx1xD)
        return x, (cache_k, cache_v, cms_state)


@register("hope_attention", HopeAttentionConfig)
class HopeAttention(LanguageModel):
    """Softmax attention + CMS language model: ``model(tokens_BxT) -> logits_BxTxV`` (float32).

    Blocks take Transformer++'s positions, the tied LM head (``teach_head``) and E[x_{t+1}], the
    embeddings shifted left (the CMS teach targets).  Decoding stops at ``max_seq_len``.
    FLOPs: 6 N + 12 L D T (attention, as Transformer++) + the CMS inner loops (see CMS).
    """

    Block = Block

    def block_context(self, x_BxTxD, docs=None):
        if docs is None:
            return positions(x_BxTxD), self.teach_head(), next_embeddings(x_BxTxD)
        return docs.positions, self.teach_head(), next_embeddings(x_BxTxD), docs

    def decode_context(self, state: HopeAttentionState, emb_Bx1xD):
        return state.pos, self.teach_head(whole=True), emb_Bx1xD

    def init_block_state(self, block: Block, batch_size: int):
        return *empty_kv(self.config, batch_size), block.cms.init_state(batch_size)

    def block_state(self, state: HopeAttentionState, i: int):
        return state.k[i], state.v[i], state.cms[i]

    def pack_state(self, block_states, pos) -> HopeAttentionState:
        ks, vs, cms = zip(*block_states, strict=True)
        return HopeAttentionState(jnp.stack(ks), jnp.stack(vs), pos, tuple(cms))

    def extra_flops(self, seq_len: int):
        inner = sum(block.cms.flops_per_token(self.config.vocab_size) for block in self.blocks)
        return attention_flops(self.config, seq_len), inner


def stack_from_transformer(transformer: Transformer, *, rngs: nnx.Rngs,
                           **cms_overrides) -> HopeAttention:
    """Ad-hoc level stacking (paper §5, decision #15): a Hope-Attention built on a Transformer++.

    Embedding, attention, norms are copied; in each block CMS level 0 takes the block's MLP and its
    pre-norm (so ``cms_d_ff[0]`` is the Transformer++'s width), and every further level starts as
    the identity (zero output matrix) and can only grow in context.  With every inner learning
    rate 0 the logits equal the Transformer++'s.  The nested variant's single MLP is the block's.
    """
    tcfg: TransformerConfig = transformer.config
    fields = {f.name: getattr(tcfg, f.name) for f in dataclasses.fields(TransformerConfig)}
    fields["d_ff"] = tcfg.ff_dim
    fields.update(cms_overrides)
    n = len(fields.get("cms_periods", HopeAttentionConfig.cms_periods))
    extra = fields.get("cms_d_ff", 0)
    extra = extra[1:] if isinstance(extra, tuple) else (extra or tcfg.ff_dim,) * (n - 1)
    fields["cms_d_ff"] = (tcfg.ff_dim, *extra)
    model = HopeAttention(HopeAttentionConfig(**fields), rngs=rngs)
    nnx.update(model.embed, nnx.state(transformer.embed, nnx.Param))
    nnx.update(model.final_norm, nnx.state(transformer.final_norm, nnx.Param))
    for mine, theirs in zip(model.blocks, transformer.blocks, strict=True):
        nnx.update(mine.attn_norm, nnx.state(theirs.attn_norm, nnx.Param))
        nnx.update(mine.attn, nnx.state(theirs.attn, nnx.Param))
        mine.cms.load_swiglu(0, theirs.mlp, theirs.mlp_norm)
        for i in range(1, len(mine.cms.levels)):
            mine.cms.silence(i)
    return model
