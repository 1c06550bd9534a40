"""Shared building blocks: RMSNorm, RoPE, SwiGLU, causal attention, tied embedding/LM head.

Every parameter carries `logical_axes` metadata (names such as "embed", "mlp",
"heads", "vocab"); `nested_jax.train.sharding` maps those names to mesh axes through
one rules table. Model code names a mesh axis in one place only: `shard_batch`, which keeps
activations split over the batch's mesh axes when a mesh is set.

Shape suffixes: B batch, T query length, S key/cache length, D d_model, H heads,
G kv heads, K head dim, F mlp width, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from nested_jax.kernels import splash
from nested_jax.models import documents

Initializer = Callable[..., jax.Array]
# The mesh axes a batch is split over: the "batch" rule of `nested_jax.train.sharding` (and
# the splash kernel's BATCH_AXES), restated because models do not import the trainer;
# tests/models/test_activation_sharding.py checks that they agree.
BATCH_AXES = ("data", "fsdp")
normal = nnx.initializers.normal
# flax >= 0.12 wants module lists wrapped; older versions take a plain list.
ModuleList = getattr(nnx, "List", list)


def round_up(x: float, multiple: int) -> int:
    return int(-(-x // multiple) * multiple)


def swiglu_width(d_model: int) -> int:
    """The default MLP width of every model: 8/3 d_model rounded up to a multiple of 256."""
    return round_up(8 * d_model / 3, 256)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / ||x|| over the last axis (q and k, decisions.md #11), in at least float32."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rms_normalize(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """nnx.RMSNorm's arithmetic (statistics in >= float32), cast back to x's dtype."""
    dt = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(dt)
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    scale = scale.astype(dt).reshape((1,) * (x.ndim - 1) + (-1,))
    return (xf * (jax.lax.rsqrt(var + eps) * scale)).astype(x.dtype)


def shard_batch(x_Bx: jax.Array) -> jax.Array:
    """``x_Bx`` [B, ...] constrained to split B over ``BATCH_AXES`` of the context mesh (the
    ``jax.set_mesh`` that the trainer and ``nested-jax compile`` trace under); ``x_Bx`` itself,
    so the very same traced program, without a mesh, on one device, inside ``shard_map``
    (Manual axes: already per shard), on Explicit axes (the sharding is in the types there) or
    where the mesh axes do not divide B.

    Why: ``fsdp`` splits both the batch and the weights' "embed" dimension; with nothing
    pinning the activations, XLA may keep the weights in place and gather the activations
    instead: the 125M train step compiled for v5e-16 then held the whole microbatch on every
    chip (experiments/results/tpu_compile.md).  Only B is constrained.  The other dimensions
    stay UNCONSTRAINED, not None: None would mean replicated, and "tensor" splits heads, MLP
    width and vocabulary in the weights (the logits come out split by vocabulary), which a
    replicated constraint would all-gather.
    """
    mesh = _context_mesh()
    if mesh is None:
        return x_Bx
    sizes = dict(mesh.shape)
    axes = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
    if (not axes or not set(axes) <= set(getattr(mesh, "auto_axes", ()))
            or x_Bx.shape[0] % math.prod(sizes[a] for a in axes)):
        return x_Bx
    spec = jax.sharding.PartitionSpec(axes, *[jax.sharding.PartitionSpec.UNCONSTRAINED]
                                      * (x_Bx.ndim - 1))
    return jax.lax.with_sharding_constraint(x_Bx, spec)


def replicate(x: jax.Array) -> jax.Array:
    """``x`` constrained to be whole on every chip of the context mesh; ``x`` itself where
    ``shard_batch`` would leave its input alone (no mesh, Manual or Explicit axes).

    Why: a weight that many layers read in one step (the tied table of the CMS teach head,
    read by every level of every block) is otherwise all-gathered once per read, and XLA may
    start all those gathers early and hold them at once: HopeLM's decode step compiled for
    v5e-16 held 34 gathered copies of the table in float32 and bfloat16 (4.06 GiB a chip at
    125M, 10.95 at 340M; experiments/notes/tpu_compile_grid.md).  Constrained once, it is
    gathered once and shared."""
    mesh = _context_mesh()
    if mesh is None or set(mesh.axis_names) - set(getattr(mesh, "auto_axes", ())):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec())


def _context_mesh():
    """The abstract mesh of the ``jax.set_mesh`` context, or None where there is none."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get() if get is not None else None
    return mesh if mesh is not None and mesh.axis_names else None


def param_init(init: Initializer, *logical_axes: str | None) -> Initializer:
    """Tag an initializer with the logical axis name of each parameter dimension."""
    return nnx.with_metadata(init, logical_axes=tuple(logical_axes))


def rms_norm(d_model: int, *, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """Pre-norm RMSNorm (computed in float32, float64 with float64 parameters; cast back to the
    input dtype by the caller)."""
    return nnx.RMSNorm(d_model, epsilon=eps, dtype=jnp.promote_types(param_dtype, jnp.float32),
                       param_dtype=param_dtype,
                       scale_init=param_init(nnx.initializers.ones, "embed"), rngs=rngs)


def apply_norm(norm: nnx.RMSNorm, x: jax.Array) -> jax.Array:
    return norm(x).astype(x.dtype)


def dense(d_in: int, d_out: int, axes: tuple[str, str], *, std: float, dtype: jnp.dtype,
          param_dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """Bias-free linear layer with a truncation-free normal(std) init."""
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=param_init(normal(std), *axes), rngs=rngs)


# ---- rotary position embedding --------------------------------------------------------------


def rope(x_BxTxHxK: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, rotate-half layout (Su et al. 2021; Llama/NeoX convention).
    Computed in float32 (float64 for float64 inputs)."""
    half = x_BxTxHxK.shape[-1] // 2
    acc = jnp.promote_types(x_BxTxHxK.dtype, jnp.float32)
    freqs_K2 = theta ** (-jnp.arange(half, dtype=acc) / half)
    angles_BxTxK2 = positions_BxT.astype(acc)[:, :, None] * freqs_K2[None, None, :]
    sin, cos = jnp.sin(angles_BxTxK2)[:, :, None, :], jnp.cos(angles_BxTxK2)[:, :, None, :]
    x = x_BxTxHxK.astype(acc)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxK.dtype)


# ---- modules --------------------------------------------------------------------------------


class SwiGLU(nnx.Module):
    """y = W_down (silu(W_gate x) * W_up x)  (Shazeer 2020)."""

    def __init__(self, d_model: int, d_ff: int, *, out_std: float, dtype: jnp.dtype,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = dense(d_model, d_ff, ("embed", "mlp"), std=0.02, **kw)
        self.up = dense(d_model, d_ff, ("embed", "mlp"), std=0.02, **kw)
        self.down = dense(d_ff, d_model, ("mlp", "embed"), std=out_std, **kw)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return shard_batch(self.down(jax.nn.silu(self.gate(x_BxTxD)) * self.up(x_BxTxD)))


ATTENTION_BLOCK = 512  # query rows per block of ``blockwise_attention``


def blockwise_attention(q_BxTxHxK: jax.Array, k_BxTxGxK: jax.Array, v_BxTxGxK: jax.Array,
                        block: int = ATTENTION_BLOCK, doc_ids_BxT: jax.Array | None = None
                        ) -> jax.Array:
    """Causal softmax attention one query block at a time, each block rematerialised.

    softmax(q k^T / sqrt(K) + causal mask) v, the function of
    ``jax.nn.dot_product_attention(q, k, v, is_causal=True)`` (grouped-query heads: H = G * R),
    but only [block, T] scores per head are live, forward and backward, instead of [T, T]:
    plain XLA attention at T = 8192 asked a 23 GB CPU host for 32 GB.  Every block scores all T
    keys (masked), so the FLOPs are the dense path's: use it where memory binds.  Scores and
    softmax run in float32 or wider (float64 inputs stay float64).  ``doc_ids_BxT``
    (``documents.Documents.ids``): a query sees only keys of its own document.
    """
    B, T, H, K = q_BxTxHxK.shape
    G = k_BxTxGxK.shape[2]
    n = -(-T // block)
    acc = jnp.promote_types(q_BxTxHxK.dtype, jnp.float32)
    q = jnp.pad(q_BxTxHxK, ((0, 0), (0, n * block - T), (0, 0), (0, 0)))
    q_NxBxCxGxRxK = q.reshape(B, n, block, G, H // G, K).swapaxes(0, 1)
    k, v = k_BxTxGxK.astype(acc), v_BxTxGxK.astype(acc)

    @jax.checkpoint
    def one(args):
        i, q_BxCxGxRxK, *docs = args
        s_BxGxRxCxT = jnp.einsum("bcgrk,btgk->bgrct", q_BxCxGxRxK.astype(acc), k) / jnp.sqrt(
            jnp.asarray(K, acc))
        rows = i * block + jnp.arange(block)
        keep = rows[:, None] >= jnp.arange(T)[None, :]  # causal [C, T]
        if docs:  # and the query rows' document ids [B, C] equal to the keys'
            keep = (keep[None] & (docs[0][:, :, None] == doc_ids_BxT[:, None, :]))[:, None, None]
        p = jax.nn.softmax(jnp.where(keep, s_BxGxRxCxT, -jnp.inf), axis=-1)
        return jnp.einsum("bgrct,btgk->bcgrk", p, v).astype(q_BxTxHxK.dtype)

    xs = (jnp.arange(n), q_NxBxCxGxRxK)
    if doc_ids_BxT is not None:
        # Padded query rows (sliced off) repeat the last id: a row masked everywhere would be
        # NaN, and its NaN would reach k's and v's gradients.
        ids = jnp.pad(doc_ids_BxT, ((0, 0), (0, n * block - T)), mode="edge")
        xs = (*xs, ids.reshape(B, n, block).swapaxes(0, 1))
    out = jax.lax.map(one, xs)
    return out.swapaxes(0, 1).reshape(B, n * block, H, K)[:, :T]


def xla_impl(impl: str | None) -> str | None:
    """``jax.nn.dot_product_attention``'s implementation for ``attention_impl``: the splash
    settings, where they do not run the kernel, take the default path (None, XLA picks)."""
    return None if impl in splash.IMPLS else impl


def splash_attention(q_BxTxHxK: jax.Array, k_BxTxGxK: jax.Array, v_BxTxGxK: jax.Array,
                     impl: str, docs: documents.Documents | None = None) -> jax.Array | None:
    """Causal attention through the Pallas splash kernel (``kernels/splash.py``) when ``impl``
    ("auto", "splash", "splash_interpret") picks it for this platform and these shapes; None
    where "auto" leaves it to XLA.  An impossible "splash" is a ValueError naming
    ``model.attention_impl`` and the fix."""
    kind = splash.choose(impl, q_BxTxHxK.shape[1], k_BxTxGxK.shape[1], q_BxTxHxK.dtype)
    if not kind:
        return None
    return splash.attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK,
                            doc_ids_BxT=None if docs is None else docs.ids,
                            interpret=kind == "interpret")


class CausalSelfAttention(nnx.Module):
    """Multi-head (or grouped-query) causal attention with RoPE.

    Training uses `jax.nn.dot_product_attention(..., is_causal=True)`, which lowers to
    cuDNN flash attention on GPU when `impl="cudnn"`; `impl="blockwise"` is
    `blockwise_attention` (long sequences where the dense XLA path runs out of memory);
    `impl="splash"` is the Pallas splash (flash) kernel on TPU, `"auto"` the kernel on TPU
    where the shapes suit it and the default XLA path elsewhere (`splash_attention`).
    Decoding writes one key/value into a fixed-length cache and attends over its first
    `pos + 1` entries.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, *, rope_theta: float,
                 out_std: float, impl: str | None, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.rope_theta, self.impl = rope_theta, impl
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        k_dim = n_kv_heads * self.head_dim
        self.q = dense(d_model, d_model, ("embed", "heads"), std=0.02, **kw)
        self.k = dense(d_model, k_dim, ("embed", "kv_heads"), std=0.02, **kw)
        self.v = dense(d_model, k_dim, ("embed", "kv_heads"), std=0.02, **kw)
        self.o = dense(d_model, d_model, ("heads", "embed"), std=out_std, **kw)

    def _qkv(self, x_BxTxD: jax.Array, positions_BxT: jax.Array):
        B, T, _ = x_BxTxD.shape
        q = self.q(x_BxTxD).reshape(B, T, self.n_heads, self.head_dim)
        k = self.k(x_BxTxD).reshape(B, T, self.n_kv_heads, self.head_dim)
        v = self.v(x_BxTxD).reshape(B, T, self.n_kv_heads, self.head_dim)
        return rope(q, positions_BxT, self.rope_theta), rope(k, positions_BxT, self.rope_theta), v

    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
                 docs: documents.Documents | None = None) -> jax.Array:
        """``docs`` (packed rows): no query attends across a document (positions_BxT should be
        ``docs.positions``).  With "cudnn" the document mask becomes a dense [B, 1, T, T] bias."""
        B, T, D = x_BxTxD.shape
        out_BxTxHxK = self._attend(*self._qkv(x_BxTxD, positions_BxT), docs)
        return shard_batch(self.o(out_BxTxHxK.reshape(B, T, D)))

    def _attend(self, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, docs) -> jax.Array:
        qkv = q_BxTxHxK, k_BxTxGxK, v_BxTxGxK
        if self.impl in splash.IMPLS:
            out = splash_attention(*qkv, self.impl, docs)
            if out is not None:
                return out
        if self.impl == "blockwise":
            return blockwise_attention(*qkv, doc_ids_BxT=None if docs is None else docs.ids)
        mask = None if docs is None else documents.attention_mask(docs)
        return jax.nn.dot_product_attention(*qkv, mask=mask, is_causal=True,
                                            implementation=xla_impl(self.impl))

    def decode(self, x_Bx1xD: jax.Array, cache_k_BxSxGxK: jax.Array, cache_v_BxSxGxK: jax.Array,
               pos: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One token at position `pos` (int32 scalar) -> (y_Bx1xD, new cache k, new cache v)."""
        B, _, D = x_Bx1xD.shape
        positions_Bx1 = jnp.full((B, 1), pos, jnp.int32)
        q, k, v = self._qkv(x_Bx1xD, positions_Bx1)
        start = (0, pos, 0, 0)
        dtype = cache_k_BxSxGxK.dtype
        cache_k = jax.lax.dynamic_update_slice(cache_k_BxSxGxK, k.astype(dtype), start)
        cache_v = jax.lax.dynamic_update_slice(cache_v_BxSxGxK, v.astype(dtype), start)
        lengths_B = jnp.full((B,), pos + 1, jnp.int32)
        out = jax.nn.dot_product_attention(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype),
                                           key_value_seq_lengths=lengths_B)
        return self.o(out.reshape(B, 1, D)), cache_k, cache_v


class TiedEmbedding(nnx.Module):
    """Token embedding whose transpose is the LM head (Press & Wolf 2017)."""

    def __init__(self, vocab_size: int, d_model: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, d_model, dtype=dtype, param_dtype=param_dtype,
                               embedding_init=param_init(normal(0.02), "vocab", "embed"), rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.embed(tokens)

    def logits(self, x_BxTxD: jax.Array) -> jax.Array:
        """float32 logits, whatever the compute dtype (the loss needs them in full precision);
        float64 in float64 (the exactness tests)."""
        table_VxD = self.embed.embedding[...].astype(x_BxTxD.dtype)
        return jnp.einsum("...d,vd->...v", x_BxTxD, table_VxD,
                          preferred_element_type=jnp.promote_types(x_BxTxD.dtype, jnp.float32))


def residual_out_std(n_layers: int) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return 0.02 / math.sqrt(2 * n_layers)
