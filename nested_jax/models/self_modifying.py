"""Self-modifying Titans: Hope's sequence mixer (paper §4, arXiv eqs. 76-93; §6; decisions #4-#11).

Shapes: B batch, T tokens, D d_model, H heads, K = D / H head width, F memory hidden width,
N coupled memories (k, v, eta, alpha [, q]), C a chunk, W the conv width.

One layer, for every sequence b and head h (decisions #1: the fast state is per sequence):

    x_t       = conv_W(x)_t split into heads            (causal depthwise conv, decision #11;
                                                         each coupled memory has its own taps)
    q_t       = l2(x_t W_q)                              (static q, decision #9)
    k_t       = l2(M_k(x_t)),  v_t = l2(M_v(x_t))        (eqs. 76-79: adaptive projections)
    beta_t    = sigmoid(<w_beta, M_alpha(x_t)> + b_beta)          (momentum decay)
    eta_t     = eta_max sigmoid(<w_eta, M_eta(x_t)> + b_eta) (1 - beta_t)      (decision #7)
    alpha_t   = sigmoid(<w_alpha, M_alpha(x_t)> + b_alpha)
    vhat_□    = M_□(v_t)                                 (eq. 84, self-generated targets, #8)
    S_□      <- beta_t S_□ - eta_t grad ||M_□(k_t) - vhat_□||^2 / 2
    M_□      <- M_□ (alpha_t I - eta_t k_t k_t^T) + S_□  (eqs. 88-90: DGD + wd + momentum, #5 #6)
               (default inner_rule="delta": the factor on both layers with their own inputs and
               steps eta / (1 + eta ||x||^2), the error without W1_b h; vhat_□ = l2(M_□(v_t)))
    o_t       = M_memory(q_t)                            (read after the update of token t;
                                                          memory_read="prior": before it)
    y_t       = W_o (RMSNorm(o_t) * silu(x_t W_g))       (norm + output gate, Titans §3)

for □ in {k, v, eta, alpha, memory}; M_k, M_v, M_eta, M_alpha are 2-layer residual MLPs
M(z) = z + W1 s(W2 z) acting on one head slice (K -> F -> K, ``memory.MLPMemory``); M_memory is
one K x K matrix starting at zero (``memory_form="linear"``, decisions.md #25; "mlp" makes it
the paper's residual MLP too).  Every initial state is an outer ``nnx.Param`` (meta-learned:
the outer gradient flows through every inner update, #4).

Chunking (decisions #2, #10).  M_k, M_v, M_eta, M_alpha (the "coupled" memories) share the chunk
size C_other: every k, v, eta, alpha, beta and vhat of a chunk is produced from the four memories'
states at the chunk boundary, and their inner gradients are taken there too.  We therefore scan
over C_other-chunks ourselves; per chunk the four memories are advanced together by one engine
call (``memory.apply``, read="boundary", self_target=True), their states stacked along the head
axis (N*H "heads": they share keys and gates, only their targets differ).  M_memory then runs over
the whole sequence with chunk size C_memory (path "dual", online read).  The two levels interact
only through (k, v, gates), so any pair (C_memory, C_other) is valid; C_memory need not be a
multiple of C_other.  A ragged last chunk (T not a multiple of C) is run as a shorter chunk,
exactly as the engine does, so T is unconstrained.  With C_other = C_memory = 1 the layer is the
per-token recurrence above exactly (tests/models/test_self_modifying.py).

Precision: projections, conv and output run in the compute dtype; the inner loop (all memory
states, keys, values and gates) runs in ``memory_dtype`` (float32 by default), because a fast
weight accumulates updates of relative size ~eta * 1e-2 that bfloat16 (8 mantissa bits) drops.

Readings of points the paper leaves open (recorded in docs/paper_map/models.md):
  * heads: the conv'd x is split into H slices of K = D / H; every memory acts on one slice
    (K -> F -> K), so residual memories are well defined and the state is per head;
  * beta (momentum decay) is a second read-out of M_alpha (both are decay factors) so that all
    gates come from the chunk-boundary memories (decision #7);
  * in-context learning and inner-loop stability (decisions #19; docs/paper_map/models.md).
    Matching the per-token definition is not enough: with the first reading (eta_max = 0.01,
    paper-literal DGD, one shared conv) the memories were idle -- freezing them changed nothing
    on recall or language modelling.  Four causes, four fixes:
      - writes too small to matter: eta = 2.5e-3 moved the read-out by ~5e-4.  The cap hid an
        instability of the forward pass, removed at its cause instead (next points): the layer
        is now finite for eta_max up to 100;
      - DGD with the l2 objective decays along k twice (W (alpha I - 2 eta k k^T) at C = 1): a
        reflection, not an erasure, at large eta.  ``inner_rule="delta"`` (``memory.Rule.delta``)
        back-propagates the error without the output-side matrix's own term, with DGD's factor
        and the Sherman-Morrison step eta / (1 + eta ||x||^2) on every layer: each write is a
        proximal l2 step, contractive for every eta.  "dgd_all" (factor on every layer, full
        error) and "dgd" (decision #5: factor on W2 only) are kept for the ablations;
      - self-generated targets chase the memory they train: M(k) <- M_b(v) moves M along k by
        about (v - k) + M_b(v) - M_b(k) per token, unbounded at alpha = 1.  The target is
        l2-normalised (``normalize_target``), like k, q and v, so contractive writes stay bounded
        (v itself is normalised too, ``normalize_v``: unnormalised, M_v's target M_v(M_v(x)) is a
        quadratic loop);
      - one shared conv made k = l2(M_k(x)) and v = l2(M_v(x)) nearly equal (both memories start
        near the identity on the same input), so M_memory stored k -> ~k.  Each coupled memory has
        its own conv taps over the shared window (``separate_conv``), as Titans' k and v convs
        do: the k memory can look at the previous token while the v memory looks at this one.
    With these the layer stays finite for every gate value, alpha = 1, beta -> 1 and eta_max = 100
    included (tests/models/test_self_modifying.py), and eta carries (1 - beta) (``ema_momentum``):
    S is an exponential moving average of the writes, so the momentum-amplified step is bounded.
    What still bounds eta is the *outer* gradient: the forward stays bounded at any eta, but its
    sensitivity to the initial state grows along the sequence once writes are large, so outer
    gradients explode with the context length (tiny Hope on repeated text, at init: gradient norm
    25 at eta_max = 0.1 and T = 16K in bfloat16; 5e14 at eta_max = 1; inf at eta_max = 10 already
    at T = 512).  Hence eta_max = 0.1: MQAR recall with CMS frozen is 18.6% at 0.1 against 25.5%
    at 10 and 6.2% for the static network (experiments/results/icl_mqar*.md).
    Memories start as identity plus W1 ~ N(0, 0.25/F) (``memory_init_scale``): with W1 = 0 all
    memories are the identity and every target error M(k) - M(v) is (v - k) alone;
  * M_memory, the memory that answers the queries, is not bound by that cap (decisions.md #21).
    The explosion comes from self-referential writes: with M_memory trained toward v_t (as in
    Titans) instead of its self-generated l2(M_memory,b(v_t)), tiny Hope's outer gradient norm
    on periodic text at init (T = 1024, CMS frozen) is 1.34 with M_memory's eta bound at 10
    (0.1 x ``memory_eta_scale`` = 100), against 547 with the self-generated target.  So M_memory
    takes near-full Sherman-Morrison delta steps on unit keys while the coupled memories, which
    generate k, v and the gates, keep eta_max = 0.1.  MQAR with CMS frozen, 400 steps, seed 0:
    5.9% (scale 1, self-target), 16.1% (10, self-target), 24.8% (10, v), 34.6% (100, v; seed 1:
    36.2%), 20.0% (1000, v).  ``memory_self_target=True, memory_eta_scale=1`` is the
    paper-literal reading (eq. 84 for every memory, one eta);
  * k and v must not start equal (decisions.md #24).  With every conv tap at the current token
    and M_k, M_v near the identity, k_t ~ v_t ~ l2(x_t): M_memory then stores x -> ~x, which
    its residual read already computes, so its writes change nothing.  Outer training does not
    leave that point on language: in the LM suite's trained HopeLM (400 steps) cos(k_t, v_t) is
    0.98 in every layer, the writes move the read by 1-4%, and freezing them costs 0.03
    perplexity.  ``key_shift`` starts k's own conv taps on the previous token and
    ``q_identity`` starts W_q at the identity, so k_t ~ x_{t-1}, v_t ~ x_t, q_t ~ x_t: M_memory
    stores transitions and reads, at x_t, what followed x_t before -- an induction read before
    any training (tests/models/test_self_modifying.py).  Measured: MQAR with CMS frozen, 400
    steps, 34.6% -> 99.9%; HopeLM (2 layers, 1000 steps) freezing the self-modifying memories
    costs 14.5 perplexity instead of ~0 (experiments/results/lm_init_probe.md);
  * the output gate is silu(x W_g) of the block's (normalised, pre-conv) input, as in GatedDeltaNet.
    At init (W_g ~ N(0, 0.02)) it multiplies the read by +-0.08 per channel, its sign set by
    the input: the read reaches W_o small and scrambled, and on S-NIAH-3 whether the memories
    alone learn to copy was a draw of the start (1 of 4 seeds).  ``out_gate_bias=1.0`` starts
    the gate open (silu(1) = 0.73 a channel): 4 of 4 (decisions.md #32);
  * the conv starts as the identity (current-token tap 1, others ~N(0, 0.02)).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nested_jax import memory as nm
from nested_jax.config_checks import check_choice, check_positive, fail
from nested_jax.memory.memories import activation
from nested_jax.memory.resets import restart
from nested_jax.models import documents, layers
from nested_jax.models.config import DTYPES, MEMORY_IMPLS, memory_route

PATHS = ("dual", "chunked")
MEMORY_FORMS = ("mlp", "linear")
READS = ("online", "prior")
INNER_RULES = ("delta", "dgd_all", "dgd")
ETA_MAX_LIMIT = 100.0
GATES = ("eta", "alpha", "beta")
# Gate biases at init: eta = eta_max * sigmoid(0) * (1 - beta), beta = sigmoid(0) = 0.5
# (momentum); alpha's bias is logit(retention_init) (config field, default 0.99: slow decay).
GATE_BIAS_INIT = {"eta": 0.0, "beta": 0.0}
# alpha = sigmoid(4.6) = 0.99005 at init: the bias every result before retention_init used.
RETENTION_INIT = 1.0 / (1.0 + math.exp(-4.6))
GATE_SOURCE = {"eta": "eta", "alpha": "alpha", "beta": "alpha"}  # memory each gate is read from
# jax.named_scope names of the training path's two memory stages (profiles: op_name metadata)
SCOPE_COUPLED, SCOPE_MEMORY = "coupled_memories", "output_memory"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelfModifyingFields:
    """Config mixin: the self-modifying layer's own hyper-parameters, one definition for
    ``SelfModifyingConfig`` (the layer) and ``HopeConfig`` (the model, which inherits them, so
    ``--set model.eta_max=...`` reaches the layer under the same name).

    Attributes:
      memory_hidden: F, hidden width of every 2-layer residual memory; 0 means K.
      chunk_memory: C_memory, chunk size of M_memory (decision #10, default 64).
      chunk_other: C_other, chunk size shared by M_k, M_v, M_eta, M_alpha (default 8).
      conv_width: W, causal depthwise conv width (decision #11, default 4).
      eta_max: upper bound of the inner learning rate, eta = eta_max * sigmoid(.) (decision #7);
        default 0.1: with the delta rule every write is contractive at any eta, but outer
        gradients explode with the context at large eta (module notes).  inner_rule="dgd" keeps
        eta_max <= 1.
      memory_eta_scale: M_memory's inner learning rate is memory_eta_scale times the coupled
        memories' eta (same gate): the memory that answers queries takes near-full delta-rule
        steps while the coupled memories, which generate k, v and the gates, stay at eta_max
        (module notes; decisions.md #21).  eta_max = 0 still freezes every memory.
      memory_self_target: M_memory's target is its self-generated l2(M_memory,b(v_t)) (paper,
        eq. 84) if True, or v_t itself (Titans' target) if False.  The coupled memories always
        generate their own targets.
      inner_rule: "delta" (default: delta-form DGD, Sherman-Morrison step on every layer),
        "dgd_all" (factor and step on every layer, full l2 error) or "dgd" (decision #5: the
        factor on the input-side matrix only, the paper-literal reading).
      reflect: double the Sherman-Morrison step (``memory.Rule.reflect``, decisions.md #22): a
        write's eigenvalue along its input spans (alpha - 2, alpha], so M_memory (eta up to
        eta_max * memory_eta_scale) can reflect its state, as parity needs; the default False
        keeps every write an erasure-or-less (eigenvalues in (alpha - 1, alpha]).
      normalize_target: the self-generated target is l2(M_b(v)) (default; module notes).
      separate_conv: each coupled memory reads its own causal conv of x (default; module notes).
      dgd: delta gradient descent (alpha I - eta k k^T) on the input-side matrix; False is the
        "DGD -> GD" ablation (decision #5).
      momentum: inner momentum S_t (decision #6); False is the "w/o momentum" ablation (beta = 0).
      weight_decay: data-dependent retention alpha_t; False fixes alpha = 1 ("w/o wd" ablation).
      stop_grad: stop outer gradients through the inner writes (decision #4 ablation).
      static_k, static_v: k = l2(x W_k) / v = x W_v plain projections ("k/v static" ablations).
      adaptive_q: q = l2(M_q(x)) from a fifth coupled memory (decision #9 option; default static).
      normalize_v: v = l2(M_v(x)) (default; stability) or the paper-literal v = M_v(x).
      ema_momentum: eta_t carries a factor (1 - beta_t), so eta / (1 - beta) <= eta_max.
      retention_init: alpha at initialisation (the gate's bias is logit(retention_init)), for
        every memory of the layer.  The default sigmoid(4.6) = 0.99005 keeps a write for ~100
        tokens (0.99^1000 = 4e-5): enough for recall within a few hundred tokens, too short for
        a needle 1K tokens back, which needs 0.999 or more (decisions.md #27).  alpha stays
        data-dependent and learnable either way.
      memory_init_scale: s of the initial W1 ~ N(0, s^2 / F) of every memory (0 = identity).
      key_shift: the k memory's conv starts on the previous token (its identity tap at t - 1,
        not t), so k_t ~ l2(x_{t-1}) while v_t ~ l2(x_t): M_memory starts out storing
        transitions x_{t-1} -> x_t instead of x_t -> ~x_t, which the residual memory already
        computes (module notes; decisions.md #24).  Default on.  A no-op where k has no conv
        taps of its own (static_k, separate_conv=False) or there is no previous tap
        (conv_width=1).
      q_identity: W_q starts as the identity (plus N(0, 0.02)), so q_t ~ l2(x_t) lives in the
        coordinates of k and v, whose memories start near the identity, instead of a random
        projection of them (decisions.md #24).  Default on; a no-op with adaptive_q.
      memory_form: the form of M_memory, the memory the queries read: "linear" (default: one
        matrix M(z) = W z per head starting at W = 0, the delta rule's state) or "mlp" (the
        paper's 2-layer residual M(z) = z + W1 s(W2 z), like the coupled memories; decisions.md
        #25).  Untrained, the residual MLP reads 10% of MQAR 32 x 256 at a head of 64 where one
        matrix reads 64-71%, and trained with CMS frozen it stays at chance where the matrix
        recalls 100% (experiments/results/icl_mqar32_linear.md).  The coupled memories keep
        the paper's form either way.
      memory_impl: a linear M_memory only: the kernels' ``impl`` on the engine's "pallas" path
        ("auto": the Pallas kernel where one runs the level on this backend, else the XLA dual
        form; "pallas", "interpret"), or "xla" to run ``memory_path`` instead.  The coupled
        memories are MLPs and always run ``memory_path``.
      memory_path: engine path of every memory: "dual" (matmul form) or "chunked" (generic).
      memory_read: how M_memory is read: "online" (o_t = M_t(q_t), after token t's own write;
        default) or "prior" (o_t = M_{t-1}(q_t), the paper's strictly causal read,
        decisions.md #20).  The coupled memories read their chunk-boundary states either way.
      remat_group: C_other-chunks per rematerialised segment of the coupled scan: the backward
        pass stores the four memories' states once per segment and recomputes inside it.
        0 = sqrt(number of chunks) (O(sqrt T) state memory), -1 = no segments (one stored state
        per chunk: least compute, most memory).
      norm_eps: RMSNorm epsilon of the output norm.
      memory_dtype: dtype of the inner loop and of the output norm ("float64" is accepted for
        the exactness tests).
      out_gate_bias: None (default) keeps the output gate silu(x W_g) bias-free, as before; a
        float b gives it a learnable per-channel bias starting at b, silu(x W_g + b_g), so the
        gate starts open (silu(1) = 0.73) instead of a random +-0.08 that scrambles the read's
        direction before W_o (module notes; decisions.md #32).
    """

    memory_hidden: int = 0
    chunk_memory: int = 64
    chunk_other: int = 8
    conv_width: int = 4
    eta_max: float = 0.1
    memory_eta_scale: float = 100.0
    memory_self_target: bool = False
    inner_rule: str = "delta"
    reflect: bool = False
    dgd: bool = True
    momentum: bool = True
    weight_decay: bool = True
    stop_grad: bool = False
    static_k: bool = False
    static_v: bool = False
    adaptive_q: bool = False
    normalize_v: bool = True
    normalize_target: bool = True
    separate_conv: bool = True
    ema_momentum: bool = True
    memory_init_scale: float = 0.5
    retention_init: float = RETENTION_INIT
    key_shift: bool = True
    q_identity: bool = True
    memory_form: str = "linear"
    memory_impl: str = "auto"
    memory_path: str = "dual"
    memory_read: str = "online"
    remat_group: int = 0
    norm_eps: float = 1e-6
    memory_dtype: str = "float32"
    out_gate_bias: float | None = None
    # No __post_init__ here: HopeConfig validates through ModelConfig's (which calls
    # validate_fields from HopeConfig.validate); a mixin's would shadow it in the MRO.


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelfModifyingConfig(SelfModifyingFields):
    """Hyper-parameters of one self-modifying Titans layer: ``SelfModifyingFields`` plus

    Attributes:
      d_model, n_heads: D and H; every memory acts on a head slice of K = D / H.
      dtype, param_dtype: compute / parameter dtypes ("float64" is accepted for the exactness
        tests).
    """

    d_model: int = 512
    n_heads: int = 8
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        validate_fields(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        return self.memory_hidden or self.head_dim

    @property
    def coupled(self) -> tuple[str, ...]:
        """Names of the memories that share C_other, in their order along the stacked axis."""
        return (("q",) if self.adaptive_q else ()) + (() if self.static_k else ("k",)) + (
            () if self.static_v else ("v",)) + ("eta", "alpha")

    @property
    def conv_groups(self) -> int:
        """Conv tap sets: one for q and the static projections, one per coupled memory."""
        return 1 + len(self.coupled) if self.separate_conv else 1

    @property
    def rule(self) -> nm.Rule:
        if not self.dgd:
            return nm.Rule(momentum=self.momentum, dgd=False)
        if self.inner_rule == "dgd":
            return nm.Rule(momentum=self.momentum, dgd=True)
        return nm.Rule(momentum=self.momentum, dgd=True, dgd_all_layers=True,
                       delta=self.inner_rule == "delta", reflect=self.reflect)


def validate_fields(cfg) -> None:
    """Checks shared by SelfModifyingConfig and HopeConfig; errors name the field and the fix."""
    check_positive(cfg, "d_model", "n_heads", "chunk_memory", "chunk_other", "conv_width")
    if cfg.d_model % cfg.n_heads:
        fail("d_model", cfg.d_model, f"must be divisible by n_heads={cfg.n_heads}: every memory "
             f"acts on a head slice of d_model / n_heads; pick a multiple of {cfg.n_heads}")
    if not isinstance(cfg.memory_hidden, int) or cfg.memory_hidden < 0:
        fail("memory_hidden", cfg.memory_hidden, "must be an int >= 0 (0 means d_model / n_heads)")
    if not (isinstance(cfg.eta_max, (int, float)) and 0 <= cfg.eta_max <= ETA_MAX_LIMIT):
        fail("eta_max", cfg.eta_max, f"must lie in [0, {ETA_MAX_LIMIT}] (the default is "
             f"{SelfModifyingConfig.eta_max})")
    if not (isinstance(cfg.memory_eta_scale, (int, float)) and cfg.memory_eta_scale >= 0):
        fail("memory_eta_scale", cfg.memory_eta_scale, "must be a float >= 0 (M_memory's eta is "
             "memory_eta_scale * the coupled memories' eta; freeze every memory with eta_max=0)")
    if cfg.inner_rule == "dgd" and cfg.dgd and cfg.eta_max * max(1, cfg.memory_eta_scale) > 1:
        name = "eta_max" if cfg.eta_max > 1 else "memory_eta_scale"
        fail(name, getattr(cfg, name), "must keep every memory's eta bound (eta_max, and eta_max "
             "* memory_eta_scale for M_memory) <= 1 with inner_rule='dgd': its l2 write decays "
             "along k twice and diverges at large eta; use inner_rule='delta' for larger steps")
    if not (cfg.eta_max * cfg.memory_eta_scale <= ETA_MAX_LIMIT):
        fail("memory_eta_scale", cfg.memory_eta_scale, f"gives M_memory an eta bound eta_max * "
             f"memory_eta_scale = {cfg.eta_max * cfg.memory_eta_scale:g} above {ETA_MAX_LIMIT}; "
             "lower it")
    if not (isinstance(cfg.memory_init_scale, (int, float)) and cfg.memory_init_scale >= 0):
        fail("memory_init_scale", cfg.memory_init_scale, "must be a float >= 0 (0: identity "
             "memories at init, whose self-generated targets give no signal)")
    if not (isinstance(cfg.retention_init, (int, float)) and 0 < cfg.retention_init < 1):
        fail("retention_init", cfg.retention_init, "must lie strictly between 0 and 1 (alpha at "
             "init; the gate's bias is its logit); fix alpha = 1 with weight_decay=False")
    for name in ("dgd", "momentum", "weight_decay", "stop_grad", "static_k", "static_v",
                 "adaptive_q", "normalize_v", "normalize_target", "separate_conv",
                 "ema_momentum", "memory_self_target", "reflect", "key_shift", "q_identity"):
        if not isinstance(getattr(cfg, name), bool):
            fail(name, getattr(cfg, name), "must be a bool")
    if cfg.reflect and not (cfg.dgd and cfg.inner_rule in ("delta", "dgd_all")):
        fail("reflect", cfg.reflect, "doubles the Sherman-Morrison step of inner_rule='delta' or "
             "'dgd_all' with dgd=True; set those or leave reflect=False")
    check_choice(cfg, "memory_form", MEMORY_FORMS)
    check_choice(cfg, "memory_impl", MEMORY_IMPLS)
    check_choice(cfg, "memory_path", PATHS)
    check_choice(cfg, "memory_read", READS)
    check_choice(cfg, "inner_rule", INNER_RULES)
    if not isinstance(cfg.remat_group, int) or cfg.remat_group < -1:
        fail("remat_group", cfg.remat_group,
             "must be an int: 0 (sqrt of the chunk count), -1 (off) or a segment length >= 1")
    if not cfg.norm_eps > 0:
        fail("norm_eps", cfg.norm_eps, "must be positive")
    b = cfg.out_gate_bias
    if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float))
                          or not math.isfinite(b)):
        fail("out_gate_bias", b, "must be None (a bias-free output gate) or a finite float, the "
             "gate bias's initial value (e.g. 1.0: the gate starts open)")
    for name in ("dtype", "param_dtype", "memory_dtype"):
        check_choice(cfg, name, DTYPES + ("float64",))  # float64: the exactness tests


class LayerState(NamedTuple):
    """Decode state of one layer (decision #17): constant size, whatever the position.

    conv: [B, W-1, D] the last W-1 inputs (compute dtype).
    coupled: StreamState of M_k, M_v, M_eta, M_alpha stacked as N*H heads, leaves [B, N*H, ...].
    memory: StreamState of M_memory, leaves [B, H, ...].
    """

    conv: jax.Array
    coupled: nm.StreamState
    memory: nm.StreamState


def segment_length(n_chunks: int, remat_group: int) -> int:
    """Chunks per rematerialised segment of the coupled scan (``remat_group``, 0 = auto).

    Auto minimises (padded chunks computed) + (states stored by the backward pass: one per
    segment plus one per chunk of the segment being recomputed), i.e. a length near sqrt(n), so
    the backward pass stores O(sqrt(n)) memory states instead of n.
    """
    if remat_group == -1 or n_chunks <= 1:
        return max(n_chunks, 1)
    if remat_group > 0:
        return min(remat_group, n_chunks)
    root = math.sqrt(n_chunks)
    candidates = range(max(1, int(root / 2)), int(2 * root) + 2)
    cost = lambda g: -(-n_chunks // g) * (g + 1) + g
    return min(candidates, key=lambda g: (cost(g), abs(g - root)))


def _conv_init(key, shape, dtype=jnp.float32):
    """Depthwise conv taps [W, G, D]: identity at the current token (last tap) plus N(0, 0.02)."""
    w = 0.02 * jax.random.normal(key, shape, dtype)
    return w.at[-1].add(jnp.ones((), dtype))


class SelfModifyingTitans(nnx.Module):
    """The self-modifying Titans layer: ``layer(x_BxTxD) -> y_BxTxD`` for a pre-normed x.

    Outer (nnx.Param) parameters: conv taps, W_q (+ W_k / W_v under the static ablations), the
    meta-learned initial states of every memory, the gate read-outs, the output norm, W_g, W_o.
    """

    def __init__(self, cfg: SelfModifyingConfig, *, out_std: float, rngs: nnx.Rngs):
        self.cfg = cfg
        D, H, K, F, N = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.hidden, len(cfg.coupled)
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dt, param_dtype=pdt, rngs=rngs)
        conv = _conv_init(rngs.params(), (cfg.conv_width, cfg.conv_groups, D), pdt)
        if cfg.key_shift and "k" in cfg.coupled and cfg.separate_conv and cfg.conv_width > 1:
            # k's own group (group 0 serves q) moves its identity tap to token t - 1
            g = 1 + cfg.coupled.index("k")
            conv = conv.at[-1, g].add(-1.0).at[-2, g].add(1.0)
        self.conv = nnx.Param(conv, logical_axes=(None, None, "embed"))
        self.q_proj = layers.dense(D, D, ("embed", "heads"), std=0.02, **kw)
        if cfg.q_identity and not cfg.adaptive_q:
            self.q_proj.kernel[...] = self.q_proj.kernel[...] + jnp.eye(D, dtype=pdt)
        proj = lambda: layers.dense(D, D, ("embed", "heads"), std=0.02, **kw)
        self.k_proj = proj() if cfg.static_k else None  # "k static" ablation
        self.v_proj = proj() if cfg.static_v else None  # "v static" ablation
        mem = self.memory_module
        def init_one(key):
            # MLPMemory.init: W2 ~ N(0, 1/K), W1 = 0 (identity).  W1 gets N(0, s^2/F) instead:
            # with identity memories k = l2(M_k(x)) and v = l2(M_v(x)) would coincide and every
            # self-generated target error M(k) - M(v) would vanish.
            k2, k1 = jax.random.split(key)
            p = mem.init(k2, pdt)
            p["W1"] = cfg.memory_init_scale / math.sqrt(F) * jax.random.normal(k1, (K, F), pdt)
            return p

        coupled = jax.vmap(init_one)(jax.random.split(rngs.params(), N * H))
        memory_key = rngs.params()
        axes = ("heads", None, None)
        # Meta-learned initial states: W2 [.., F, K] input side, W1 [.., K, F] output side.
        self.coupled_w1 = nnx.Param(coupled["W1"].reshape(N, H, K, F), logical_axes=(None, *axes))
        self.coupled_w2 = nnx.Param(coupled["W2"].reshape(N, H, F, K), logical_axes=(None, *axes))
        if cfg.memory_form == "linear":  # the delta rule's state: empty until the first write
            self.memory_w = nnx.Param(jnp.zeros((H, K, K), pdt), logical_axes=axes)
        else:
            memory = jax.vmap(init_one)(jax.random.split(memory_key, H))
            self.memory_w1 = nnx.Param(memory["W1"], logical_axes=axes)
            self.memory_w2 = nnx.Param(memory["W2"], logical_axes=axes)
        # Gate read-outs (decision #7): one scalar per head and token from a memory's output.
        self.gate_w = nnx.Param(0.02 * jax.random.normal(rngs.params(), (3, H, K), pdt),
                                logical_axes=(None, "heads", None))
        r = cfg.retention_init
        bias = jnp.asarray([math.log(r / (1 - r)) if g == "alpha" else GATE_BIAS_INIT[g]
                            for g in GATES], pdt)
        self.gate_b = nnx.Param(jnp.broadcast_to(bias[:, None], (3, H)),
                                logical_axes=(None, "heads"))
        self.out_norm = nnx.RMSNorm(K, epsilon=cfg.norm_eps, dtype=jnp.dtype(cfg.memory_dtype),
                                    param_dtype=pdt,
                                    scale_init=layers.param_init(nnx.initializers.ones, None),
                                    rngs=rngs)
        self.gate_proj = layers.dense(D, D, ("embed", "heads"), std=0.02, **kw)
        self.gate_bias = None if cfg.out_gate_bias is None else nnx.Param(
            jnp.full((D,), cfg.out_gate_bias, pdt), logical_axes=("heads",))
        self.o_proj = layers.dense(D, D, ("heads", "embed"), std=out_std, **kw)

    # ---- levels -------------------------------------------------------------------------------

    @property
    def memory_module(self) -> nm.MLPMemory:
        return nm.MLPMemory(self.cfg.head_dim, self.cfg.head_dim, hidden=self.cfg.hidden)

    @property
    def output_memory(self) -> nm.MLPMemory | nm.LinearMemory:
        """M_memory's form (``memory_form``); the coupled memories' is ``memory_module``."""
        if self.cfg.memory_form == "linear":
            return nm.LinearMemory(self.cfg.head_dim, self.cfg.head_dim)
        return self.memory_module

    def level(self, read: str) -> nm.Level:
        """read="boundary": the coupled memories; "online"/"prior": M_memory."""
        self_target = read == "boundary" or self.cfg.memory_self_target
        module = self.memory_module if read == "boundary" else self.output_memory
        return nm.Level(module, "l2", self.cfg.rule, read, stop_grad=self.cfg.stop_grad,
                        self_target=self_target,
                        normalize_target=self_target and self.cfg.normalize_target)

    def _memory_gates(self, gates: nm.Gates) -> nm.Gates:
        """M_memory's gates: the coupled memories' with eta scaled by ``memory_eta_scale``."""
        return gates._replace(eta=gates.eta * self.cfg.memory_eta_scale)

    def initial_states(self, batch_size: int) -> tuple[nm.MemoryState, nm.MemoryState]:
        """(coupled [B, N*H, ...], memory [B, H, ...]) MemoryStates from the meta-learned inits."""
        N, H, K, F = len(self.cfg.coupled), self.cfg.n_heads, self.cfg.head_dim, self.cfg.hidden
        mdt = jnp.dtype(self.cfg.memory_dtype)
        cast = lambda p: p[...].astype(mdt)

        def state(params):
            st_H = nm.MemoryState(params, jax.tree.map(jnp.zeros_like, params))
            return nm.broadcast_state(st_H, batch_size)

        coupled = {"W1": cast(self.coupled_w1).reshape(N * H, K, F),
                   "W2": cast(self.coupled_w2).reshape(N * H, F, K)}
        memory = ({"W": cast(self.memory_w)} if self.cfg.memory_form == "linear" else
                  {"W1": cast(self.memory_w1), "W2": cast(self.memory_w2)})
        return state(coupled), state(memory)

    # ---- pieces shared by the parallel and the decode paths --------------------------------------

    def _conv(self, x_BxTxD: jax.Array, prev_BxPxD: jax.Array, docs=None) -> jax.Array:
        """Causal depthwise convs [B, T, G, D]; prev holds the W-1 inputs before x (zeros at the
        start).  G = ``conv_groups``: every group shares the input window, its taps are its own.
        With ``docs`` a tap outside token t's document reads zero, as before a document alone."""
        T, W = x_BxTxD.shape[1], self.cfg.conv_width
        w_WxGxD = self.conv[...].astype(x_BxTxD.dtype)
        xp = jnp.concatenate([prev_BxPxD.astype(x_BxTxD.dtype), x_BxTxD], axis=1)[:, :, None]
        tap = lambda j: xp[:, j:j + T]
        if docs is not None:  # tap j reads token t - (W - 1 - j); the last (j = W - 1) is t
            tap = lambda j: xp[:, j:j + T] if j == W - 1 else jnp.where(
                documents.same_document(docs, W - 1 - j)[:, :, None, None], xp[:, j:j + T], 0)
        y = tap(0) * w_WxGxD[0][None, None]
        for j in range(1, W):
            y = y + tap(j) * w_WxGxD[j][None, None]
        return y

    def _coupled_inputs(self, xc_BxTxGxD: jax.Array) -> jax.Array:
        """Each coupled memory's input, [B, T, N, H, K]: its own conv group (or the shared one)."""
        B, T, G, D = xc_BxTxGxD.shape
        N, H, K = len(self.cfg.coupled), self.cfg.n_heads, self.cfg.head_dim
        x = xc_BxTxGxD[:, :, 1:] if G > 1 else jnp.broadcast_to(xc_BxTxGxD, (B, T, N, D))
        return x.reshape(B, T, N, H, K)

    def _heads(self, x_BxTxD: jax.Array) -> jax.Array:
        B, T, _ = x_BxTxD.shape
        return x_BxTxD.reshape(B, T, self.cfg.n_heads, self.cfg.head_dim)

    def _read_coupled(self, params, x_BxCxNxHxK: jax.Array) -> jax.Array:
        """M_□,boundary(x_□,t) for every coupled memory □: [B, C, N, H, K] (MLPMemory.apply)."""
        B, C, N, H, K = x_BxCxNxHxK.shape
        act = activation(self.memory_module.activation)
        w2 = params["W2"].reshape(B, N, H, -1, K)
        w1 = params["W1"].reshape(B, N, H, K, -1)
        z = jnp.einsum("bnhfk,bcnhk->bcnhf", w2, x_BxCxNxHxK)
        y = jnp.einsum("bnhkf,bcnhf->bcnhk", w1, act(z))
        return x_BxCxNxHxK + y

    def _generate(self, y_BxCxNxHxK, k_BxCxHxK, v_BxCxHxK):
        """q (adaptive only), k, v and Gates from the boundary read-outs (eqs. 76-79, #7)."""
        out = {name: y_BxCxNxHxK[:, :, i] for i, name in enumerate(self.cfg.coupled)}
        mdt = y_BxCxNxHxK.dtype
        k = layers.l2_normalize(out["k"]) if "k" in out else k_BxCxHxK
        v = out["v"] if "v" in out else v_BxCxHxK
        v = layers.l2_normalize(v) if self.cfg.normalize_v else v
        w_3xHxK, b_3xH = self.gate_w[...].astype(mdt), self.gate_b[...].astype(mdt)
        logit = {g: jnp.einsum("bchk,hk->bch", out[GATE_SOURCE[g]], w_3xHxK[i])
                 + b_3xH[i][None, None] for i, g in enumerate(GATES)}
        eta = self.cfg.eta_max * jax.nn.sigmoid(logit["eta"])
        alpha = jax.nn.sigmoid(logit["alpha"]) if self.cfg.weight_decay else jnp.ones_like(eta)
        beta = jax.nn.sigmoid(logit["beta"])
        if self.cfg.momentum and self.cfg.ema_momentum:
            eta = eta * (1.0 - beta)  # momentum-amplified step eta / (1 - beta) <= eta_max
        q = layers.l2_normalize(out["q"]) if "q" in out else None
        return q, k, v, nm.Gates(eta, alpha, beta)

    def _tile(self, x_BxCxHx):
        """Repeat for the N stacked coupled memories: [B, C, H, ...] -> [B, C, N*H, ...]."""
        N = len(self.cfg.coupled)
        return jnp.concatenate([x_BxCxHx] * N, axis=2)

    def _static(self, xc_BxTxD: jax.Array, mdt) -> dict:
        """Non-adaptive projections: q (unless adaptive) and the static-k/v ablations."""
        out = {}
        if not self.cfg.adaptive_q:
            out["q"] = layers.l2_normalize(self._heads(self.q_proj(xc_BxTxD)).astype(mdt))
        if self.cfg.static_k:
            out["k"] = layers.l2_normalize(self._heads(self.k_proj(xc_BxTxD)).astype(mdt))
        if self.cfg.static_v:
            out["v"] = self._heads(self.v_proj(xc_BxTxD)).astype(mdt)
        return out

    def _output(self, o_BxTxHxK: jax.Array, x_BxTxD: jax.Array) -> jax.Array:
        """W_o (RMSNorm(o) * silu(x W_g)): per-head norm, output gate, projection."""
        B, T, D = x_BxTxD.shape
        o = self.out_norm(o_BxTxHxK).astype(x_BxTxD.dtype).reshape(B, T, D)
        g = self.gate_proj(x_BxTxD)
        if self.gate_bias is not None:
            g = g + self.gate_bias[...].astype(g.dtype)[None, None]
        return self.o_proj(o * jax.nn.silu(g))

    # ---- parallel (training) path ------------------------------------------------------------

    def _coupled_chunk(self, state: nm.MemoryState, xs: dict, init=None):
        """Advance the coupled memories by one C_other-chunk (or the ragged tail).

        xs: {"x": [B, C, N, H, K]} (+ static "k" / "v", + "reset" bool [B, C] with documents:
        a row whose chunk starts a document starts it from ``init``). Returns (state, (q, k, v,
        Gates)).
        """
        if "reset" in xs:  # before the boundary read: the chunk's k, v, gates come from it
            state = restart(xs["reset"][:, 0], init, state)
        q, k, v, gates = self._generate(self._read_coupled(state.params, xs["x"]),
                                        xs.get("k"), xs.get("v"))
        tile = self._tile
        B, C = xs["x"].shape[:2]
        x_stacked = xs["x"].reshape(B, C, -1, xs["x"].shape[-1])  # [B, C, N*H, K], N-major
        _, state = nm.apply(self.level("boundary"), state, x_stacked, tile(k), tile(v),
                            nm.Gates(*map(tile, gates)), chunk_size=self.cfg.chunk_other,
                            path=self.cfg.memory_path, remat=False)  # _scan_coupled remats
        return state, (q, k, v, gates)

    def _scan_coupled(self, state: nm.MemoryState, xs: dict):
        """The coupled scan over C_other-chunks, rematerialised in segments (``remat_group``).

        xs leaves are [B, T', ...] with T' = n * C_other, n = (number of segments) * (segment
        length) (see ``_padded_len``).  Returns the final state and (q, k, v, Gates) [B, T', ...].
        ``state`` is the initial state, where document starts (xs["reset"]) return to.
        """
        C = self.cfg.chunk_other
        n = xs["x"].shape[1] // C
        group = segment_length(n, self.cfg.remat_group)

        def split(x):  # [B, n*C, ...] -> [n/group, group, B, C, ...]
            x = x.reshape(x.shape[0], n // group, group, C, *x.shape[2:])
            return jnp.moveaxis(x, 0, 2)

        def merge(y):  # [n/group, group, B, C, ...] -> [B, n*C, ...]
            y = jnp.moveaxis(y, 2, 0)
            return y.reshape(y.shape[0], n * C, *y.shape[4:])

        def segment(st, ys):
            return jax.lax.scan(lambda s, y: self._coupled_chunk(s, y, state), st, ys)

        if group < n:
            segment = jax.checkpoint(segment)
        state, outs = jax.lax.scan(segment, state, jax.tree.map(split, xs))
        return state, jax.tree.map(merge, outs)

    def _padded_len(self, T: int) -> int:
        """T rounded up to whole C_other-chunks and whole remat segments of chunks."""
        C = self.cfg.chunk_other
        n = -(-T // C)
        group = segment_length(n, self.cfg.remat_group)
        return -(-n // group) * group * C

    def __call__(self, x_BxTxD: jax.Array, docs: documents.Documents | None = None) -> jax.Array:
        """The layer over a whole sequence; x is the block's pre-normed input.

        A sequence that does not fill its last chunk is padded at the end: the layer is causal
        (every output reads only the boundary state and earlier tokens of its chunk), so padded
        positions change no real output; they are sliced off.  This keeps one traced chunk body
        per level (no separate ragged-tail program).

        ``docs`` (packed rows): the convs see only their own document, and all five memories
        return to their initial states at every document start (a multiple of C_other and
        C_memory: ``models/documents.py``).
        """
        B, T, D = x_BxTxD.shape
        cfg = self.cfg
        mdt = jnp.dtype(cfg.memory_dtype)
        prev = jnp.zeros((B, cfg.conv_width - 1, D), x_BxTxD.dtype)
        xc_BxTxGxD = self._conv(x_BxTxD, prev, docs)
        Tc = self._padded_len(T)
        Tm = -(-T // cfg.chunk_memory) * cfg.chunk_memory
        pad = lambda a, n: jnp.pad(a, [(0, 0), (0, n - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
        xc_pad = pad(xc_BxTxGxD, Tc)
        static = self._static(xc_pad[:, :, 0], mdt)
        coupled0, memory0 = self.initial_states(B)
        xs = {"x": self._coupled_inputs(xc_pad).astype(mdt),
              **{n: static[n] for n in ("k", "v") if n in static}}
        if docs is not None:
            xs["reset"] = pad(docs.starts, Tc)
        # Named scopes tag these ops in profiles (experiments/gpu_models.py sorts kernel time
        # by them); they change no numbers.
        with jax.named_scope(SCOPE_COUPLED):
            _, (q, k, v, gates) = self._scan_coupled(coupled0, xs)
        q = static.get("q", q)
        # M_memory: the real tokens, then no-op updates (eta = 0, alpha = 1, beta = 0) to Tm.
        fit = lambda a: pad(a[:, :T], Tm)
        noop = lambda a, value: a[:, :T] if Tm == T else jnp.concatenate(
            [a[:, :T], jnp.full((B, Tm - T, *a.shape[2:]), value, a.dtype)], axis=1)
        gates = self._memory_gates(gates)
        gates = nm.Gates(noop(gates.eta, 0.0), noop(gates.alpha, 1.0), noop(gates.beta, 0.0))
        resets = {} if docs is None else {"resets": fit(docs.starts)}
        with jax.named_scope(SCOPE_MEMORY):
            o_BxTxHxK, _ = nm.apply(self.level(cfg.memory_read), memory0, fit(q), fit(k), fit(v),
                                    gates, chunk_size=cfg.chunk_memory, **resets,
                                    **memory_route(cfg.memory_form == "linear", cfg.memory_impl,
                                                   cfg.memory_path))
        return layers.shard_batch(self._output(o_BxTxHxK[:, :T], x_BxTxD))

    # ---- streaming (decode) path --------------------------------------------------------------

    def init_state(self, batch_size: int) -> LayerState:
        cfg = self.cfg
        coupled0, memory0 = self.initial_states(batch_size)
        conv = jnp.zeros((batch_size, cfg.conv_width - 1, cfg.d_model), jnp.dtype(cfg.dtype))
        return LayerState(conv, nm.stream_init(coupled0), nm.stream_init(memory0))

    def decode_step(self, state: LayerState, x_BxD: jax.Array) -> tuple[jax.Array, LayerState]:
        """One token per sequence (pre-normed x) -> (y_BxD, next state); O(1) in the position."""
        cfg = self.cfg
        mdt = jnp.dtype(cfg.memory_dtype)
        x_Bx1xD = x_BxD[:, None]
        xc_Bx1xGxD = self._conv(x_Bx1xD, state.conv)
        conv = jnp.concatenate([state.conv, x_Bx1xD.astype(state.conv.dtype)], axis=1)[:, 1:]
        static = self._static(xc_Bx1xGxD[:, :, 0], mdt)
        xh_Bx1xNxHxK = self._coupled_inputs(xc_Bx1xGxD).astype(mdt)
        y = self._read_coupled(state.coupled.boundary, xh_Bx1xNxHxK)
        q, k, v, gates = self._generate(y, static.get("k"), static.get("v"))
        q = static.get("q", q)
        first = lambda a: a[:, 0]
        tile = lambda a: first(self._tile(a))
        x_stacked = first(xh_Bx1xNxHxK).reshape(x_BxD.shape[0], -1, cfg.head_dim)
        _, coupled = nm.stream_step(self.level("boundary"), state.coupled, x_stacked,
                                    tile(k), tile(v), nm.Gates(*map(tile, gates)),
                                    chunk_size=cfg.chunk_other)
        o_BxHxK, memory = nm.stream_step(self.level(cfg.memory_read), state.memory, first(q),
                                         first(k), first(v),
                                         self._memory_gates(nm.Gates(*map(first, gates))),
                                         chunk_size=cfg.chunk_memory)
        y_BxD = self._output(o_BxHxK[:, None], x_Bx1xD)[:, 0]
        return y_BxD, LayerState(conv, coupled, memory)

    # ---- cost -----------------------------------------------------------------------------------

    def inner_flops_per_token(self) -> float:
        """Forward FLOPs per token of the inner loop (an estimate; projections are in 6 N).

        Per memory, head and token (F hidden, K head dim, C chunk): the boundary read M(x) of a
        coupled memory (4KF) or the read M(q) of M_memory (4KF), the target M(v) and M(k) at the
        boundary (8KF), the hidden error W1^T u (2KF), and per matrix the dual-form chunk
        (decision #6 note): ~6KF for the state and read-outs plus ~4C(K+F) for the C x C parts.
        """
        cfg = self.cfg
        H, K, F, N = cfg.n_heads, cfg.head_dim, cfg.hidden, len(cfg.coupled)

        def one(C):
            return 14.0 * K * F + 2 * (6.0 * K * F + 4.0 * C * (K + F))

        # A linear M_memory: the read and the target (2 x 2K^2), one matrix's chunk work.
        linear = 4.0 * K * K + 6.0 * K * K + 8.0 * cfg.chunk_memory * K
        memory = linear if cfg.memory_form == "linear" else one(cfg.chunk_memory)
        return N * H * one(cfg.chunk_other) + H * memory
