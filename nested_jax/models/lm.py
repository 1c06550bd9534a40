"""The language-model shell every model of this package shares (docs/decisions.md #11, #16, #17).

    x_0 = E[tokens]                         (tied embedding)
    x_l = block_l(x_{l-1}, *context)        (the model's block, each optionally rematerialised;
                                             a loop, or one lax.scan with ``scan_layers``)
    logits = E RMSNorm_f(x_L)               (final norm, tied LM head, float32)

A model subclasses ``LanguageModel`` and supplies only its block and the hooks around it: the
extra arguments every block takes (``block_context``, ``decode_context``), how its decode state
splits into per-block states (``block_state``, ``pack_state``, ``init_block_state``), the
parameters that FLOPs exclude (``memory_init_params``) and its FLOPs terms beyond 6 N
(``extra_flops``).  The parameter tree is ``embed``, ``blocks``, ``final_norm`` for every model
(checkpoints and ``hope_attention.stack_from_transformer`` rely on these paths).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from nested_jax.models import documents, layers
from nested_jax.models.cms import TeachHead
from nested_jax.models.config import ModelConfig
from nested_jax.models.registry import count_params


def _call_block(block: nnx.Module, x_BxTxD: jax.Array, context: tuple) -> jax.Array:
    # Every block's input and output stay split by batch under a mesh (layers.shard_batch).
    return layers.shard_batch(block(layers.shard_batch(x_BxTxD), *context))


def _scan_blocks(blocks: Sequence[nnx.Module], x_BxTxD: jax.Array, context: tuple,
                 remat: bool) -> jax.Array:
    """The blocks in order as one ``lax.scan`` over their parameters stacked along a new leading
    axis (``config.scan_layers``).  XLA compiles the body once instead of once per block; the
    stack is rebuilt at every call so the parameter tree (and every checkpoint) stays
    ``blocks/<i>/...``, and its transpose hands each block its own gradient back.  Under FSDP
    the stack keeps each parameter's sharding on its own axes, so the scan gathers one block's
    parameters per iteration, as the loop does."""
    graphdef, first = nnx.split(blocks[0])
    states = [first]
    for i, block in enumerate(blocks[1:], start=1):
        other, state = nnx.split(block)
        if other != graphdef:
            raise ValueError(f"scan_layers=True needs blocks of one structure, and block {i} "
                             f"differs from block 0; set scan_layers=False for this model")
        states.append(state)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

    def body(x, state):
        return _call_block(nnx.merge(graphdef, state), x, context), None

    x_BxTxD, _ = jax.lax.scan(jax.checkpoint(body) if remat else body, x_BxTxD, stacked)
    return x_BxTxD


class LanguageModel(nnx.Module):
    """``model(tokens_BxT) -> logits_BxTxV`` (float32) around the subclass's ``Block``.

    Subclasses set ``Block`` (built as ``Block(config, rngs=rngs)``, called as
    ``block(x_BxTxD, *block_context(x_BxTxD))`` and decoded as
    ``block.decode(x_Bx1xD, block_state, *decode_context(state, emb_Bx1xD))``, which returns
    ``(x_Bx1xD, block_state)``).  The config needs ``vocab_size``, ``d_model``, ``n_layers``,
    ``norm_eps`` and ``remat``.
    """

    Block: ClassVar[type[nnx.Module]]

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=config.compute_dtype, param_dtype=config.weight_dtype, rngs=rngs)
        # Construction order (embedding, blocks, final norm) fixes which rng draw initialises
        # what: keep it, or a seed no longer reproduces its old initialisation.
        self.embed = layers.TiedEmbedding(config.vocab_size, config.d_model, **kw)
        self.blocks = layers.ModuleList([self.Block(config, rngs=rngs)
                                         for _ in range(config.n_layers)])
        self.final_norm = layers.rms_norm(config.d_model, eps=config.norm_eps,
                                          param_dtype=config.weight_dtype, rngs=rngs)

    # ---- hooks a model overrides ---------------------------------------------------------------

    def block_context(self, x_BxTxD: jax.Array, docs: documents.Documents | None = None) -> tuple:
        """Extra arguments of every block's forward pass (computed once per call); ``docs``, the
        document layout of packed rows, is None when the call has no segment ids."""
        del x_BxTxD
        return () if docs is None else (docs,)

    def decode_context(self, state: Any, emb_Bx1xD: jax.Array) -> tuple:
        """Extra arguments of every block's ``decode`` for one step."""
        del state, emb_Bx1xD
        return ()

    def init_block_state(self, block: nnx.Module, batch_size: int) -> Any:
        """One block's empty decode state."""
        return block.init_state(batch_size)

    def block_state(self, state: Any, i: int) -> Any:
        """Block ``i``'s part of the model's decode state."""
        raise NotImplementedError

    def pack_state(self, block_states: Sequence[Any], pos: jax.Array) -> Any:
        """The model's decode state from every block's state and the position (int32 scalar)."""
        raise NotImplementedError

    def memory_init_params(self) -> int:
        """Parameters that are initial states of inner memories: no token multiplies them, so
        ``flops_per_token`` leaves them out of 6 N."""
        return 0

    def extra_flops(self, seq_len: int) -> tuple[float, ...]:
        """FLOPs per token beyond 6 N (attention scores, inner loops), added in this order."""
        del seq_len
        return ()

    # ---- the shell -----------------------------------------------------------------------------

    def teach_head(self, whole: bool = False) -> TeachHead:
        """The tied LM head through which the CMS levels' teach signal flows (decision #13).

        ``whole``: the table gathered once onto every chip (``layers.replicate``), for the
        decode step, where one token's teach signal reads all of it at every level of every
        block.  Training leaves it sharded: there the reads are [B, T] matmuls that XLA
        partitions."""
        table_VxD = self.embed.embed.embedding[...]
        if whole:
            table_VxD = layers.replicate(table_VxD)
        return TeachHead(table_VxD, self.final_norm.scale[...], self.config.norm_eps)

    def __call__(self, tokens_BxT: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """Logits of every position.  ``segment_ids`` (int [B, T], 0 = padding) marks the
        documents of packed rows: each then computes what it computes run alone
        (``models/documents.py``); its starts must be multiples of
        ``config.document_alignment()`` (``models/packing.py`` packs so)."""
        return self.forward_embedded(self.embed(tokens_BxT), segment_ids)

    def forward_embedded(self, x_BxTxD: jax.Array, segment_ids: jax.Array | None = None
                         ) -> jax.Array:
        """Logits from already-embedded tokens (the causality tests differentiate this)."""
        if segment_ids is None:
            context = self.block_context(x_BxTxD)
        else:
            if jnp.shape(segment_ids) != x_BxTxD.shape[:2]:
                raise ValueError(f"segment_ids shape {jnp.shape(segment_ids)} must be the tokens' "
                                 f"[B, T] = {x_BxTxD.shape[:2]}.")
            docs = documents.from_segment_ids(segment_ids, self.config.document_alignment(),
                                              self.config.alignment_reason())
            context = self.block_context(x_BxTxD, docs)
        if self.config.scan_layers and len(self.blocks) > 1:
            x = _scan_blocks(self.blocks, x_BxTxD, context, self.config.remat)
        else:
            forward = nnx.remat(_call_block) if self.config.remat else _call_block
            x = x_BxTxD
            for block in self.blocks:
                x = forward(block, x, context)
        return layers.shard_batch(self.embed.logits(layers.apply_norm(self.final_norm, x)))

    def init_state(self, batch_size: int) -> Any:
        """The decode state at position 0: every block's fast state at its initial value."""
        blocks = tuple(self.init_block_state(block, batch_size) for block in self.blocks)
        return self.pack_state(blocks, jnp.zeros((), jnp.int32))

    def decode_step(self, state: Any, tokens_B: jax.Array) -> tuple[jax.Array, Any]:
        """Feed one token per sequence: returns (logits_BxV float32, next state)."""
        emb_Bx1xD = self.embed(tokens_B[:, None])
        context = self.decode_context(state, emb_Bx1xD)
        x = emb_Bx1xD
        blocks = []
        for i, block in enumerate(self.blocks):
            x, st = block.decode(x, self.block_state(state, i), *context)
            blocks.append(st)
        logits_BxV = self.embed.logits(layers.apply_norm(self.final_norm, x))[:, 0]
        return logits_BxV, self.pack_state(blocks, state.pos + 1)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), an estimate for MFU:
        6 N over the parameters used as weights (PaLM, appendix B) plus ``extra_flops``."""
        flops = 6.0 * (count_params(self) - self.memory_init_params())
        for term in self.extra_flops(seq_len):
            flops += term
        return flops
