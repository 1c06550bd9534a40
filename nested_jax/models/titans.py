"""TitansLM, the LMM variant: a neural memory with momentum and weight decay per block (paper §3).

Block (decisions.md #7, #11; Titans §3-§4):

    h = RMSNorm(x)
    q, k, v = causal depthwise conv_4(h W_q | h W_k | h W_v), SiLU, per head; q, k l2-normalised
    eta = eta_max sigmoid(h w_eta), alpha = sigmoid(h w_alpha), beta = sigmoid(h w_beta)  (per head)
    o = M(q) with M updated in context by the engine (rule TITANS: momentum + retention):
        S_t = beta_t S_{t-1} - eta_t grad ||M(k_t) - v_t||^2 / 2,   M_t = alpha_t M_{t-1} + S_t
    x = x + W_o (RMSNorm_head(o) * SiLU(h W_g));   x = x + SwiGLU(RMSNorm(x))

M is the engine's 2-layer residual ``MLPMemory`` (config: linear memory, other rules, depth) with a
meta-learned per-head initial state (``nnx.Param`` [H, ...]; outer gradients flow through every
inner update, decision #4).  Chunks of ``chunk_size`` tokens run the engine's "dual" path (gradients
at the chunk boundary, decision #2).  A linear memory runs the engine's "pallas" path (the
Pallas kernels where the backend has one) unless ``memory_impl="xla"``.  No self-modification,
no persistent tokens: the paper's LMM.
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
from nested_jax.models import documents, layers
from nested_jax.models.config import MEMORY_IMPLS, ModelConfig, Preset, memory_route
from nested_jax.models.lm import LanguageModel
from nested_jax.models.registry import register

RULES = {"titans": nm.TITANS, "gd": nm.GD, "dgd": nm.DGD,
         "dgd_all": nm.Rule(momentum=True, dgd=True, dgd_all_layers=True), "delta": nm.DELTA}


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TitansConfig(ModelConfig):
    """TitansLM hyper-parameters (fields of ``ModelConfig`` plus these).

    Attributes:
      d_ff: SwiGLU width; 0 means 8/3 * d_model rounded up to a multiple of 256.
      memory: "mlp" (Titans' deep memory) or "linear" (matrix memory, the ablation row).
      memory_hidden: hidden width of the MLP memory per head; 0 means 2 * head_dim.
      memory_depth: layers of the MLP memory (>= 2; 2 is residual z + W1 s(W2 z)).
      rule: inner update rule: "titans" (momentum + weight decay), "gd", "dgd", "dgd_all", or
        "delta" (Hope's delta-form DGD, ``memory.DELTA``).
      objective: inner objective, "l2" (||M(k) - v||^2) or "dot".
      chunk_size: tokens per chunk of the memory (gradients at the chunk boundary).
      memory_path: engine path, "dual" (matmul form) or "chunked" (generic, any memory).
      memory_read: "online" (o_t = M_t(q_t), after token t's write; default) or "prior"
        (o_t = M_{t-1}(q_t), the strictly causal read, decisions.md #20).
      memory_impl: linear memory only: the kernels' ``impl`` on the engine's "pallas" path
        ("auto", "pallas", "interpret"), or "xla" to run ``memory_path`` instead.
      conv_width: causal depthwise convolution width on q, k, v.
      eta_max: bound of the inner learning rate, eta = eta_max * sigmoid(.) (decision #7); 0
        switches the memory's writes off (with alpha = 1 the network is then static).  Stale
        chunk gradients with momentum amplify the step: at chunk 64, beta 0.9, the tiny MLP
        memory diverged from eta = 0.05 on, hence the bound 0.1 and the init 0.01.
      normalized_step: normalised LMS for the whole memory (``Rule.normalized``): every matrix
        steps with eta / (1 + eta G), G = ``memory.write_gain(M_b, k)`` >= ||J J^T|| for the
        Jacobian J of M(k) in all its matrices, so no write moves M(k) past its target however
        large the layers grow (DGD rules have their own per-layer step and ignore this).
        Within a chunk, whose writes all take their error at the boundary, each step also
        divides by the gain the chunk's earlier tokens spent (``Level.chunk_steps``, decisions
        #30), so the chunk's writes together cannot overshoot either.
      ema_momentum: eta carries a factor (1 - beta), so a write's total effect through the
        momentum, eta / (1 - beta), stays eta_max-bounded.
        Both are on by default (decisions #19).  Without them the MLP memory's forward pass
        diverged on MQAR within ~130 steps (state 1e24, hidden by the per-head output norm until
        the backward pass overflowed); normalising each matrix by its own input alone was not
        enough: the input-side step is amplified by ||W1 diag(s')||^2, and on MAD recall W2
        still reached 4e30 (tests/memory/test_write_gain.py shows the contrast).
      eta_init, alpha_init, beta_init: gate values at initialisation (set through the biases).
      stop_grad: engine ablation: outer gradients skip the inner updates (decision #4).
      induction_init: start the block as an induction read, as Hope's layer does (decisions.md
        #24): k's conv taps start on the previous token (identity tap at t - 1) and W_k starts
        equal to W_q, so k_t ~ f(x_{t-1}), q_t ~ f(x_t) in the same coordinates and v_t ~ x_t:
        the memory stores transitions and its read at x_t is what followed x_t before.  Off by
        default (Titans' random, independent q, k, v); everything stays learnable.
      norm_eps: RMSNorm epsilon.
      remat: rematerialize each block in the backward pass.
    """

    d_ff: int = 0
    memory: str = "mlp"
    memory_hidden: int = 0
    memory_depth: int = 2
    rule: str = "titans"
    objective: str = "l2"
    chunk_size: int = 64
    memory_path: str = "dual"
    memory_read: str = "online"
    memory_impl: str = "auto"
    conv_width: int = 4
    eta_max: float = 0.1
    eta_init: float = 0.1
    normalized_step: bool = True
    ema_momentum: bool = True
    alpha_init: float = 0.99
    beta_init: float = 0.9
    stop_grad: bool = False
    induction_init: bool = False
    norm_eps: float = 1e-6
    remat: bool = False

    PRESETS = {
        # d_ff is smaller than Transformer++'s: the block has 5 D^2 projections (q, k, v, gate,
        # out) instead of 4, plus the memory's initial state, at about the same total size.
        "tiny": Preset(0.12e6, dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128,
                                    max_seq_len=256, chunk_size=8)),
        "small": Preset(23e6, dict(d_model=384, n_layers=6, n_heads=6, d_ff=768,
                                   max_seq_len=1024)),
        "125M": Preset(125e6, dict(d_model=768, n_layers=12, n_heads=12, d_ff=2048,
                                   max_seq_len=4096)),
        "340M": Preset(340e6, dict(d_model=1024, n_layers=24, n_heads=16, d_ff=2304,
                                   max_seq_len=4096)),
        "760M": Preset(760e6, dict(d_model=1536, n_layers=24, n_heads=12, d_ff=3584,
                                   max_seq_len=4096)),
        "1.3B": Preset(1.3e9, dict(d_model=2048, n_layers=24, n_heads=16, d_ff=4864,
                                   max_seq_len=4096)),
    }

    def validate(self) -> None:
        super().validate()
        check_positive(self, "chunk_size", "conv_width", "memory_depth")
        check_choice(self, "memory", ("mlp", "linear"))
        check_choice(self, "rule", tuple(RULES))
        check_choice(self, "objective", ("l2", "dot"))
        check_choice(self, "memory_path", ("dual", "chunked"))
        check_choice(self, "memory_read", ("online", "prior"))
        check_choice(self, "memory_impl", MEMORY_IMPLS)
        if self.d_ff < 0:
            fail("d_ff", self.d_ff, "must be >= 0 (0 picks 8/3 * d_model rounded to 256)")
        if self.memory_hidden < 0:
            fail("memory_hidden", self.memory_hidden, "must be >= 0 (0 picks 2 * head_dim)")
        if self.memory_depth < 2 and self.memory == "mlp":
            fail("memory_depth", self.memory_depth, "an MLP memory needs >= 2 layers; "
                 "use memory='linear' for one")
        if self.memory_path == "dual" and self.memory == "mlp" and self.memory_depth != 2:
            fail("memory_path", self.memory_path, "the dual path supports 2-layer MLP memories; "
                 "use memory_path='chunked' for deeper ones")
        if self.chunk_size > self.max_seq_len:
            fail("chunk_size", self.chunk_size, f"exceeds max_seq_len={self.max_seq_len}; "
                 "lower chunk_size or raise max_seq_len")
        if not self.eta_max >= 0:
            fail("eta_max", self.eta_max, "must be >= 0 (0 switches the memory's writes off)")
        for name in ("normalized_step", "ema_momentum", "induction_init"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "must be a bool")
        for name in ("eta_init", "alpha_init", "beta_init"):
            if not 0.0 < getattr(self, name) < 1.0:
                fail(name, getattr(self, name), "must lie strictly between 0 and 1 "
                     "(a sigmoid gate's value at initialisation)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or layers.swiglu_width(self.d_model)

    @property
    def hidden_dim(self) -> int:
        return self.memory_hidden or 2 * self.head_dim

    def memory_module(self):
        if self.memory == "linear":
            return nm.LinearMemory(self.head_dim, self.head_dim)
        return nm.MLPMemory(self.head_dim, self.head_dim, hidden=self.hidden_dim,
                            depth=self.memory_depth, residual=True)

    def level(self) -> nm.Level:
        rule = RULES[self.rule]
        if self.normalized_step and not rule.dgd:
            rule = dataclasses.replace(rule, normalized=True)
        return nm.Level(self.memory_module(), self.objective, rule, self.memory_read,
                        self.stop_grad)


class BlockState(NamedTuple):
    """Decode state of one block: the conv window and the memory's engine stream state.

    conv: f[B, W-1, 3D] the last W-1 pre-convolution q|k|v projections.
    memory: engine StreamState, leaves [B, H, ...].
    """

    conv: jax.Array
    memory: nm.StreamState


class TitansState(NamedTuple):
    blocks: tuple[BlockState, ...]
    pos: jax.Array  # int32 scalar, tokens consumed


def causal_conv(x_BxTxC: jax.Array, w_WxC: jax.Array, prev_BxW1xC: jax.Array | None = None,
                docs: documents.Documents | None = None):
    """Depthwise causal convolution: y_t = sum_j w_j x_{t-W+1+j} (zeros, or ``prev``, before 0).
    With ``docs`` a tap outside token t's document reads zero, as before a document run alone."""
    W = w_WxC.shape[0]
    B, T, C = x_BxTxC.shape
    if prev_BxW1xC is None:
        prev_BxW1xC = jnp.zeros((B, W - 1, C), x_BxTxC.dtype)
    padded = jnp.concatenate([prev_BxW1xC.astype(x_BxTxC.dtype), x_BxTxC], axis=1)
    w = w_WxC.astype(x_BxTxC.dtype)
    tap = lambda j: padded[:, j:j + T]
    if docs is not None:  # tap j reads token t - (W - 1 - j); the last (j = W - 1) is t itself
        tap = lambda j: padded[:, j:j + T] if j == W - 1 else jnp.where(
            documents.same_document(docs, W - 1 - j)[:, :, None], padded[:, j:j + T], 0)
    out = tap(0) * w[0][None, None, :]
    for j in range(1, W):
        out = out + tap(j) * w[j][None, None, :]
    return out


class NeuralMemory(nnx.Module):
    """The Titans memory mixer of one block (module docstring); input and output f[B, T, D]."""

    def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, H, W = cfg.d_model, cfg.n_heads, cfg.conv_width
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        out_std = layers.residual_out_std(cfg.n_layers)
        self.qkv = layers.dense(D, 3 * D, ("embed", "heads"), std=0.02, **kw)
        # Identity init (last tap 1): the convolution starts as a no-op and learns its taps.
        conv = jnp.zeros((W, 3 * D), cfg.weight_dtype).at[-1].set(1.0)
        if cfg.induction_init:
            w = self.qkv.kernel[...]
            self.qkv.kernel[...] = w.at[:, D:2 * D].set(w[:, :D])  # W_k = W_q
            if W > 1:  # k's identity tap on token t - 1
                conv = conv.at[-1, D:2 * D].set(0.0).at[-2, D:2 * D].set(1.0)
        self.conv = nnx.Param(conv, logical_axes=(None, "heads"))
        self.gates = nnx.Linear(D, 3 * H, use_bias=True, dtype=self._f32(cfg.weight_dtype),
                                param_dtype=cfg.weight_dtype,
                                kernel_init=layers.param_init(layers.normal(0.02), "embed", None),
                                bias_init=self._gate_bias(cfg), rngs=rngs)
        self.out_gate = layers.dense(D, D, ("embed", "heads"), std=0.02, **kw)
        self.out = layers.dense(D, D, ("heads", "embed"), std=out_std, **kw)
        self.out_norm = nnx.Param(jnp.ones((D,), cfg.weight_dtype), logical_axes=("heads",))
        level = cfg.level()
        init_H = nm.init_state(level, rngs.params(), H, cfg.weight_dtype).params
        # Meta-learned per-head initial state of the memory (decision #4): leaves [H, ...].
        self.memory_init = nnx.Dict({k: nnx.Param(v, logical_axes=("heads", None, None))
                                     for k, v in init_H.items()})

    @staticmethod
    def _f32(dtype):
        """float32, or float64 for float64 (the exactness tests)."""
        return jnp.promote_types(dtype, jnp.float32)

    @staticmethod
    def _gate_bias(cfg: TitansConfig):
        H = cfg.n_heads
        vals = jnp.concatenate([jnp.full((H,), _logit(cfg.eta_init)),
                                jnp.full((H,), _logit(cfg.alpha_init)),
                                jnp.full((H,), _logit(cfg.beta_init))])

        def init(key, shape, dtype):
            del key
            return vals.astype(dtype).reshape(shape)

        return layers.param_init(init, None)

    def initial_state(self, batch_size: int) -> nm.MemoryState:
        params_H = {k: v[...] for k, v in self.memory_init.items()}
        state_H = nm.MemoryState(params_H, jax.tree.map(jnp.zeros_like, params_H))
        return nm.broadcast_state(state_H, batch_size)

    def _project(self, h_BxTxD, conv_prev=None, docs=None):
        """q, k, v f[B, T, H, K], gates f[B, T, H] from the normed input, and the conv tail."""
        cfg = self.cfg
        B, T, D = h_BxTxD.shape
        H, K = cfg.n_heads, cfg.head_dim
        pre = self.qkv(h_BxTxD)
        mixed = jax.nn.silu(causal_conv(pre, self.conv[...], conv_prev, docs))
        q, k, v = (z.reshape(B, T, H, K) for z in jnp.split(mixed, 3, axis=-1))
        q, k = layers.l2_normalize(q), layers.l2_normalize(k)
        gate_in = h_BxTxD.astype(self._f32(h_BxTxD.dtype))
        eta_l, alpha_l, beta_l = jnp.split(self.gates(gate_in), 3, axis=-1)
        beta = jax.nn.sigmoid(beta_l)
        eta = cfg.eta_max * jax.nn.sigmoid(eta_l)
        if cfg.ema_momentum and cfg.level().rule.momentum:
            eta = eta * (1.0 - beta)  # a write's total effect through momentum <= eta_max
        gates = nm.Gates(eta, jax.nn.sigmoid(alpha_l), beta)
        W = cfg.conv_width
        hist = pre if conv_prev is None else jnp.concatenate([conv_prev.astype(pre.dtype), pre], 1)
        if hist.shape[1] < W - 1:
            hist = jnp.concatenate([jnp.zeros((B, W - 1 - hist.shape[1], 3 * D), pre.dtype), hist],
                                   axis=1)
        return q, k, v, gates, hist[:, hist.shape[1] - (W - 1):]

    def _output(self, h_BxTxD, o_BxTxHxK):
        B, T, H, K = o_BxTxHxK.shape
        f32 = self._f32(o_BxTxHxK.dtype)
        o32 = o_BxTxHxK.astype(f32)  # per-head RMSNorm, statistics in float32
        o32 = o32 * jax.lax.rsqrt(jnp.mean(o32 * o32, axis=-1, keepdims=True) + self.cfg.norm_eps)
        o_norm = (o32.reshape(B, T, H * K) * self.out_norm[...].astype(f32)[None, None, :])
        gated = o_norm.astype(h_BxTxD.dtype) * jax.nn.silu(self.out_gate(h_BxTxD))
        return self.out(gated)

    def _run_memory(self, state, q, k, v, gates, resets=None):
        cfg = self.cfg
        level = cfg.level()
        # resets only when given: the default call stays the one without them
        extra = {} if resets is None else {"resets": resets}
        route = memory_route(cfg.memory == "linear", cfg.memory_impl, cfg.memory_path)
        return nm.apply(level, state, q, k, v, gates, chunk_size=cfg.chunk_size, **route, **extra)

    def __call__(self, h_BxTxD: jax.Array, docs: documents.Documents | None = None) -> jax.Array:
        """``docs`` (packed rows): the conv and the memory restart at every document start."""
        q, k, v, gates, _ = self._project(h_BxTxD, docs=docs)
        o, _ = self._run_memory(self.initial_state(h_BxTxD.shape[0]), q, k, v, gates,
                                None if docs is None else docs.starts)
        return layers.shard_batch(self._output(h_BxTxD, o.astype(h_BxTxD.dtype)))

    def init_state(self, batch_size: int) -> BlockState:
        cfg = self.cfg
        conv = jnp.zeros((batch_size, cfg.conv_width - 1, 3 * cfg.d_model), cfg.compute_dtype)
        return BlockState(conv, nm.stream_init(self.initial_state(batch_size)))

    def decode(self, h_Bx1xD: jax.Array, st: BlockState) -> tuple[jax.Array, BlockState]:
        q, k, v, gates, conv = self._project(h_Bx1xD, st.conv)
        o, mem = nm.stream_step(self.cfg.level(), st.memory, q[:, 0], k[:, 0], v[:, 0],
                                nm.Gates(*(g[:, 0] for g in gates)),
                                chunk_size=self.cfg.chunk_size)
        y = self._output(h_Bx1xD, o[:, None].astype(h_Bx1xD.dtype))
        return y, BlockState(conv.astype(st.conv.dtype), mem)


class Block(nnx.Module):
    def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
        out_std = layers.residual_out_std(cfg.n_layers)
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        norm = lambda: layers.rms_norm(cfg.d_model, eps=cfg.norm_eps,
                                       param_dtype=cfg.weight_dtype, rngs=rngs)
        self.mem_norm = norm()
        self.memory = NeuralMemory(cfg, rngs=rngs)
        self.mlp_norm = norm()
        self.mlp = layers.SwiGLU(cfg.d_model, cfg.ff_dim, out_std=out_std, **kw)

    def __call__(self, x_BxTxD, docs=None):
        x = x_BxTxD + self.memory(layers.apply_norm(self.mem_norm, x_BxTxD), docs)
        return x + self.mlp(layers.apply_norm(self.mlp_norm, x))

    def decode(self, x_Bx1xD, st: BlockState):
        y, st = self.memory.decode(layers.apply_norm(self.mem_norm, x_Bx1xD), st)
        x = x_Bx1xD + y
        return x + self.mlp(layers.apply_norm(self.mlp_norm, x)), st

    def init_state(self, batch_size: int) -> BlockState:
        return self.memory.init_state(batch_size)


@register("titans", TitansConfig)
class TitansLM(LanguageModel):
    """Titans (LMM) language model: ``model(tokens_BxT) -> logits_BxTxV`` (float32).

    Fixed-size decode state (``TitansState``): per block a conv window and the memory's fast
    state, so a decode step costs the same at every position.
    """

    Block = Block

    def block_state(self, state: TitansState, i: int) -> BlockState:
        return state.blocks[i]

    def pack_state(self, block_states, pos) -> TitansState:
        return TitansState(tuple(block_states), pos)

    def memory_init_params(self) -> int:
        """Parameters of the memories' meta-learned initial states (``memory_init``)."""
        return sum(int(v.size) for b in self.blocks for v in b.memory.memory_init.values())

    def memory_flops_per_token(self) -> float:
        """Inner-loop FLOPs per token (forward + backward ~ 3x forward), dual form estimate.

        Per head and token, forward: the boundary forward/backward of the memory at k and the
        read at q (~12 dk dh for the 2-layer MLP, 6 dk^2 linear) and the in-chunk triangular
        matmuls (~4 C (dk + dh), linear 4 C dk).
        """
        c = self.config
        dk, dh, C = c.head_dim, c.hidden_dim, c.chunk_size
        if c.memory == "linear":
            fwd = 6.0 * dk * dk + 4.0 * C * dk
        else:
            fwd = 12.0 * dk * dh + 4.0 * C * (dk + dh)
        return 3.0 * fwd * c.n_heads * c.n_layers

    def extra_flops(self, seq_len: int):
        """The memory's inner loop; its cost per token does not grow with the context."""
        del seq_len
        return (self.memory_flops_per_token(),)
