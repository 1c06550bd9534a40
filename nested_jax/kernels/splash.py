"""Causal softmax attention through JAX's Pallas splash (flash) attention kernel on TPU.

The kernel (``jax.experimental.pallas.ops.tpu.splash_attention``) never materialises the [T, T]
scores: it walks [block_q, block_kv] tiles with an online softmax, skips the tiles above the
causal diagonal, and recomputes them in its hand-written backward.  Plain arrays in and out,
like the rest of ``nested_jax/kernels``; the models call it from
``layers.CausalSelfAttention`` when ``attention_impl`` asks for it.

``choose(impl, ...)`` decides, before any tracing, what runs:

  "auto"              the kernel when the platform is TPU (``plan.target_platform`` included,
                      so an ahead-of-time compile for TPU from a CPU host picks it) and the
                      shapes suit it; else "" (the caller's XLA path, unchanged).
  "splash"            the kernel, or a ValueError naming the field and the fix.
  "splash_interpret"  the kernel run by the Pallas TPU interpreter (CPU tests).

Shapes the kernel takes: T a multiple of 128 (its key blocks are multiples of the 128 lanes;
blocks are the largest of 512, 256, 128 dividing T), float32 or bfloat16, self-attention
(queries and keys of one sequence), any head dim, grouped-query heads (H a multiple of G).
Document masks (packed rows) become the kernel's segment ids: a query sees keys of its own id.

Under a multi-device mesh (``jax.set_mesh``) the kernel runs per shard inside ``shard_map``:
batch over the ("data", "fsdp") axes and heads over "tensor" where they divide (Mosaic calls
cannot be auto-partitioned).  The sequence axis is never split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from nested_jax.kernels import compat, plan

try:
    from jax.experimental.pallas.ops.tpu import splash_attention as _sa
except ImportError:  # pragma: no cover - a jax without the kernel
    _sa = None

IMPLS = ("auto", "splash", "splash_interpret")
BLOCKS = (512, 256, 128)  # tile sizes tried, largest first; the kernel's lanes are 128 wide
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def block_size(seq_len: int) -> int:
    """The kernel's query and key tile for a sequence of ``seq_len`` tokens (0: none fits)."""
    return next((b for b in BLOCKS if seq_len % b == 0), 0)


def unsupported(seq_len: int, kv_len: int, dtype) -> str:
    """Why the kernel cannot run this call ('' if it can)."""
    if _sa is None:
        return "this jax has no jax.experimental.pallas.ops.tpu.splash_attention"
    if kv_len != seq_len:
        return f"keys ({kv_len}) and queries ({seq_len}) must be one sequence (self-attention)"
    if not block_size(seq_len):
        nearest = max(128, seq_len - seq_len % 128)
        return (f"the sequence length {seq_len} must be a multiple of 128 (the kernel's key "
                f"blocks are multiples of the 128 TPU lanes); use seq_len={nearest}")
    if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
        return f"dtype {jnp.dtype(dtype)} is not supported (float32 or bfloat16)"
    return ""


def choose(impl: str, seq_len: int, kv_len: int, dtype,
           field: str = "model.attention_impl") -> str:
    """"splash", "interpret" or "" (the caller's XLA path) for ``impl`` (see the module doc).

    ``field`` names the setting in error messages."""
    if impl not in IMPLS:
        raise ValueError(f"{field}={impl!r} is unknown here; use one of {IMPLS}.")
    platform = plan._platform()
    why = unsupported(seq_len, kv_len, dtype)
    if impl == "auto":
        return "splash" if platform == "tpu" and not why else ""
    if impl == "splash" and platform != "tpu":
        raise ValueError(
            f"{field}='splash' runs the Pallas Mosaic kernel, which needs a TPU (or "
            f"nested_jax.kernels.target_platform('tpu') for an ahead-of-time compile); the "
            f"platform is {platform!r}.  Use {field}='auto' (splash on TPU, XLA elsewhere), "
            f"'xla', or 'splash_interpret' (the kernel interpreted on CPU, for tests).")
    if why:
        raise ValueError(f"{field}={impl!r}: {why}; or use {field}='auto' (XLA where the "
                         "kernel does not fit) or 'xla'.")
    return "interpret" if impl == "splash_interpret" else "splash"


def _kernel(heads: int, seq_len: int, interpret: bool):
    """The splash kernel for [heads, seq_len, K] queries with a causal mask.  Built at every
    trace (its block tables become constants of the trace; the kernel module caches the NumPy
    work).  ``interpret``: the generic Pallas interpreter; the TPU interpreter
    (``pltpu.InterpretParams``) cannot run the kernel under vmap in jax 0.10.2 (the grid gains
    the batch axis, its dimension semantics do not)."""
    b = block_size(seq_len)
    sizes = _sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                           block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = _sa.MultiHeadMask([_sa.CausalMask((seq_len, seq_len))] * heads)
    return _sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                               interpret=interpret)


def _local(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, ids_BxT, interpret: bool):
    """One shard: the kernel per sequence (vmap over batch), heads-major layout."""
    B, T, H, K = q_BxTxHxK.shape
    kernel = _kernel(H, T, interpret)
    # The kernel does not scale the scores; scale q (exact for K a power of 4, else one rounding).
    scale = 1.0 / np.sqrt(K)
    q = (q_BxTxHxK.astype(jnp.float32) * scale).astype(q_BxTxHxK.dtype)
    heads = lambda x: x.swapaxes(1, 2)  # [B, T, H, K] -> [B, H, T, K]
    if ids_BxT is None:
        out = jax.vmap(kernel)(heads(q), heads(k_BxTxGxK), heads(v_BxTxGxK))
    else:
        ids = ids_BxT.astype(jnp.int32)
        out = jax.vmap(lambda q, k, v, i: kernel(q, k, v, segment_ids=_sa.SegmentIds(i, i)))(
            heads(q), heads(k_BxTxGxK), heads(v_BxTxGxK), ids)
    return out.swapaxes(1, 2).astype(q_BxTxHxK.dtype)


def attention(q_BxTxHxK: jax.Array, k_BxTxGxK: jax.Array, v_BxTxGxK: jax.Array, *,
              doc_ids_BxT: jax.Array | None = None, interpret: bool = False, mesh=None,
              batch_axes=BATCH_AXES, head_axis=HEAD_AXIS) -> jax.Array:
    """softmax(q k^T / sqrt(K) + causal mask) v through the splash kernel, [B, T, H, K].

    The function of ``jax.nn.dot_product_attention(q, k, v, is_causal=True)`` (grouped-query:
    H = G * R, query head h reads key head h // R).  ``doc_ids_BxT`` (packed rows): a query
    sees only keys with its own id.  ``mesh``: default the ``jax.set_mesh`` mesh, if any; the
    kernel then runs per shard (batch over ``batch_axes``, heads over ``head_axis`` where they
    divide).  Call ``choose`` first: this function assumes the shapes suit the kernel.
    """
    fn = lambda q, k, v, ids: _local(q, k, v, ids, interpret)
    mesh = mesh if mesh is not None else compat.context_mesh()
    if mesh is None:
        return fn(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, doc_ids_BxT)
    # Heads split only if the key heads divide too (then query head h and key head h // R
    # land on the same shard).
    b, h = compat.mesh_axes(mesh, q_BxTxHxK.shape[0], k_BxTxGxK.shape[2], batch_axes, head_axis)
    if b is None and h is None:
        return fn(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, doc_ids_BxT)
    x = P(b, None, h, None)
    args, specs = (q_BxTxHxK, k_BxTxGxK, v_BxTxGxK), (x, x, x)
    if doc_ids_BxT is not None:
        args, specs = (*args, doc_ids_BxT), (*specs, P(b, None))
    body = (lambda q, k, v, ids: fn(q, k, v, ids)) if doc_ids_BxT is not None else (
        lambda q, k, v: fn(q, k, v, None))
    sharded = compat.shard_map(body, mesh, in_specs=specs, out_specs=x)
    return sharded(*compat.reshard_explicit(args, specs, mesh))
