"""``apply(..., path="pallas")``: LinearMemory levels through the Pallas kernels.

The engine owns everything that knows about levels; ``nested_jax/kernels`` sees plain arrays.
Pipeline for one shard (``shard_map`` over batch and heads when a mesh is in scope):

  1. the gates a write sees, from ``dual.write_gates`` (the one place they are defined);
     stop-gradient ablation;
  2. [B, T, H, .] -> [B*H, T, .], zero-padded head dims for Triton;
  3. ``kernels.prep``: the state-independent per-chunk terms, all chunks in parallel (XLA);
  4. ``kernels.vjp.make_core``: the sequential Pallas kernels (custom_vjp);
  5. a ragged tail (T not a multiple of C) runs as one shorter chunk in the XLA dual form
     from the kernel's final state, exactly as ``memory/chunked.scan_chunks`` does.

Which implementation runs (``impl``, ``kernel``) is decided by ``kernels/plan.py``; a level no
kernel supports falls back to the XLA dual form under ``impl="auto"`` and is an error naming
the reason otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from nested_jax.kernels import compat, plan, prep, vjp
from nested_jax.kernels.chunk_math import Flags
from nested_jax.memory.dual import write_gates
from nested_jax.memory.level import Gates, Level, MemoryState, maybe_stop
from nested_jax.memory.memories import LinearMemory

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"
OPTIONS = ("impl", "kernel", "mesh", "batch_axes", "head_axis", "block_dv", "num_warps",
           "num_stages")


def level_unsupported(level: Level) -> str:
    """Why no kernel runs this level ('' if they can)."""
    if not isinstance(level.memory, LinearMemory):
        return (f"memory={type(level.memory).__name__} has no kernel (LinearMemory only); "
                "use impl='xla'")
    if level.read != "online":
        return f"read={level.read!r} has no kernel (online reads only); use impl='xla'"
    if level.normalize_target:
        return ("normalize_target=True has no kernel (the kernels' self-target is linear in "
                "W_b); use impl='xla'")
    return ""


def _objective(level: Level) -> str:
    """Rule.delta drops W_b k from the l2 error u = W_b k - vhat: what is left is dot's -vhat."""
    return "dot" if level.rule.delta else level.objective


def flags_for(level: Level) -> Flags:
    """The chunk-maths structure of a LinearMemory level (see chunk_math.Flags)."""
    obj = _objective(level)
    return Flags(has_ke=obj == "l2" or level.self_target,
                 has_ve=not level.self_target, momentum=level.rule.momentum, dgd=level.rule.dgd,
                 ke_is_k=obj == "l2" and not level.self_target)


def error_inputs(level: Level, k, v):
    """(ke, ve) with the stale error u = ke W_b^T - ve, i.e. objectives.error at y = W_b k.

    l2: u = W_b k - vhat;  dot: u = -vhat;  vhat = v, or W_b v under self_target (dk == dv).
    """
    obj = _objective(level)
    if level.self_target:
        return (k - v if obj == "l2" else -v), None
    return (k if obj == "l2" else None), v


def _dtypes(q, k, v, gates, state):
    leaves = [q, k, v, *gates, state.params["W"], state.mom["W"]]
    res = jnp.result_type(*leaves)
    acc = jnp.float64 if res == jnp.float64 else jnp.float32
    inputs = jnp.result_type(q, k, v)
    op = inputs if jnp.dtype(inputs).itemsize == 2 else acc
    return res, acc, op


def _pad(x, axis, size):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _kernel_part(level: Level, pl_: plan.Plan, state: MemoryState, q, k, v, gates: Gates,
                 chunk_size: int):
    """Full chunks through the kernel. Inputs [B, N*C, H, .]; returns (o, MemoryState)."""
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    res, acc, op = _dtypes(q, k, v, gates, state)
    fl = flags_for(level)
    k, v, gates = maybe_stop(level, k, v, gates)
    if level.rule.normalized:  # a linear memory's write gain ||k||^2 reads no state
        chunks = lambda x: jnp.moveaxis(x.reshape(B, T // chunk_size, chunk_size, H, *x.shape[3:]),
                                        2, 3)  # [B, N, H, C, ...]
        steps = jnp.vectorize(lambda e, x: level.chunk_steps(None, x, e)[0],
                              signature="(c),(c,d)->(c)")(chunks(gates.eta), chunks(k))
        gates = gates._replace(eta=jnp.moveaxis(steps, 3, 2).reshape(B, T, H))
    eta, _, beta = write_gates(level, k, gates, level.rule.dgd)
    seq = lambda x: jnp.moveaxis(x, 2, 1).reshape(B * H, T, *x.shape[3:]).astype(acc)
    ke, ve = error_inputs(level, k, v)
    ke = None if fl.ke_is_k else ke  # the kernels read k itself: one load, one cotangent
    padk = lambda x: None if x is None else _pad(seq(x), 2, pl_.dk)
    padv = lambda x: None if x is None else _pad(seq(x), 2, pl_.dv)
    ch = prep.prep(padk(q), padk(k), padk(ke), padv(ve), seq(eta), seq(gates.alpha), seq(beta),
                   fl, op, chunk_size)
    st = lambda x: _pad(_pad(x.reshape(B * H, dv, dk).astype(acc), 1, pl_.dv), 2, pl_.dk)
    core = vjp.make_core(pl_.kernel, fl, jnp.dtype(op), jnp.dtype(res), pl_.bv, pl_.interpret,
                         pl_.num_warps, pl_.num_stages)
    y, wn, sn = core(ch, st(state.params["W"]), st(state.mom["W"]))
    o = jnp.moveaxis(y.reshape(B, H, T, pl_.dv)[..., :dv], 1, 2)
    fin = lambda x: x[:, :dv, :dk].reshape(B, H, dv, dk).astype(res)
    return o, MemoryState({"W": fin(wn)}, {"W": fin(sn)})


def _local(level: Level, pl_: plan.Plan, chunk_size: int, dual, state, q, k, v, gates):
    """One shard: kernel over full chunks, XLA dual form (``dual``) over the ragged tail."""
    T = q.shape[1]
    full = (T // chunk_size) * chunk_size
    if full == 0:
        return dual(state, q, k, v, gates, chunk_size)
    head = lambda x: x[:, :full]
    o, state = _kernel_part(level, pl_, state, head(q), head(k), head(v),
                            Gates(*map(head, gates)), chunk_size)
    if full == T:
        return o, state
    tail = lambda x: x[:, full:]
    o_t, state = dual(state, tail(q), tail(k), tail(v), Gates(*map(tail, gates)), T - full)
    return jnp.concatenate([o, o_t.astype(o.dtype)], axis=1), state


# The mesh helpers are shared with the attention kernel (kernels/splash.py).
_context_mesh = compat.context_mesh
_mesh_axes = compat.mesh_axes


def plan_for(level: Level, q, k, v, chunk_size: int, impl: str = "auto", kernel: str = "auto",
             block_dv: int | None = None, num_warps: int | None = None,
             num_stages: int | None = None) -> plan.Plan:
    """The implementation and tiles a call would run with (see ``kernels/plan.py``)."""
    return plan.make_plan(q.shape[-1], v.shape[-1], chunk_size, jnp.result_type(q, k, v), impl,
                          kernel, block_dv, num_warps, num_stages,
                          level_unsupported=level_unsupported(level))


def run(level: Level, state: MemoryState, q, k, v, gates: Gates, chunk_size: int, dual, *,
        resets=None, impl: str = "auto", kernel: str = "auto", mesh=None, batch_axes=BATCH_AXES,
        head_axis=HEAD_AXIS, block_dv: int | None = None, num_warps: int | None = None,
        num_stages: int | None = None):
    """An online-read level on [B, T, H, .] arrays through the kernels; (o, final state).

    ``dual(state, q, k, v, gates, chunk_size, resets=None)`` is the engine's XLA dual form,
    used for the ragged tail and wherever the plan falls back to XLA.  The caller
    (``api.apply``) has validated the arguments and kept non-finite inputs causal.

    Args:
      resets: document starts (bool [B, T], ``memory/resets.py``).  No kernel restarts a
        state mid-sequence, so a call with resets runs the XLA dual form (the same function)
        under impl="auto" or "xla", and any other impl is an error.
      impl: "auto" | "pallas" | "interpret" | "xla" | "scan" (see ``kernels/plan.py``).
      kernel: "auto" | "triton" | "mosaic": the kernel variant (auto: by backend).
      mesh: a Mesh to shard over; default the mesh set by ``jax.set_mesh`` if any.  Batch is
        split over ``batch_axes`` and heads over ``head_axis`` where present and dividing;
        the kernels then run per shard inside ``shard_map`` (Pallas calls cannot be
        auto-partitioned).
      block_dv, num_warps, num_stages: kernel tuning overrides (defaults: ``plan.make_plan``
        and ``kernels/triton.py``).
    """
    pl_ = plan_for(level, q, k, v, chunk_size, impl, kernel, block_dv, num_warps, num_stages)
    if resets is not None:
        if pl_.kernel != "xla" and impl != "auto":
            raise ValueError(f"resets (document starts) have no kernel: impl={impl!r} cannot "
                             "restart the state inside a sequence; use impl='auto' or 'xla' "
                             "(the XLA dual form, the same function).")
        return dual(state, q, k, v, gates, chunk_size, resets)
    if pl_.kernel == "xla":
        return dual(state, q, k, v, gates, chunk_size)
    fn = lambda st, q, k, v, g: _local(level, pl_, chunk_size, dual, st, q, k, v, g)
    mesh = mesh if mesh is not None else _context_mesh()
    if mesh is None:
        return fn(state, q, k, v, gates)
    b, h = _mesh_axes(mesh, q.shape[0], q.shape[2], batch_axes, head_axis)
    if b is None and h is None:
        return fn(state, q, k, v, gates)
    x, g, s = P(b, None, h, None), P(b, None, h), P(b, h, None, None)
    st_spec = jax.tree.map(lambda _: s, state)
    in_specs = (st_spec, x, x, x, Gates(g, g, g))
    sharded = compat.shard_map(fn, mesh, in_specs=in_specs, out_specs=(x, st_spec))
    args = compat.reshard_explicit((state, q, k, v, gates), in_specs, mesh)
    return sharded(*args)
