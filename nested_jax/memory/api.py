"""Batched, multi-head entry points of the memory engine.

Shapes: q, k f[B, T, H, dk]; v f[B, T, H, dv]; gates f[B, T, H]; every state leaf has
leading [B, H].  Batch and heads are ``vmap`` over the single-sequence paths, so the fast
state is per sequence and per head (decisions.md #1): nothing is shared across a batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nested_jax.memory import chunked, dual, oracle, pallas, streaming
from nested_jax.memory import resets as resets_lib
from nested_jax.memory.level import Gates, Level, MemoryState
from nested_jax.memory.memories import LinearMemory

PATHS = ("oracle", "chunked", "dual", "pallas", "auto")


def _concrete(x):
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        return None


def check_chunk_size(chunk_size) -> int:
    """A positive Python or NumPy integer, as int (a bool is refused)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int.")
    return int(chunk_size)


def _check_inputs(level: Level, q, k, v, lead: tuple[str, ...]):
    """q, k f[*lead, dk] and v f[*lead, dv] of one floating dtype; returns the lead sizes."""
    mem, names = level.memory, ", ".join(lead)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != len(lead) + 1:
            raise ValueError(f"{name} must have shape [{names}, D], got "
                             f"{getattr(x, 'shape', x)}.")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}.")
    size, dk = k.shape[:-1], k.shape[-1]
    if q.shape != k.shape:
        raise ValueError(f"q shape {q.shape} must equal k shape {k.shape}.")
    if v.shape[:-1] != size:
        raise ValueError(f"v shape {v.shape} must start with [{names}] = {size}.")
    if dk != mem.dk:
        raise ValueError(f"k last dim {dk} must equal the memory's dk={mem.dk}.")
    if v.shape[-1] != mem.dv:
        raise ValueError(f"v last dim {v.shape[-1]} must equal the memory's dv={mem.dv}.")
    return size


def _check_gates(gates: Gates, size: tuple, names: str):
    for name, g, lo, hi in (("eta", gates.eta, 0.0, np.inf), ("alpha", gates.alpha, 0.0, 1.0),
                            ("beta", gates.beta, 0.0, 1.0)):
        if getattr(g, "shape", None) != size:
            raise ValueError(f"gates.{name} must have shape [{names}] = {size}, "
                             f"got {getattr(g, 'shape', g)}.")
        val = _concrete(g)
        if val is not None and not (np.all(val >= lo) and np.all(val <= hi)):
            raise ValueError(f"gates.{name} must lie in [{lo}, {hi}]; got values in "
                             f"[{np.nanmin(val)}, {np.nanmax(val)}] (or NaN).")


def _check_state(level: Level, parts: dict, B: int, H: int, dtype, fix: str):
    """Every state leaf is [B, H, *memory shape], at least as precise as the inputs."""
    want = jax.eval_shape(lambda: level.memory.init(jax.random.key(0), dtype))  # shapes only
    for part, tree in parts.items():
        got = jax.tree.map(lambda x: tuple(x.shape), tree)
        exp = jax.tree.map(lambda x: (B, H, *x.shape), want)
        if got != exp:
            raise ValueError(f"state.{part} shapes {got} must be {exp} (leading [B, H]); {fix}.")
        narrow = sorted({str(x.dtype) for x in jax.tree.leaves(tree)
                         if jnp.promote_types(x.dtype, dtype) != x.dtype})
        if narrow:
            raise ValueError(f"state.{part} has dtype {narrow}, narrower than the inputs' "
                             f"{jnp.dtype(dtype)}: the state would change dtype on its first "
                             "write.  Keep the state at least as precise as q, k, v (e.g. a "
                             "float32 state with bfloat16 inputs) and cast whichever is off.")


def validate(level: Level, state: MemoryState, q, k, v, gates: Gates, chunk_size, path: str,
             kernel_options: dict | None = None, resets=None):
    """Raise ValueError naming the argument before any work is done."""
    if path not in PATHS:
        raise ValueError(f"path={path!r} is unknown; use one of {PATHS}.")
    unknown = sorted(set(kernel_options or ()) - set(pallas.OPTIONS))
    if unknown:
        raise ValueError(f"unknown keyword argument(s) {unknown}; the kernel options are "
                         f"{pallas.OPTIONS}.")
    if kernel_options and path not in ("pallas", "auto"):
        raise ValueError(f"{sorted(kernel_options)} only apply to path='pallas' or 'auto', "
                         f"not path={path!r}.")
    check_chunk_size(chunk_size)
    if path == "oracle" and chunk_size != 1:
        raise ValueError(f"path='oracle' is the per-token definition; chunk_size={chunk_size!r} "
                         "must be 1 there (use path='chunked' or 'dual' for chunks).")
    B, T, H = _check_inputs(level, q, k, v, ("B", "T", "H"))
    if T < 1:
        raise ValueError("the sequence (axis 1 of q, k, v) must hold at least one token.")
    _check_gates(gates, (B, T, H), "B, T, H")
    _check_state(level, {"params": state.params, "mom": state.mom}, B, H,
                 jnp.result_type(q, k, v),
                 "use nested_jax.memory.broadcast_state")
    if path in ("dual", "pallas") and level.first_order:
        raise ValueError(f"path={path!r} differentiates through the memory state; "
                         "first_order=True needs path='chunked' or 'oracle' (or 'auto').")
    if path in ("dual", "pallas") and not dual.supports(level):
        raise ValueError(f"path={path!r} does not support {level.memory}; use path='chunked' "
                         "(or 'auto').")
    if resets is not None:
        resets_lib.check(resets, B, T, chunk_size)


def validate_stream(level: Level, st: streaming.StreamState, q, k, v, gates: Gates, chunk_size):
    """``validate`` for one decode step: q, k f[B, H, dk], v f[B, H, dv], gates f[B, H]."""
    check_chunk_size(chunk_size)
    B, H = _check_inputs(level, q, k, v, ("B", "H"))
    _check_gates(gates, (B, H), "B, H")
    _check_state(level, {"params": st.params, "mom": st.mom, "boundary": st.boundary}, B, H,
                 jnp.result_type(q, k, v), "build it with nested_jax.memory.stream_init")


def _single(level, path, chunk_size, remat=True):
    if path == "oracle":
        return lambda st, q, k, v, g, r=None: oracle.run(level, st, q, k, v, g, r)
    fn = chunked.run if path == "chunked" else dual.run
    return lambda st, q, k, v, g, r=None: fn(level, st, q, k, v, g, chunk_size, remat, r)


def prior_read(run, level: Level, state: MemoryState, q, k, v, gates: Gates, resets=None):
    """A "prior" read (o_t = M_{t-1}(q_t)) from any path that reads "online" (M_t(q_t)).

    The online read at position t - 1 with query q_t *is* M_{t-1}(q_t), so the queries move one
    position earlier, the online outputs move one later, and o_0 = M_init(q_0) is read from the
    initial state: the same writes, chunks and kernels, exact for every path and chunk size
    (tests/memory/test_prior_read.py compares it with the per-token definition in float64).
    ``run(level, state, q, k, v, gates)`` is the online path on [B, T, H, ...] arrays (with
    ``resets``, run with the same resets): a document start reads the initial state.
    """
    online = dataclasses.replace(level, read="online")
    q_next = jnp.concatenate([q[:, 1:], q[:, -1:]], axis=1)  # the last query is never read
    o, final = run(online, state, q_next, k, v, gates)
    read0 = jax.vmap(jax.vmap(level.memory.apply))(state.params, q[:, 0])  # [B, H, dv]
    o = jnp.concatenate([read0[:, None].astype(o.dtype), o[:, :-1]], axis=1)
    if resets is not None:
        o = resets_lib.prior_reads_from_init(level.memory, state, q, o, resets)
    return o, final


def causal_nonfinite(run, level: Level, chunk_size: int, state: MemoryState, q, k, v,
                     gates: Gates, resets=None):
    """``run(state, q, k, v, gates)`` with non-finite inputs kept causal on every path.

    A NaN or inf in k, v or a gate at token t makes the per-token definition non-finite from
    the first read of a state that token wrote (t for the online read, t + 1 for the prior
    read, the next chunk boundary for boundary reads) -- and never earlier.  The matmul paths
    would leak it backwards inside a chunk (masked products: 0 * NaN = NaN).  So such a token is
    replaced by a no-op write (k = v = 0, eta = 0, alpha = 1, beta = 0), which leaves every
    earlier output exactly as it was, and the outputs from its first reader on, and the final
    state, are set to NaN.  Bad queries need nothing: a query only reaches its own output.
    With ``resets`` (document starts), a bad token reaches the rest of its own document only.
    """
    ok_BxTxH = jnp.all(jnp.isfinite(k), -1) & jnp.all(jnp.isfinite(v), -1)
    for g in gates:
        ok_BxTxH = ok_BxTxH & jnp.isfinite(g)
    keep = lambda x, fill: jnp.where(ok_BxTxH.reshape(x.shape[:3] + (1,) * (x.ndim - 3)), x,
                                     jnp.asarray(fill, x.dtype))
    eta, alpha, beta = gates
    o, final = run(state, q, keep(k, 0), keep(v, 0),
                   Gates(keep(eta, 0), keep(alpha, 1), keep(beta, 0)))
    B, T, H = ok_BxTxH.shape
    t = np.arange(T)
    sees = {"online": t + 1, "prior": t}.get(level.read, t // chunk_size * chunk_size)
    nan = lambda x, keep_: jnp.where(keep_.astype(bool), x, jnp.asarray(jnp.nan, x.dtype))
    if resets is not None:
        clean_o, last = resets_lib.clean_within_documents(ok_BxTxH, resets, sees)
        o = nan(o, clean_o[..., None])
        return o, jax.tree.map(lambda x: nan(x, last.reshape(B, H, *(1,) * (x.ndim - 2))), final)
    clean = jax.lax.cummin(ok_BxTxH.astype(jnp.int8), axis=1)  # 1 while tokens <= t are finite
    # [t] = tokens < t; pad, not concatenate: under an explicit-axes mesh the two halves would
    # carry different shardings.
    clean = jnp.pad(clean, ((0, 0), (1, 0), (0, 0)), constant_values=1)
    o = nan(o, clean[:, sees][..., None])
    last = clean[:, -1]  # [B, H]
    final = jax.tree.map(lambda x: nan(x, last.reshape(B, H, *(1,) * (x.ndim - 2))), final)
    return o, final


def resolve_path(level: Level, path: str) -> str:
    """"auto": the kernels for a linear memory (they fall back to the XLA dual form where no
    kernel runs the level on this backend), the dual form for the other memories it covers,
    else the generic chunked path."""
    if path != "auto":
        return path
    if level.first_order:
        return "chunked"
    if isinstance(level.memory, LinearMemory):
        return "pallas"
    return "dual" if dual.supports(level) else "chunked"


def apply(level: Level, state: MemoryState, q, k, v, gates: Gates, *, chunk_size: int = 1,
          path: str = "dual", remat: bool | int = True, resets=None, **kernel_options):
    """Run a level over its context flow. Returns (o f[B, T, H, dv], final MemoryState).

    ``path``: "oracle" | "chunked" | "dual" | "pallas" | "auto" (module docstring of
    ``nested_jax.memory``).  ``kernel_options`` (path "pallas" or "auto" only): ``impl``,
    ``kernel``, ``mesh``, ``batch_axes``, ``head_axis`` and the tile overrides of
    ``memory/pallas.run``.

    ``remat`` rematerialises each chunk body in the backward pass (one stored state per chunk);
    a caller that already rematerialises around this call (one chunk inside its own
    checkpointed scan) passes False, so the chunk is not recomputed twice.  An int g > 1 (paths
    "chunked" and "dual") stores one state per g chunks instead, recomputing a group's chunks
    in the backward: n / g + g states for n chunks, where a state is a level's weights
    (``chunked._scan_stored``; the values are unchanged).  Non-finite inputs stay causal
    (``causal_nonfinite``).

    ``resets`` (bool [B, T], optional): document starts.  Where set, the state returns to
    ``state`` before that token, so every document of a packed row computes what it computes
    alone.  Chunk starts only (``memory/resets.py``); on path "pallas" a reset runs the XLA dual
    form under impl="auto" (no kernel restarts a state) and is an error under any other impl.
    """
    validate(level, state, q, k, v, gates, chunk_size, path, kernel_options, resets)
    if not isinstance(remat, (bool, int)) or remat < 0:
        raise ValueError(f"remat={remat!r}: must be True, False (0) or an int g >= 1 "
                         "(one state stored per g chunks for the backward pass)")
    chunk_size = int(chunk_size)
    path = resolve_path(level, path)
    if resets is not None:
        resets = jnp.asarray(resets).astype(bool)
    run = lambda st, q, k, v, g: _apply(level, st, q, k, v, g, chunk_size, path, remat,
                                        kernel_options, resets)
    return causal_nonfinite(run, level, chunk_size, state, q, k, v, gates, resets)


def _apply(level: Level, state: MemoryState, q, k, v, gates: Gates, chunk_size: int, path: str,
           remat: bool, kernel_options: dict | None = None, resets=None):
    if level.read == "prior" and path != "oracle":  # the oracle reads M_{t-1} itself
        run = lambda lv, st, q, k, v, g: _apply(lv, st, q, k, v, g, chunk_size, path, remat,
                                                kernel_options, resets)
        return prior_read(run, level, state, q, k, v, gates, resets)
    if path == "pallas":
        xla_dual = lambda st, q, k, v, g, c, r=None: _apply(level, st, q, k, v, g, c, "dual",
                                                            remat, resets=r)
        return pallas.run(level, state, q, k, v, gates, chunk_size, xla_dual, resets=resets,
                          **(kernel_options or {}))
    fn = _single(level, path, chunk_size, remat)
    seq = lambda x: jnp.moveaxis(x, 2, 1)  # [B, T, H, ...] -> [B, H, T, ...]
    if resets is not None:  # one document layout per sequence, shared by its heads
        per_head = jax.vmap(fn, in_axes=(0, 0, 0, 0, 0, None))
        batched = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, 0))
        o, final = batched(state, seq(q), seq(k), seq(v), Gates(*map(seq, gates)), resets)
        return jnp.moveaxis(o, 1, 2), final
    per_head = jax.vmap(fn, in_axes=(0, 0, 0, 0, 0))
    batched = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0))
    o, final = batched(state, seq(q), seq(k), seq(v), Gates(*map(seq, gates)))
    return jnp.moveaxis(o, 1, 2), final


def broadcast_state(state_H: MemoryState, batch_size: int) -> MemoryState:
    """Per-head initial state (leaves [H, ...], e.g. meta-learned) -> per-sequence [B, H, ...]."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (batch_size, *x.shape)), state_H)


def init_state(level: Level, key, num_heads: int, dtype=jnp.float32) -> MemoryState:
    """Independent random initial state per head: leaves [H, ...]."""
    keys = jax.random.split(key, num_heads)
    return jax.vmap(lambda kk: level.init_state(kk, dtype))(keys)


def stream_init(state: MemoryState) -> streaming.StreamState:
    """[B, H, ...] MemoryState -> StreamState for token-by-token decoding."""
    return jax.vmap(jax.vmap(streaming.init))(state)


def stream_step(level: Level, st: streaming.StreamState, q, k, v, gates: Gates, *,
                chunk_size: int = 1):
    """One token for a batch: q, k f[B, H, dk]; v f[B, H, dv]; gates f[B, H]."""
    validate_stream(level, st, q, k, v, gates, chunk_size)
    chunk_size = int(chunk_size)
    fn = lambda s, q, k, v, e, a, b: streaming.step(level, s, q, k, v, e, a, b, chunk_size)
    return jax.vmap(jax.vmap(fn))(st, q, k, v, *gates)
