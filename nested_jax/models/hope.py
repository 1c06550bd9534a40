"""HopeLM: self-modifying Titans + Continuum Memory System (paper §6; decisions #11, #16, #17).

    x_0 = E[tokens]                                    (tied embedding, decision #11)
    x   = x + SelfModifyingTitans(RMSNorm(x))           (self_modifying.py: paper §4, eqs. 76-93)
    x   = CMS(x)                                        (models/cms/: paper §5, eq. 71)
    logits = E RMSNorm_f(x)                             (final norm, tied LM head)

for each of the N blocks.  The CMS levels' teach signal is carried through this model's own final
norm and LM head (decision #13).  Every level of every block keeps a fast state: the five memories
of each self-modifying layer (M_k, M_v, M_eta, M_alpha, M_memory), its conv buffer, and every CMS
level; ``decode_step`` carries all of them, so a decode step costs the same at every position.

Ablations of the paper's table (arXiv Table 5), each one config flag:
  dgd=False ("DGD -> GD"), momentum=False ("w/o momentum"), weight_decay=False ("w/o wd"),
  use_cms=False ("w/o CMS": the block's MLP is a static SwiGLU of width d_ff, i.e. CMS with one
  level of frequency 0), static_k=True ("k static"), static_v=True ("v static"),
  adaptive_q=True ("q adaptive"; static q is the default, decision #9), and stop_grad=True
  (decision #4: no outer gradient through any inner write, self-modifying memories and CMS).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
from flax import nnx

from nested_jax.config_checks import fail
from nested_jax.models import layers
from nested_jax.models.cms import CMS, CMSFields, CMSSpec, CMSState, TeachHead, next_embeddings
from nested_jax.models.config import ModelConfig, Preset
from nested_jax.models.lm import LanguageModel
from nested_jax.models.registry import register
from nested_jax.models.self_modifying import (
    LayerState,
    SelfModifyingConfig,
    SelfModifyingFields,
    SelfModifyingTitans,
    validate_fields,
)

_LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(SelfModifyingConfig))
SCOPE_CMS = "cms"  # jax.named_scope of the CMS chain (profiles: op_name metadata)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HopeConfig(SelfModifyingFields, CMSFields, ModelConfig):
    """HopeLM hyper-parameters: ``ModelConfig`` + the self-modifying layer's fields
    (``SelfModifyingFields``: memory_hidden, chunk_memory, chunk_other, eta_max, inner_rule,
    dgd, momentum, ..., norm_eps, each documented there) + the ``cms_*`` fields (``CMSFields``).

    Attributes:
      d_ff: the MLP width budget of a block; with ``cms_d_ff=0`` each of the K CMS levels gets
        d_ff / K (rounded up to 64).  0 means 8/3 * d_model rounded up to 256.
      use_cms: False is the "w/o CMS" ablation: a static SwiGLU MLP of width d_ff.
      remat: rematerialise each block in the backward pass.

    Any sequence length works (a ragged last chunk is padded internally; the model is causal), so
    training sequence lengths need not be multiples of the chunk sizes.
    """

    d_ff: int = 0
    use_cms: bool = True
    remat: bool = False

    PRESETS = {
        # Nominal sizes count the tied embedding once, at the preset's vocabulary (32K except
        # tiny).  Widths follow Transformer++'s presets; a Hope block trades attention's 4 D^2
        # for 3 D^2 of projections plus the five memories' initial states (10 D F).
        "tiny": Preset(0.137e6, dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=192,
                                    max_seq_len=4096, chunk_memory=16, chunk_other=4,
                                    cms_periods=(4, 16, 64))),
        # small: 12 heads of 32, so the inner loop (~D F flops per memory and token) is half
        # of 6 heads of 64; it is the CPU preset (docs/training.md, lm:cpu_demo).
        "small": Preset(24e6, dict(d_model=384, n_layers=6, n_heads=12, d_ff=1024,
                                   max_seq_len=1024)),
        "125M": Preset(125e6, dict(d_model=768, n_layers=12, n_heads=12, d_ff=2560,
                                   max_seq_len=4096)),
        "340M": Preset(340e6, dict(d_model=1024, n_layers=24, n_heads=16, d_ff=2816,
                                   max_seq_len=4096)),
        "760M": Preset(760e6, dict(d_model=1536, n_layers=24, n_heads=12, d_ff=4096,
                                   max_seq_len=4096)),
        "1.3B": Preset(1.3e9, dict(d_model=2048, n_layers=24, n_heads=16, d_ff=5632,
                                   max_seq_len=4096)),
    }

    def validate(self) -> None:
        super().validate()
        validate_fields(self)
        if not isinstance(self.d_ff, int) or self.d_ff < 0:
            fail("d_ff", self.d_ff, "must be an int >= 0 (0 picks 8/3 * d_model rounded to 256)")
        for name in ("use_cms", "remat"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "must be a bool")
        self.validate_cms()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or layers.swiglu_width(self.d_model)

    def layer_config(self) -> SelfModifyingConfig:
        """The self-modifying Titans layer's config (same field names)."""
        return SelfModifyingConfig(**{f: getattr(self, f) for f in _LAYER_FIELDS})

    def cms(self) -> CMSSpec:
        spec = self.cms_spec(self.ff_dim)
        return dataclasses.replace(spec, stop_grad=spec.stop_grad or self.stop_grad)

    def seq_len_multiples(self) -> dict[str, int]:
        """None: every level handles a ragged last chunk, so any training length is exact."""
        return {}

    def alignment_fields(self) -> dict:
        """The layer's chunk sizes, and the CMS periods unless use_cms=False (no CMS then)."""
        fields = super().alignment_fields()
        if not self.use_cms:
            fields.pop("cms_periods", None)
        return fields


class HopeState(NamedTuple):
    """Decode state (decision #17): every level's fast state, constant size in the position.

    mixers: one ``LayerState`` per block (five memories' stream states and the conv buffer).
    cms: one ``CMSState`` per block (empty with use_cms=False).
    pos: int32 scalar, tokens consumed.
    """

    mixers: tuple[LayerState, ...]
    cms: tuple[CMSState, ...]
    pos: jax.Array


class Block(nnx.Module):
    """x + SelfModifyingTitans(RMSNorm(x)), then the CMS chain (or a static SwiGLU)."""

    def __init__(self, cfg: HopeConfig, *, rngs: nnx.Rngs):
        out_std = layers.residual_out_std(cfg.n_layers)
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        self.use_cms = cfg.use_cms
        self.mixer_norm = layers.rms_norm(cfg.d_model, eps=cfg.norm_eps,
                                          param_dtype=cfg.weight_dtype, rngs=rngs)
        self.mixer = SelfModifyingTitans(cfg.layer_config(), out_std=out_std, rngs=rngs)
        if cfg.use_cms:
            self.cms = CMS(cfg.cms(), n_layers=cfg.n_layers, **kw)
        else:
            self.mlp_norm = layers.rms_norm(cfg.d_model, eps=cfg.norm_eps,
                                            param_dtype=cfg.weight_dtype, rngs=rngs)
            self.mlp = layers.SwiGLU(cfg.d_model, cfg.ff_dim, out_std=out_std, **kw)

    def __call__(self, x_BxTxD, head: TeachHead, next_BxTxD, docs=None):
        x = x_BxTxD + self.mixer(layers.apply_norm(self.mixer_norm, x_BxTxD), docs)
        if self.use_cms:
            with jax.named_scope(SCOPE_CMS):  # tags the CMS's ops in profiles; no numbers change
                return self.cms(x, head, next_BxTxD, docs)
        return x + self.mlp(layers.apply_norm(self.mlp_norm, x))

    def decode(self, x_Bx1xD, state: tuple[LayerState, CMSState | None], head: TeachHead,
               emb_Bx1xD):
        """One token; state = (mixer state, CMS state or None with use_cms=False)."""
        mixer_state, cms_state = state
        y_BxD, mixer_state = self.mixer.decode_step(
            mixer_state, layers.apply_norm(self.mixer_norm, x_Bx1xD)[:, 0])
        x = x_Bx1xD + y_BxD[:, None]
        if self.use_cms:
            x, cms_state = self.cms.decode(x, cms_state, head, emb_Bx1xD)
        else:
            x = x + self.mlp(layers.apply_norm(self.mlp_norm, x))
        return x, (mixer_state, cms_state)

    def init_state(self, batch_size: int) -> tuple[LayerState, CMSState | None]:
        cms = self.cms.init_state(batch_size) if self.use_cms else None
        return self.mixer.init_state(batch_size), cms


@register("hope", HopeConfig)
class HopeLM(LanguageModel):
    """Hope language model: ``model(tokens_BxT) -> logits_BxTxV`` (float32).

    Every block takes the tied LM head (``teach_head``) and E[x_{t+1}], the embeddings shifted
    left, as the CMS teach targets.  The decode state (``HopeState``) holds every level's fast
    state at its meta-learned initial value, so a step is O(1) in the position.
    """

    Block = Block

    def block_context(self, x_BxTxD, docs=None):
        if docs is None:
            return self.teach_head(), next_embeddings(x_BxTxD)
        return self.teach_head(), next_embeddings(x_BxTxD), docs

    def decode_context(self, state: HopeState, emb_Bx1xD):
        return self.teach_head(whole=True), emb_Bx1xD

    def block_state(self, state: HopeState, i: int):
        return state.mixers[i], (state.cms[i] if self.config.use_cms else None)

    def pack_state(self, block_states, pos) -> HopeState:
        mixers, cms = zip(*block_states, strict=True)
        return HopeState(tuple(mixers), tuple(cms) if self.config.use_cms else (), pos)

    def memory_init_params(self) -> int:
        """Parameters that are initial states of the self-modifying memories (meta-learned)."""
        names = ("coupled_w1", "coupled_w2", "memory_w1", "memory_w2", "memory_w")
        return sum(int(getattr(b.mixer, n).size) for b in self.blocks for n in names
                   if hasattr(b.mixer, n))

    def extra_flops(self, seq_len: int):
        """The inner loops, none growing with ``seq_len`` (the layer is recurrent): 3x each
        self-modifying layer's (``inner_flops_per_token``: the boundary read-outs and the
        engine's chunk work of all five memories) plus the CMS levels' (``CMS.flops_per_token``).
        """
        del seq_len
        inner = sum(3.0 * b.mixer.inner_flops_per_token() for b in self.blocks)
        if self.config.use_cms:
            inner += sum(b.cms.flops_per_token(self.config.vocab_size) for b in self.blocks)
        return (inner,)
