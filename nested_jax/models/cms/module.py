"""The CMS block: outer parameters, the chunked forward of the three variants, decoding with
engine stream states, and FLOPs (``nested_jax/models/cms/__init__.py`` documents the
semantics)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nested_jax import memory as nm
from nested_jax.memory.chunked import scan_chunks
from nested_jax.models import layers
from nested_jax.models.cms.level import CMSLevel, SwiGLUMemory
from nested_jax.models.cms.spec import CMSSpec, _per_level
from nested_jax.models.cms.teach import TeachHead, teach_delta


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
        base = p.weights() if self.spec.decay_to == "init" else None
        return SwiGLUMemory(self.spec.d_model, self.spec.d_model, self.spec.d_ff[i],
                            p.norm.scale[...], self.spec.norm_eps, out, base)

    def _level(self, i: int, head: TeachHead | None) -> CMSLevel:
        s = self.spec
        rule = nm.TITANS if s.momentum > 0 else nm.GD
        if s.signal == "teach" and head is None:
            raise ValueError("cms_signal='teach' needs the model's TeachHead (tied LM head).")
        signal = "given" if (s.signal, s.teach_at) == ("teach", "input") else s.signal
        return CMSLevel(self._memory(i), "dot" if s.signal == "teach" else "l2", rule,
                        "boundary", s.stop_grad, signal=signal, head=head,
                        teach_stop_grad=s.teach_stop_grad, first_order=s.first_order)

    def _given_target(self, head, r_BxTxD, next_BxTxD):
        """v = -delta at the CMS input (teach_at="input"): a stop-gradient constant."""
        fn = jax.vmap(jax.vmap(teach_delta, in_axes=(None, 0, 0)), in_axes=(None, 0, 0))
        return -jax.lax.stop_gradient(fn(head, r_BxTxD, next_BxTxD)).astype(r_BxTxD.dtype)

    def _initial_fast(self, i: int) -> dict[str, jax.Array]:
        """Level i's fast weights before any write (unbatched)."""
        p = self.levels[0 if self.spec.variant == "nested" else i].weights()
        if self.spec.decay_to == "init":  # the fast state is the change from p (_memory)
            p = jax.tree.map(jnp.zeros_like, p)
        return p

    def _init_state(self, i: int, batch_size: int) -> nm.MemoryState:
        params_H = {k: v[None] for k, v in self._initial_fast(i).items()}  # one head
        state_H = nm.MemoryState(params_H, jax.tree.map(jnp.zeros_like, params_H))
        return nm.broadcast_state(state_H, batch_size)

    def _gates(self, i: int, mask_BxT: jax.Array) -> nm.Gates:
        """Per-token gates f[B, T, 1]: eta_l masked, constant alpha and beta."""
        eta = self.etas()[i] * mask_BxT.astype(self.gate_dtype)
        full = lambda c: jnp.full(mask_BxT.shape, c, self.gate_dtype)
        return nm.Gates(eta[..., None], full(self.spec.retention)[..., None],
                        full(self.spec.momentum)[..., None])

    def _static(self, i: int) -> bool:
        """Level i never changes in context: no step (lr 0) and nothing that decays its weights
        (retention 1, or decay toward the initial weights, where the fast state stays 0).  The
        momentum stays 0 too (S = beta S - 0 g)."""
        s = self.spec
        return _per_level(s.lr, s.n_levels)[i] == 0 and (s.retention == 1 or s.decay_to == "init")

    def _static_read(self, i: int, r_BxTxD: jax.Array) -> jax.Array:
        """The branch output of a static level: its memory read at the initial weights for every
        token at once.  The engine's chunked scan computes the same (every write is zero), but
        with the teach signal it also builds, per chunk, the inner gradient and its outer
        derivative, all multiplied by eta = 0: a frozen-CMS model (the icl ``sm_only`` and
        ``none`` variants, every frozen-at-eval score) paid for a learning CMS."""
        y = self._memory(i).apply(self._initial_fast(i), r_BxTxD)
        return layers.shard_batch(y.astype(r_BxTxD.dtype))

    def _run(self, i, state, r_BxTxD, v_BxTxD, mask_BxT, head, resets_BxT=None):
        """One engine level over the sequence. Returns (branch output f[B, T, D], final state).
        ``resets_BxT``: document starts, where the level's weights return to ``state``."""
        resets = {} if resets_BxT is None else {"resets": resets_BxT}
        o, final = nm.apply(self._level(i, head), state, r_BxTxD[:, :, None], r_BxTxD[:, :, None],
                            v_BxTxD[:, :, None], self._gates(i, mask_BxT),
                            chunk_size=self.spec.periods[i], path="chunked",
                            remat=self.spec.remat_chunks, **resets)
        return layers.shard_batch(o[:, :, 0].astype(r_BxTxD.dtype)), final

    # -- parallel forward --

    def __call__(self, x_BxTxD: jax.Array, head: TeachHead | None,
                 next_BxTxD: jax.Array | None = None, docs=None) -> jax.Array:
        """Residual stream in -> out over a whole sequence. next_BxTxD: E[x_{t+1}] (teach).

        ``docs`` (packed rows, ``models/documents.py``): every level's weights return to their
        initial values at a document start (a multiple of every period), and a document's last
        token writes nothing, as the last token of a row (its next token is another document's);
        padding writes nothing either.
        """
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
        resets = None
        if docs is not None:
            resets = docs.starts
            writes = docs.has_next if self.spec.signal == "teach" else docs.ids != 0
            mask_BxT = mask_BxT * writes.astype(mask_BxT.dtype)
        variant = self.spec.variant
        if variant == "nested":
            if all(self._static(i) for i in range(self.spec.n_levels)):  # lam = 0: theta stays
                return x_BxTxD + self._static_read(self.spec.n_levels - 1, x_BxTxD)
            return x_BxTxD + self._nested(x_BxTxD, v, mask_BxT, head, resets)
        r = x_BxTxD
        total = x_BxTxD
        for i in range(self.spec.n_levels):
            if self._static(i):
                y = self._static_read(i, r)
            else:
                y, _ = self._run(i, self._init_state(i, B), r, v, mask_BxT, head, resets)
            if variant == "sequential":
                r = r + y
            else:
                total = total + y
        return r if variant == "sequential" else total

    def _nested(self, x_BxTxD, v_BxTxD, mask_BxT, head, resets_BxT=None):
        """Levels 0..K-1 nested (module docstring); returns the fastest level's branch output.

        Document starts (``resets_BxT``, multiples of P_0) return level 0's weights to their
        initial value; every faster level is re-initialised from its parent there anyway."""
        K = self.spec.n_levels
        B = x_BxTxD.shape[0]
        lam = jnp.minimum(self.etas(), 1.0)
        tmajor = lambda a: jnp.moveaxis(a, 1, 0)  # scan_chunks splits axis 0

        def seg(s, theta, x, v, m):  # x, v f[B, n, D]; m f[B, n]; theta leaves [B, 1, ...]
            if s == K - 1:
                st = nm.MemoryState(theta, jax.tree.map(jnp.zeros_like, theta))
                y, final = self._run(s, st, x, v, m, head, resets_BxT if s == 0 else None)
                return y, final.params

            def chunk_fn(th, xc, vc, mc):
                y, inner = seg(s + 1, th, tmajor(xc), tmajor(vc), tmajor(mc))
                th = jax.tree.map(lambda a, b: a + lam[s].astype(a.dtype) * (b - a), th, inner)
                return th, tmajor(y)

            resets = None if s or resets_BxT is None else tmajor(resets_BxT)
            y, theta = scan_chunks(chunk_fn, theta, (tmajor(x), tmajor(v), tmajor(m)),
                                   self.spec.periods[s], resets=resets)
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
        V x D matmuls (per level: forward, recomputed once by remat, and the outer backward
        through delta (~2x, decisions.md #28) unless teach_stop_grad; or forward only, once per
        block, with teach_at="input") and per level the inner VJP (MLP forward + backward,
        12 D F) with its outer backward (~2x)."""
        s = self.spec
        lens = 4.0 * vocab_size * s.d_model if s.signal == "teach" else 0.0
        passes = 2 if s.teach_stop_grad else 4
        total = lens if s.teach_at == "input" else passes * lens * s.n_levels
        for i in range(s.n_levels):
            total += 3 * 12.0 * s.d_model * s.d_ff[i]
        return total
