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
    GD step on the logit-lens next-token loss of the stream it writes.  delta_t is a
    stop-gradient constant: outer gradients do not flow through it (they do flow through the
    update's dependence on r_t and on the boundary weights).  For the last level of the last
    block, delta_t is the exact per-token gradient of the model's loss w.r.t. that level's output.
    E[x_{t+1}] = the input embedding of the next token (tied embeddings), so the targets are the
    input embeddings shifted left; the last position has no next token and is masked (eta = 0).
    ``teach_at="input"`` is the cheap option: delta_t taken once per block at the CMS input
    stream (it does not depend on any level's state), shared by all levels as the engine's plain
    "dot" target v = -delta; one V x D logit lens per block instead of one per level, outside the
    rematerialised chunk bodies.
  - "reconstruction": the l2 objective 1/2 ||y_t - RMSNorm_l(r_t)||^2 on the level's own input.
* Inner rule: GD (default; the engine's one-VJP-per-chunk boundary path), or momentum
  (``momentum > 0``: Titans momentum with constant beta).  ``retention`` alpha < 1 adds weight
  decay.
  Per-level learning rate eta_l = lr_l * 2 sigmoid(g_l) with a learned scalar g_l (init 0, so
  eta_l = lr_l at init, bounded by 2 lr_l).  lr_l = 0 makes level l static.
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

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nested_jax import memory as nm
from nested_jax.memory import objectives
from nested_jax.memory.chunked import scan_chunks
from nested_jax.models import layers
from nested_jax.models.config import fail

VARIANTS = ("sequential", "independent", "nested")
SIGNALS = ("teach", "reconstruction")
TEACH_AT = ("output", "input")


# ---- pure functions: norm, teach signal, the level memory --------------------------------------


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """nnx.RMSNorm's arithmetic (statistics in >= float32), cast back to x's dtype."""
    dt = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(dt)
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    scale = scale.astype(dt).reshape((1,) * (x.ndim - 1) + (-1,))
    return (xf * (jax.lax.rsqrt(var + eps) * scale)).astype(x.dtype)


class TeachHead(NamedTuple):
    """The tied LM head the teach signal is carried through (decisions.md #13)."""

    embedding_VxD: jax.Array  # E, the tied embedding table
    norm_scale_D: jax.Array  # scale of the model's final RMSNorm
    eps: float  # epsilon of the final RMSNorm


def teach_delta(head: TeachHead, h_D: jax.Array, next_D: jax.Array) -> jax.Array:
    """delta = d/dh CE(E RMSNorm_f(h), x_{t+1}) for one token; next_D = E[x_{t+1}]."""
    hn_D, pull = jax.vjp(lambda z: rms_norm(z, head.norm_scale_D, head.eps), h_D)
    table = head.embedding_VxD
    acc = jnp.promote_types(hn_D.dtype, jnp.float32)  # softmax in >= float32, as the LM head
    logits_V = jnp.matmul(table.astype(hn_D.dtype), hn_D, preferred_element_type=acc)
    p_V = jax.nn.softmax(logits_V)
    err_D = jnp.matmul(p_V, table.astype(acc)) - next_D.astype(acc)
    (delta_D,) = pull(err_D.astype(hn_D.dtype))
    return delta_D


def next_embeddings(emb_BxTxD: jax.Array) -> jax.Array:
    """e_{t+1} = the input embedding of the next token; zeros at the last position (masked)."""
    return jnp.concatenate([emb_BxTxD[:, 1:], jnp.zeros_like(emb_BxTxD[:, :1])], axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class SwiGLUMemory:
    """A CMS level's memory for the engine: y = w * W_down(silu(W_gate n) * W_up n), n = RMSNorm(x).

    Fast params {"gate": [D, F], "up": [D, F], "down": [F, D]} in nnx.Linear's kernel layout
    (x @ W), so ad-hoc stacking copies Transformer++ kernels as they are.  ``norm_scale`` and
    ``out_scale`` are outer parameters closed over (not fast state).  The read-out is the residual
    branch only; the stream after the level is x + apply(params, x).  No DGD (layer_inputs None).
    """

    dk: int
    dv: int
    hidden: int
    norm_scale: Any
    eps: float
    out_scale: Any = None

    def init(self, key, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        std = 0.02
        return {"gate": std * jax.random.normal(k1, (self.dk, self.hidden), dtype),
                "up": std * jax.random.normal(k2, (self.dk, self.hidden), dtype),
                "down": jnp.zeros((self.hidden, self.dv), dtype)}

    def parts(self, params, x_D):
        """(normalised input n, branch output y) for one token."""
        n = rms_norm(x_D, self.norm_scale, self.eps)
        w = {k: v.astype(x_D.dtype) for k, v in params.items()}
        a = jax.nn.silu(n @ w["gate"]) * (n @ w["up"])
        y = a @ w["down"]
        if self.out_scale is not None:
            y = y * self.out_scale.astype(y.dtype)
        return n, y

    def apply(self, params, x_D):
        return self.parts(params, x_D)[1]

    def layer_inputs(self, params, x, all_layers: bool = False):
        del x, all_layers
        return {k: None for k in params}


@dataclasses.dataclass(frozen=True, eq=False)
class CMSLevel(nm.Level):
    """An engine level whose inner loss is the CMS signal (the engine's objectives are its base).

    "teach": loss = dot(y, -sg(delta(x + y))) -- the engine's "dot" objective with target -delta,
    delta taken at the parameters the engine differentiates at (always the chunk boundary).
    "given": loss = dot(y, v), v = -delta precomputed by the caller (``teach_at="input"``).
    "reconstruction": loss = l2(y, sg(RMSNorm(x))).
    """

    signal: str = "teach"
    head: TeachHead | None = None

    def inner_loss(self, params, k, v):
        if self.signal == "teach":
            y = self.memory.apply(params, k)
            delta = jax.lax.stop_gradient(teach_delta(self.head, k + y, v))
            return objectives.loss("dot", y, -delta)
        if self.signal == "given":
            return objectives.loss("dot", self.memory.apply(params, k), v)
        n, y = self.memory.parts(params, k)
        return objectives.loss("l2", y, jax.lax.stop_gradient(n))


# ---- configuration --------------------------------------------------------------------------


def _per_level(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


@dataclasses.dataclass(frozen=True, kw_only=True)
class CMSSpec:
    """Resolved CMS hyper-parameters of one block (validated when built).

    Attributes:
      d_model: D, the residual width.
      periods: C^(l) per level, in tokens of the context flow (decisions.md #12), chain order.
      d_ff: SwiGLU width per level (a single int is used for every level).
      lr: inner learning-rate scale lr_l per level (0 = static level; a float for all).
      variant: "sequential" | "independent" | "nested".
      signal: "teach" | "reconstruction" (inner objective, decisions.md #13).
      teach_at: "output" (delta at each level's output, the default) or "input" (once per block
        at the CMS input, shared by the levels: cheaper).
      momentum: constant inner momentum beta (0 = plain GD, the fast path).
      retention: alpha, weight-decay gate of the inner rule (1 = none).
      norm_eps: epsilon of each level's RMSNorm.
      stop_grad: engine ablation (decisions.md #4): outer gradients skip the inner updates.
    """

    d_model: int
    periods: tuple[int, ...] = (16, 64, 256)
    d_ff: int | tuple[int, ...] = 512  # one value for every level, or one per level
    lr: float | tuple[float, ...] = 1e-2
    variant: str = "sequential"
    signal: str = "teach"
    teach_at: str = "output"
    momentum: float = 0.0
    retention: float = 1.0
    norm_eps: float = 1e-6
    stop_grad: bool = False

    def __post_init__(self):
        validate_spec(self, prefix="")
        if not isinstance(self.d_model, int) or self.d_model <= 0:
            fail("d_model", self.d_model, "must be a positive int")
        n = len(self.periods)
        object.__setattr__(self, "d_ff", _per_level(self.d_ff, n))
        object.__setattr__(self, "lr", tuple(float(x) for x in _per_level(self.lr, n)))
        if min(self.d_ff) <= 0:
            fail("d_ff", self.d_ff, "level widths must be positive ints")

    @property
    def n_levels(self) -> int:
        return len(self.periods)

    def level_chunk(self, i: int) -> int:
        return self.periods[i]


def validate_spec(spec: Any, prefix: str = "cms_", max_seq_len: int | None = None) -> None:
    """Errors name the field (``prefix`` + name) and the fix."""
    name = lambda f: prefix + f
    periods = spec.periods
    if not isinstance(periods, tuple) or not periods:
        fail(name("periods"), periods, "must be a non-empty tuple of positive ints, e.g. (16, 64)")
    for p in periods:
        if not isinstance(p, int) or isinstance(p, bool) or p <= 0:
            fail(name("periods"), periods, "every period must be a positive int (tokens)")
    if max_seq_len is not None and max(periods) > max_seq_len:
        fail(name("periods"), periods, f"a period above max_seq_len={max_seq_len} never updates "
             "in context; lower it or raise max_seq_len")
    n = len(periods)
    for f in ("d_ff", "lr"):
        v = getattr(spec, f)
        if isinstance(v, tuple) and len(v) != n:
            fail(name(f), v, f"needs one value per level ({n} levels, from {name('periods')}) "
                 "or a single value")
    for d in _per_level(spec.d_ff, n):
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            fail(name("d_ff"), spec.d_ff, "level widths must be ints >= 0 (0 = automatic)")
    for lr in _per_level(spec.lr, n):
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0:
            fail(name("lr"), spec.lr, "inner learning rates must be floats >= 0 (0 = static)")
    if spec.variant not in VARIANTS:
        fail(name("variant"), spec.variant, f"must be one of {list(VARIANTS)}")
    if spec.signal not in SIGNALS:
        fail(name("signal"), spec.signal, f"must be one of {list(SIGNALS)}")
    if spec.teach_at not in TEACH_AT:
        fail(name("teach_at"), spec.teach_at, f"must be one of {list(TEACH_AT)}")
    if not 0.0 <= spec.momentum < 1.0:
        fail(name("momentum"), spec.momentum, "must lie in [0, 1) (0 = plain GD)")
    if not 0.0 < spec.retention <= 1.0:
        fail(name("retention"), spec.retention, "must lie in (0, 1] (1 = no weight decay)")
    if spec.variant == "nested":
        for a, b in zip(periods, periods[1:], strict=False):
            if not (a > b and a % b == 0):
                fail(name("periods"), periods, "the nested variant needs decreasing periods, each "
                     "dividing the previous (e.g. (256, 64, 16))")
        if len(set(_per_level(spec.d_ff, n))) != 1:
            fail(name("d_ff"), spec.d_ff, "the nested variant shares one MLP across levels; "
                 "give one width")
        if any(lr > 1.0 for lr in _per_level(spec.lr, n)[:-1]):
            fail(name("lr"), spec.lr, "nested meta-steps lambda of the slower levels must be <= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CMSFields:
    """Config mixin: the ``cms_*`` fields of a model with CMS blocks (see ``CMSSpec``).

    Use as ``class MyConfig(CMSFields, ModelConfig)`` and call ``self.validate_cms()`` from
    ``validate``.  ``cms_d_ff=0`` gives every level ``default_d_ff // n_levels`` rounded up to a
    multiple of 64 (parameter-matched to one MLP of width ``default_d_ff``).
    """

    cms_periods: tuple[int, ...] = (16, 64, 256)
    cms_d_ff: int | tuple[int, ...] = 0
    cms_lr: float | tuple[float, ...] = 1e-2
    cms_variant: str = "sequential"
    cms_signal: str = "teach"
    cms_teach_at: str = "output"
    cms_momentum: float = 0.0
    cms_retention: float = 1.0
    cms_stop_grad: bool = False

    @property
    def cms_fields(self) -> dict[str, Any]:
        return dict(periods=self.cms_periods, d_ff=self.cms_d_ff, lr=self.cms_lr,
                    variant=self.cms_variant, signal=self.cms_signal, teach_at=self.cms_teach_at,
                    momentum=self.cms_momentum, retention=self.cms_retention)

    def validate_cms(self) -> None:
        view = type("_View", (), self.cms_fields)
        validate_spec(view, prefix="cms_", max_seq_len=getattr(self, "max_seq_len", None))

    def cms_spec(self, default_d_ff: int) -> CMSSpec:
        n = len(self.cms_periods)
        auto = max(64, -(-default_d_ff // n // 64) * 64)
        d_ff = tuple(d or auto for d in _per_level(self.cms_d_ff, n))
        if self.cms_variant == "nested":
            d_ff = (d_ff[0],) * n
        return CMSSpec(d_model=self.d_model, periods=self.cms_periods, d_ff=d_ff,
                       lr=self.cms_lr,
                       variant=self.cms_variant, signal=self.cms_signal,
                       teach_at=self.cms_teach_at, momentum=self.cms_momentum,
                       retention=self.cms_retention,
                       norm_eps=getattr(self, "norm_eps", 1e-6), stop_grad=self.cms_stop_grad)


# ---- the module -----------------------------------------------------------------------------


class CMSState(NamedTuple):
    """Decode state of one CMS block.

    streams: engine StreamStates (leaves [B, 1, ...]); one per level (nested: the fastest only).
    slow: nested only: weights theta_s of the slower levels (leaves [B, 1, ...]).
    pending: level inputs r_{t-1} f[B, D] whose write waits for x_t (one per stream).
    pos: i32[] tokens consumed.
    """

    streams: tuple
    slow: tuple
    pending: tuple
    pos: jax.Array


class LevelParams(nnx.Module):
    """Outer parameters of one level: its pre-norm and the initial (meta-learned) SwiGLU weights."""

    def __init__(self, d_model: int, d_ff: int, *, eps: float, out_std: float, param_dtype,
                 rngs: nnx.Rngs):
        self.norm = layers.rms_norm(d_model, eps=eps, param_dtype=param_dtype, rngs=rngs)
        init = lambda std, *axes: layers.param_init(layers.normal(std), *axes)
        self.gate = nnx.Param(init(0.02, "embed", "mlp")(rngs.params(), (d_model, d_ff),
                                                         param_dtype))
        self.up = nnx.Param(init(0.02, "embed", "mlp")(rngs.params(), (d_model, d_ff),
                                                       param_dtype))
        self.down = nnx.Param(init(out_std, "mlp", "embed")(rngs.params(), (d_ff, d_model),
                                                            param_dtype))

    def weights(self) -> dict[str, jax.Array]:
        return {"gate": self.gate[...], "up": self.up[...], "down": self.down[...]}


class CMS(nnx.Module):
    """The CMS of one block: residual stream in -> residual stream out (see module docstring)."""

    def __init__(self, spec: CMSSpec, *, n_layers: int, dtype, param_dtype, rngs: nnx.Rngs):
        self.spec = spec
        self.dtype = jnp.dtype(dtype)
        out_std = layers.residual_out_std(n_layers)
        n_param = 1 if spec.variant == "nested" else spec.n_levels
        self.levels = layers.ModuleList([
            LevelParams(spec.d_model, spec.d_ff[i], eps=spec.norm_eps, out_std=out_std,
                        param_dtype=param_dtype, rngs=rngs) for i in range(n_param)])
        self.lr_gate = nnx.Param(jnp.zeros((spec.n_levels,), param_dtype))
        if spec.variant == "independent":
            self.mix = nnx.Param(jnp.ones((spec.n_levels,), param_dtype))

    # -- building blocks --

    @property
    def gate_dtype(self):
        """Gates are >= float32 (float64 in exactness tests with float64 parameters)."""
        return jnp.promote_types(self.lr_gate[...].dtype, jnp.float32)

    def etas(self) -> jax.Array:
        """eta_l = lr_l * 2 sigmoid(g_l): f[K]."""
        lr = jnp.asarray(self.spec.lr, self.gate_dtype)
        return lr * 2.0 * jax.nn.sigmoid(self.lr_gate[...].astype(self.gate_dtype))

    def _memory(self, i: int) -> SwiGLUMemory:
        p = self.levels[0 if self.spec.variant == "nested" else i]
        out = self.mix[...][i] if self.spec.variant == "independent" else None
        return SwiGLUMemory(self.spec.d_model, self.spec.d_model, self.spec.d_ff[i],
                            p.norm.scale[...], self.spec.norm_eps, out)

    def _level(self, i: int, head: TeachHead | None) -> CMSLevel:
        s = self.spec
        rule = nm.TITANS if s.momentum > 0 else nm.GD
        if s.signal == "teach" and head is None:
            raise ValueError("cms_signal='teach' needs the model's TeachHead (tied LM head).")
        signal = "given" if (s.signal, s.teach_at) == ("teach", "input") else s.signal
        return CMSLevel(self._memory(i), "dot" if s.signal == "teach" else "l2", rule,
                        "boundary", s.stop_grad, signal=signal, head=head)

    def _given_target(self, head, r_BxTxD, next_BxTxD):
        """v = -delta at the CMS input (teach_at="input"): a stop-gradient constant."""
        fn = jax.vmap(jax.vmap(teach_delta, in_axes=(None, 0, 0)), in_axes=(None, 0, 0))
        return -jax.lax.stop_gradient(fn(head, r_BxTxD, next_BxTxD)).astype(r_BxTxD.dtype)

    def _init_state(self, i: int, batch_size: int) -> nm.MemoryState:
        p = self.levels[0 if self.spec.variant == "nested" else i].weights()
        params_H = {k: v[None] for k, v in p.items()}  # one head
        state_H = nm.MemoryState(params_H, jax.tree.map(jnp.zeros_like, params_H))
        return nm.broadcast_state(state_H, batch_size)

    def _gates(self, i: int, mask_BxT: jax.Array) -> nm.Gates:
        """Per-token gates f[B, T, 1]: eta_l masked, constant alpha and beta."""
        eta = self.etas()[i] * mask_BxT.astype(self.gate_dtype)
        full = lambda c: jnp.full(mask_BxT.shape, c, self.gate_dtype)
        return nm.Gates(eta[..., None], full(self.spec.retention)[..., None],
                        full(self.spec.momentum)[..., None])

    def _run(self, i, state, r_BxTxD, v_BxTxD, mask_BxT, head):
        """One engine level over the sequence. Returns (branch output f[B, T, D], final state)."""
        o, final = nm.apply(self._level(i, head), state, r_BxTxD[:, :, None], r_BxTxD[:, :, None],
                            v_BxTxD[:, :, None], self._gates(i, mask_BxT),
                            chunk_size=self.spec.periods[i], path="chunked")
        return o[:, :, 0].astype(r_BxTxD.dtype), final

    # -- parallel forward --

    def __call__(self, x_BxTxD: jax.Array, head: TeachHead | None,
                 next_BxTxD: jax.Array | None = None) -> jax.Array:
        """Residual stream in -> out over a whole sequence. next_BxTxD: E[x_{t+1}] (teach)."""
        B, T, D = x_BxTxD.shape
        mask_BxT = jnp.ones((B, T), self.gate_dtype)
        if self.spec.signal == "teach":
            if next_BxTxD is None:
                raise ValueError("the teach signal needs next_BxTxD = next_embeddings(emb).")
            mask_BxT = mask_BxT.at[:, -1].set(0.0)  # the last token has no next token
            v = next_BxTxD.astype(x_BxTxD.dtype)
            if self.spec.teach_at == "input":
                self._level(0, head)  # checks the head
                v = self._given_target(head, x_BxTxD, v)
        else:
            v = x_BxTxD  # unused by the reconstruction loss, shaped for the engine
        variant = self.spec.variant
        if variant == "nested":
            return x_BxTxD + self._nested(x_BxTxD, v, mask_BxT, head)
        r = x_BxTxD
        total = x_BxTxD
        for i in range(self.spec.n_levels):
            y, _ = self._run(i, self._init_state(i, B), r, v, mask_BxT, head)
            if variant == "sequential":
                r = r + y
            else:
                total = total + y
        return r if variant == "sequential" else total

    def _nested(self, x_BxTxD, v_BxTxD, mask_BxT, head):
        """Levels 0..K-1 nested (module docstring); returns the fastest level's branch output."""
        K = self.spec.n_levels
        B = x_BxTxD.shape[0]
        lam = jnp.minimum(self.etas(), 1.0)
        tmajor = lambda a: jnp.moveaxis(a, 1, 0)  # scan_chunks splits axis 0

        def seg(s, theta, x, v, m):  # x, v f[B, n, D]; m f[B, n]; theta leaves [B, 1, ...]
            if s == K - 1:
                st = nm.MemoryState(theta, jax.tree.map(jnp.zeros_like, theta))
                y, final = self._run(s, st, x, v, m, head)
                return y, final.params

            def chunk_fn(th, xc, vc, mc):
                y, inner = seg(s + 1, th, tmajor(xc), tmajor(vc), tmajor(mc))
                th = jax.tree.map(lambda a, b: a + lam[s].astype(a.dtype) * (b - a), th, inner)
                return th, tmajor(y)

            y, theta = scan_chunks(chunk_fn, theta, (tmajor(x), tmajor(v), tmajor(m)),
                                   self.spec.periods[s])
            return tmajor(y), theta

        return seg(0, self._init_state(0, B).params, x_BxTxD, v_BxTxD, mask_BxT)[0]

    # -- streaming --

    def init_state(self, batch_size: int) -> CMSState:
        K = self.spec.n_levels
        D = self.spec.d_model
        if self.spec.variant == "nested":
            theta = self._init_state(0, batch_size)
            streams = (nm.stream_init(theta),)
            slow = tuple(theta.params for _ in range(K - 1))
            pending = (jnp.zeros((batch_size, D), self.dtype),)
        else:
            streams = tuple(nm.stream_init(self._init_state(i, batch_size)) for i in range(K))
            slow = ()
            pending = tuple(jnp.zeros((batch_size, D), self.dtype) for _ in range(K))
        return CMSState(streams, slow, pending, jnp.zeros((), jnp.int32))

    def _decode_target(self, state: CMSState, head, emb_BxD):
        """The engine's v for the pending token t-1 (its next token x_t is now known)."""
        if self.spec.signal != "teach":
            return None
        if self.spec.teach_at == "input":  # every stream's pending[0] is the block input at t-1
            return self._given_target(head, state.pending[0][:, None], emb_BxD[:, None])[:, 0]
        return emb_BxD

    def _write(self, i, st, pending_BxD, v_BxD, has_prev, head):
        """Apply the lagged write of token t-1 to stream st (skipped at t = 0)."""
        etas = self.etas()
        B = pending_BxD.shape[0]
        g = lambda c: jnp.full((B, 1), c, self.gate_dtype)
        gates = nm.Gates(g(1.0) * etas[i], g(self.spec.retention), g(self.spec.momentum))
        k = pending_BxD[:, None]
        v = (pending_BxD if v_BxD is None else v_BxD)[:, None].astype(k.dtype)
        _, new = nm.stream_step(self._level(i, head), st, k, k, v, gates,
                                chunk_size=self.spec.periods[i])
        return jax.tree.map(lambda a, b: jnp.where(has_prev, a, b), new, st)

    def _read(self, i, st, r_BxD):
        mem = self._memory(i)
        y = jax.vmap(jax.vmap(mem.apply))(st.boundary, r_BxD[:, None])
        return y[:, 0].astype(r_BxD.dtype)

    def decode(self, x_Bx1xD: jax.Array, state: CMSState, head: TeachHead | None,
               emb_Bx1xD: jax.Array | None = None) -> tuple[jax.Array, CMSState]:
        """One token. emb_Bx1xD = E[x_t], the teach target of the pending token t-1."""
        x = x_Bx1xD[:, 0]
        emb = x if emb_Bx1xD is None else emb_Bx1xD[:, 0]
        has_prev = state.pos > 0
        target = self._decode_target(state, head, emb)
        if self.spec.variant == "nested":
            out, state = self._decode_nested(x, state, head, target, has_prev)
        else:
            streams, pending = [], []
            r, total = x, x
            for i in range(self.spec.n_levels):
                st = self._write(i, state.streams[i], state.pending[i], target, has_prev, head)
                y = self._read(i, st, r)
                streams.append(st)
                pending.append(r)
                if self.spec.variant == "sequential":
                    r = r + y
                else:
                    total = total + y
            out = r if self.spec.variant == "sequential" else total
            state = CMSState(tuple(streams), (), tuple(pending), state.pos)
        return out[:, None], state._replace(pos=state.pos + 1)

    def _decode_nested(self, x, state, head, target, has_prev):
        K = self.spec.n_levels
        P = self.spec.periods
        lam = jnp.minimum(self.etas(), 1.0)
        fast = self._write(K - 1, state.streams[0], state.pending[0], target, has_prev, head)
        thetas = list(state.slow) + [fast.params]
        pos = state.pos
        ends = [has_prev & (pos % P[s] == 0) for s in range(K - 1)]
        for s in reversed(range(K - 1)):  # absorb fast -> slow: level s meta-learns s+1's init
            new = jax.tree.map(lambda a, b: a + lam[s].astype(a.dtype) * (b - a), thetas[s],
                               thetas[s + 1])
            thetas[s] = jax.tree.map(lambda a, b: jnp.where(ends[s], a, b), new, thetas[s])
        for s in range(K - 1):  # then re-initialise slow -> fast where a context ended
            thetas[s + 1] = jax.tree.map(lambda a, b: jnp.where(ends[s], a, b), thetas[s],
                                         thetas[s + 1])
        if K > 1:
            reset = nm.stream_init(nm.MemoryState(thetas[-1],
                                                  jax.tree.map(jnp.zeros_like, thetas[-1])))
            fast = jax.tree.map(lambda a, b: jnp.where(ends[K - 2], a, b), reset, fast)
        y = self._read(K - 1, fast, x)
        return x + y, CMSState((fast,), tuple(thetas[:-1]), (x,), pos)

    # -- ad-hoc level stacking (decisions.md #15) --

    def load_swiglu(self, i: int, mlp: layers.SwiGLU, norm: nnx.RMSNorm) -> None:
        """Level i <- a Transformer++ block's MLP (kernels copied as they are) and its pre-norm."""
        p = self.levels[i]
        p.gate[...] = mlp.gate.kernel[...]
        p.up[...] = mlp.up.kernel[...]
        p.down[...] = mlp.down.kernel[...]
        p.norm.scale[...] = norm.scale[...]

    def silence(self, i: int) -> None:
        """Zero level i's output matrix: the level starts as the identity map of the stream."""
        self.levels[i].down[...] = jnp.zeros_like(self.levels[i].down[...])

    def flops_per_token(self, vocab_size: int) -> float:
        """Training FLOPs per token beyond 6 N (the read-outs are in 6 N): the teach signal's two
        V x D matmuls (forward only; per level and recomputed once by remat, or once per block
        with teach_at="input") and per level the inner VJP (MLP forward + backward, 12 D F) with
        its outer backward (~2x)."""
        s = self.spec
        lens = 4.0 * vocab_size * s.d_model if s.signal == "teach" else 0.0
        total = lens if s.teach_at == "input" else 2 * lens * s.n_levels
        for i in range(s.n_levels):
            total += 3 * 12.0 * s.d_model * s.d_ff[i]
        return total
