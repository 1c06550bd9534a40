"""Continuum Memory System: a chain of MLP levels updated in context at their own frequency.

Paper §5 (arXiv eq. 71), decisions.md #12-#15.  Level l is a SwiGLU MLP whose weights are a fast
state: every ``C^(l)`` tokens of the context flow it takes one step with the accumulated inner
gradient of its chunk, and the new weights are read from the next chunk on (causal).  Each level is
an engine ``Level`` with ``read="boundary"`` run by ``nested_jax.memory`` (path "chunked"), so
chunking, remat of chunk bodies and streaming all come from the engine.

Interface (stable; ``hope_attention.py`` and ``hope.py`` build on it)::

    spec = CMSSpec(d_model=D, periods=(16, 64, 256), d_ff=(F1, F2, F3), lr=(1e-2,) * 3)
    cms = CMS(spec, n_layers=L, dtype=..., param_dtype=..., rngs=rngs)     # one per block
    head = TeachHead(embedding_VxD, final_norm_scale_D, eps)   # the tied LM head (teach signal)
    nxt_BxTxD = next_embeddings(emb_BxTxD)                     # e_{t+1}: input embeddings shifted
    x_BxTxD = cms(x_BxTxD, head, nxt_BxTxD)                    # residual stream in -> out
    state = cms.init_state(batch_size)
    y_Bx1xD, state = cms.decode(x_Bx1xD, state, head, emb_Bx1xD)   # emb = current token's e_t

A model config gets the ``cms_*`` fields and their validation from the ``CMSFields`` mixin
(``cfg.cms_spec(default_d_ff)`` resolves them).  ``CMS.load_swiglu`` is ad-hoc level stacking.

Semantics (all documented in docs/paper_map/models.md):

* Level read-out.  Level l maps the residual stream r to r + y, y = w_l SwiGLU_l(RMSNorm_l(r)).
  The norm scale and the mixing weight w_l are outer parameters; the three SwiGLU matrices are
  the fast state, one copy per sequence (leading batch axis, decisions.md #1), initialised from
  outer parameters (meta-learned: outer gradients flow through every inner update, #4).
* Inner objective (#13), ``signal``:
  - "teach" (default): the local surprise signal.  With h_t = r_t + y_t the stream after the
    level, delta_t = d/dh CE(E RMSNorm_f(h_t), x_{t+1}) = J_f(h_t)^T (E^T softmax(E RMSNorm_f(h_t))
    - E[x_{t+1}]), the next-token error carried to the level's output through the final norm and
    the tied LM head (J_f = Jacobian of the final norm; without it delta would not be the gradient
    of any loss).  The level minimises the engine's "dot" objective -<y_t, -delta_t>, i.e. takes a
    GD step on the logit-lens next-token loss of the stream it writes.  delta_t is a target of
    the inner problem (the inner gradient is J_y^T delta_t), but the outer gradient flows through
    its dependence on the boundary weights and r_t (``level.inner_dot``), so it is the exact
    derivative of the forward (decisions.md #28; ``teach_stop_grad=True`` restores the earlier
    stop-gradient, whose gradient at init grows from 1.9 to 386 at 16K tokens).  For the last
    level of the last block, delta_t is the exact per-token gradient of the model's loss w.r.t.
    that level's output.
    E[x_{t+1}] = the input embedding of the next token (tied embeddings), so the targets are the
    input embeddings shifted left; the last position has no next token and is masked (eta = 0).
    ``teach_at="input"`` is the cheap option: delta_t taken once per block at the CMS input
    stream (it does not depend on any level's state), shared by all levels as the engine's plain
    "dot" target v = -delta; one V x D logit lens per block instead of one per level, outside the
    rematerialised chunk bodies.
  - "reconstruction": the l2 objective 1/2 ||y_t - RMSNorm_l(r_t)||^2 on the level's own input.
* Inner rule: GD (default; the engine's one-VJP-per-chunk boundary path), or momentum
  (``momentum > 0``: Titans momentum with constant beta).  ``retention`` alpha < 1 adds weight
  decay: toward zero (``decay_to="zero"``, the rule's own form) or toward the level's initial,
  meta-learned weights (``decay_to="init"``: the fast state is then the in-context change
  W - W_0 and only that decays, so a level forgets old context without forgetting what outer
  training put in it; decisions.md #28).
  Per-level learning rate eta_l = lr_l * 2 sigmoid(g_l) with a learned scalar g_l (init 0, so
  eta_l = lr_l at init, bounded by 2 lr_l).  lr_l = 0 makes level l static (with retention 1
  or ``decay_to="init"``): the forward then reads it at its initial weights for the whole
  sequence without the engine's scan (``CMS._static``), the same function and gradients.
* Variants (#14):
  - "sequential": levels chained, r -> level 0 -> level 1 -> ...
    (paper: y = MLP^(f_k)(...MLP^(f_1)(x))).
  - "independent": every level reads the same r; the block adds sum_l w_l SwiGLU_l(...) with the
    learned weights w_l (init 1): the head-wise, parallel variant.
  - "nested": one MLP on several time-scales.  periods must decrease (P_0 > P_1 > ...) with each
    dividing the previous.  Level 0's weights are the outer (meta-learned) init; level s+1's
    weights are re-initialised from level s's at every P_s boundary (the end of its context),
    and at that boundary level s meta-learns the init it hands out, Reptile-style:
    theta_s <- theta_s + lambda_s (theta_{s+1}^{end} - theta_s), lambda_s = min(1, eta_s).
    The fastest level is the one read and the only one taking gradient steps.  With every lr 0
    the MLP is static.
* Decoding carries every level's engine stream state.  The teach signal of token t needs
  x_{t+1}, so the write of token t is applied at step t+1, before the read of token t+1: reads
  only ever see boundary states, so this lag changes nothing and decode == forward exactly.
"""

from nested_jax.models.cms.level import CMSLevel, SwiGLUMemory
from nested_jax.models.cms.module import CMS, CMSState, LevelParams
from nested_jax.models.cms.spec import (
                                        DECAY_TO,
                                        SIGNALS,
                                        TEACH_AT,
                                        VARIANTS,
                                        CMSFields,
                                        CMSSpec,
                                        validate_spec,
)
from nested_jax.models.cms.teach import TeachHead, next_embeddings, teach_delta

__all__ = ["CMS", "DECAY_TO", "SIGNALS", "TEACH_AT", "VARIANTS", "CMSFields", "CMSLevel", "CMSSpec",
           "CMSState", "LevelParams", "SwiGLUMemory", "TeachHead", "next_embeddings",
           "teach_delta", "validate_spec"]
