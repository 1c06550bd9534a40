"""Guarded imports of the Pallas / sharding APIs whose names moved between jax 0.6 and 0.11.

Everything version-dependent lives here so the kernels read the same on every jax:

* Triton compiler params: ``pallas.triton.CompilerParams`` (>= 0.5) or
  ``pallas.gpu.TritonCompilerParams`` (older).  Since jax 0.8 a ``pallas_call`` on GPU without
  Triton params lowers through Mosaic GPU, so the params are always passed explicitly.
* TPU compiler params: ``pltpu.CompilerParams`` or ``pltpu.TPUCompilerParams``.
* TPU interpret mode: ``pltpu.InterpretParams`` or ``pltpu.TPUInterpretParams``; ``None`` where
  neither exists (the generic ``interpret=True`` is used then).
* ``jax.shard_map`` (>= 0.7, ``check_vma``) or ``jax.experimental.shard_map`` (``check_rep``).
* The context mesh (``jax.set_mesh``) and the mesh axes a kernel's batch and heads split over
  (``context_mesh``, ``mesh_axes``: shared by the memory kernels and splash attention).
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl

try:  # TPU (Mosaic) support ships with every jaxlib, but guard anyway.
    from jax.experimental.pallas import tpu as pltpu
except ImportError:  # pragma: no cover
    pltpu = None

try:
    from jax.experimental.pallas import triton as _pl_triton

    _TritonParams = _pl_triton.CompilerParams
except (ImportError, AttributeError):  # pragma: no cover - jax < 0.5
    try:
        from jax.experimental.pallas import gpu as _pl_gpu

        _TritonParams = _pl_gpu.TritonCompilerParams
    except (ImportError, AttributeError):
        _TritonParams = None


def triton_params(num_warps: int = 4, num_stages: int = 2):
    if _TritonParams is None:
        raise ValueError("this jax has no Pallas Triton backend; use impl='xla'.")
    return _TritonParams(num_warps=num_warps, num_stages=num_stages)


def tpu_params(dimension_semantics):
    cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams", None)
    if cls is None:  # pragma: no cover
        raise ValueError("this jax has no Pallas TPU compiler params; use impl='xla'.")
    return cls(dimension_semantics=tuple(dimension_semantics))


def tpu_interpret():
    """TPU interpret-mode parameters (simulates VMEM, grid order, DMAs on CPU), or True."""
    cls = getattr(pltpu, "InterpretParams", None) or getattr(pltpu, "TPUInterpretParams", None)
    return cls() if cls is not None else True


def vmem_scratch(shape, dtype):
    space = getattr(pltpu, "VMEM", None)
    if space is None:  # pragma: no cover - very old naming
        space = pltpu.TPUMemorySpace.VMEM
    return space(shape, dtype)


def shard_map(f, mesh, in_specs, out_specs):
    """shard_map with replication checks off (pallas_call has no replication rule)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)
    from jax.experimental.shard_map import shard_map as _sm  # pragma: no cover

    return _sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def reshard_explicit(tree, specs, mesh):
    """Reshard inputs to ``specs`` on a mesh with Explicit axes (shard_map then demands that
    the input types match its in_specs); a no-op on Auto meshes, where shard_map reshards."""
    types = getattr(mesh, "axis_types", None)
    reshard = getattr(jax.sharding, "reshard", None)
    if reshard is None or not types or not any("Explicit" in str(t) for t in types):
        return tree
    if isinstance(mesh, jax.sharding.Mesh):
        specs = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                             is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    return jax.tree.map(reshard, tree, specs)


def context_mesh():
    """The mesh set by ``jax.set_mesh``, unless trivial or we already run inside a shard_map
    (Manual axes: the arrays are per-shard already, so the kernel runs on them as they are)."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get() if get is not None else None
    if mesh is None or not getattr(mesh, "axis_names", ()) or mesh.size <= 1:
        return None
    if any("Manual" in str(t) for t in getattr(mesh, "axis_types", ())):
        return None
    return mesh


def mesh_axes(mesh, batch: int, heads: int, batch_axes, head_axis):
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


__all__ = ["context_mesh", "mesh_axes", "pl", "pltpu", "reshard_explicit", "shard_map",
           "tpu_interpret", "tpu_params", "triton_params", "vmem_scratch"]
