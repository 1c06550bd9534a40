"""``linear_memory``: the kernel path for LinearMemory levels, same contract as memory.apply.

Pipeline for one shard (``shard_map`` over batch and heads when a mesh is in scope):

  1. the rule's gate conventions (dual.py): beta = 0 without momentum, the Sherman-Morrison
     step eta / (1 + eta ||k||^2) under ``dgd_all_layers``; stop-gradient ablation;
  2. [B, T, H, .] -> [B*H, T, .], zero-padded head dims for Triton;
  3. ``prep``: the state-independent per-chunk terms, all chunks in parallel (XLA);
  4. ``vjp.make_core``: the sequential Pallas kernels (custom_vjp);
  5. a ragged tail (T not a multiple of C) runs as one shorter chunk in the XLA dual form
     from the kernel's final state, exactly as ``memory/chunked.scan_chunks`` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from nested_jax import memory
from nested_jax.kernels import compat, plan, prep, vjp
from nested_jax.kernels.chunk_math import Flags
from nested_jax.memory.level import Gates, Level, MemoryState, maybe_stop
from nested_jax.memory.rules import effective_eta

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


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
    eta, beta = gates.eta, gates.beta
    if level.rule.dgd_all_layers:
        eta = jnp.vectorize(lambda e, x: effective_eta(level.rule, e, x),
                            signature="(),(d)->()")(eta, k)
    if level.rule.normalized:  # a linear memory's write gain ||k||^2 reads no state
        eta = jnp.vectorize(lambda e, x: level.step_eta(None, x, e), signature="(),(d)->()")(
            eta, k)
    if not fl.momentum:
        beta = jnp.zeros_like(beta)
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


def _local(level: Level, pl_: plan.Plan, chunk_size: int, state, q, k, v, gates):
    """One shard: kernel over full chunks, XLA dual form over the ragged tail."""
    T = q.shape[1]
    full = (T // chunk_size) * chunk_size
    if full == 0:
        return memory.apply(level, state, q, k, v, gates, chunk_size=chunk_size, path="dual")
    head = lambda x: x[:, :full]
    o, state = _kernel_part(level, pl_, state, head(q), head(k), head(v),
                            Gates(*map(head, gates)), chunk_size)
    if full == T:
        return o, state
    tail = lambda x: x[:, full:]
    o_t, state = memory.apply(level, state, tail(q), tail(k), tail(v), Gates(*map(tail, gates)),
                              chunk_size=T - full, path="dual")
    return jnp.concatenate([o, o_t.astype(o.dtype)], axis=1), state


def _context_mesh():
    """The mesh set by ``jax.set_mesh``, unless trivial or we already run inside a shard_map
    (Manual axes: the arrays are per-shard already, so the kernel runs on them as they are)."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get() if get is not None else None
    if mesh is None or not getattr(mesh, "axis_names", ()) or mesh.size <= 1:
        return None
    if any("Manual" in str(t) for t in getattr(mesh, "axis_types", ())):
        return None
    return mesh


def _mesh_axes(mesh, batch: int, heads: int, batch_axes, head_axis):
    """Mesh axes that shard batch and heads: present, non-trivial, and dividing the dims."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes")
                     else mesh.devices.shape, strict=True))
    b_axes, used = [], 1
    for a in batch_axes:
        if sizes.get(a, 1) > 1 and batch % (used * sizes[a]) == 0:
            b_axes.append(a)
            used *= sizes[a]
    h_axis = head_axis if sizes.get(head_axis, 1) > 1 and heads % sizes[head_axis] == 0 else None
    return (tuple(b_axes) or None), h_axis


def linear_memory(level: Level, state: MemoryState, q, k, v, gates: Gates, chunk_size: int,
                  impl: str = "auto", *, kernel: str = "auto", mesh=None,
                  batch_axes=BATCH_AXES, head_axis=HEAD_AXIS, block_dv: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None):
    """Run a LinearMemory level with the Pallas kernels. Returns (o f[B, T, H, dv], state).

    Same contract and results as ``nested_jax.memory.apply(..., path="dual")``: q, k
    f[B, T, H, dk]; v f[B, T, H, dv]; gates f[B, T, H]; state leaves [B, H, dv, dk].

    Args:
      impl: "auto" | "pallas" | "interpret" | "xla" | "scan" (see ``plan.py``).
      kernel: "auto" | "triton" | "mosaic": the kernel variant (auto: by backend).
      mesh: a Mesh to shard over; default the mesh set by ``jax.set_mesh`` if any.  Batch is
        split over ``batch_axes`` and heads over ``head_axis`` where present and dividing;
        the kernels then run per shard inside ``shard_map`` (Pallas calls cannot be
        auto-partitioned).
      block_dv, num_warps, num_stages: kernel tuning overrides (defaults: ``plan.make_plan``
        and ``triton._launch``).
    """
    memory.validate(level, state, q, k, v, gates, chunk_size, "dual")
    chunk_size = int(chunk_size)
    opts = dict(impl=impl, kernel=kernel, mesh=mesh, batch_axes=batch_axes, head_axis=head_axis,
                block_dv=block_dv, num_warps=num_warps, num_stages=num_stages)
    run = lambda st, q, k, v, g: _linear_memory(level, st, q, k, v, g, chunk_size, **opts)
    return memory.causal_nonfinite(run, level, chunk_size, state, q, k, v, gates)


def _linear_memory(level: Level, state: MemoryState, q, k, v, gates: Gates, chunk_size: int,
                   impl, *, kernel, mesh, batch_axes, head_axis, block_dv, num_warps,
                   num_stages):
    if level.read == "prior":  # the kernels read online; the engine shifts the queries
        run = lambda lv, st, q, k, v, g: _linear_memory(
            lv, st, q, k, v, g, chunk_size, impl, kernel=kernel, mesh=mesh,
            batch_axes=batch_axes, head_axis=head_axis, block_dv=block_dv,
            num_warps=num_warps, num_stages=num_stages)
        return memory.prior_read(run, level, state, q, k, v, gates)
    pl_ = plan.make_plan(level, q.shape[-1], v.shape[-1], chunk_size,
                         jnp.result_type(q, k, v), impl, kernel, block_dv, num_warps,
                         num_stages)
    if pl_.kernel == "xla":
        return memory.apply(level, state, q, k, v, gates, chunk_size=chunk_size, path="dual")
    fn = lambda st, q, k, v, g: _local(level, pl_, chunk_size, st, q, k, v, g)
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
