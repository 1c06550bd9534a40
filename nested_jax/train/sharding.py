"""All sharding decisions: one logical-axis-rules table over a (data, fsdp, tensor) mesh.

Parameters carry logical axis names in their metadata (`layers.param_init`); this
module alone turns them into `PartitionSpec`s. Change the table to change the
parallelism of every model at once.

  data    pure data parallelism: the batch is split, parameters are replicated.
  fsdp    the batch is split and parameters/optimizer state are sharded along "embed"
          (ZeRO-3 style; XLA all-gathers weights before use).
  tensor  Megatron-style: heads, MLP width and vocabulary are split.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nested_jax.config_checks import fail

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes. A dimension whose size the mesh axes do not divide, or
# whose mesh axes an earlier dimension already uses, is replicated instead.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("memory", "tensor"),
    ("layers", None),
    ("seq", None),
)


def mesh_shape(cfg: Any, n_devices: int) -> tuple[int, int, int]:
    """Resolve -1 and check the product against the device count (errors name mesh.*)."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n_devices % fixed:
            fail("mesh", tuple(sizes), f"the fixed axes ({fixed} devices) must divide the "
                 f"{n_devices} available devices")
        sizes[sizes.index(-1)] = n_devices // fixed
    if int(np.prod(sizes)) != n_devices:
        fail("mesh", tuple(sizes), f"mesh.data * mesh.fsdp * mesh.tensor = {int(np.prod(sizes))} "
             f"but there are {n_devices} devices; set them to multiply to {n_devices} "
             "(one may be -1)")
    return tuple(sizes)


def _auto_axes() -> dict:
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is None:
        return {}
    # jax >= 0.7 defaults to Explicit axes; the trainer relies on GSPMD propagation.
    return {"axis_types": (axis_type.Auto,) * len(MESH_AXES)}


def make_mesh(cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `jax.make_mesh` mesh over (data, fsdp, tensor) with auto (GSPMD) axis types.

    On multislice TPU jobs the data axis spans the slices (slow data-center network)
    and fsdp/tensor stay inside each slice (fast inter-chip interconnect).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        if shape[0] % slices:
            fail("mesh.data", shape[0], f"must be a multiple of the {slices} TPU slices")
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh(
            (shape[0] // slices, shape[1], shape[2]), (slices, 1, 1), devices)
        return Mesh(grid, MESH_AXES, **_auto_axes())
    return jax.make_mesh(shape, MESH_AXES, devices=devices, **_auto_axes())


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=RULES) -> PartitionSpec:
    """PartitionSpec for one array from its logical axis names."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, size in zip(logical_axes, shape, strict=True):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if axes and size % int(np.prod([mesh.shape[a] for a in axes])) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return PartitionSpec(*out)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def var_value(var: nnx.Variable) -> Any:
    """A Variable's value (flax >= 0.12 deprecates `.value` for `get_value()`)."""
    get = getattr(var, "get_value", None)
    return get() if get is not None else var.value


def _metadata(var: nnx.Variable) -> dict:
    get = getattr(var, "get_metadata", None)
    return dict(get() if get is not None else var.metadata)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for an `nnx.State`, from each Variable's `logical_axes` metadata.

    The result has the state's full tree structure (a NamedSharding per array).
    """

    def one(var):
        value = var_value(var)  # a ShapeDtypeStruct under nnx.eval_shape
        axes = _metadata(var).get("logical_axes")
        if axes is None or len(axes) != len(value.shape):
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh))

    variables = jax.tree.leaves(state, is_leaf=_is_variable)
    treedef = jax.tree.structure(state)
    if treedef.num_leaves != len(variables):
        raise ValueError("every nnx Variable must hold exactly one array")
    return jax.tree.unflatten(treedef, [one(v) for v in variables])


def mesh_context(mesh: Mesh):
    """``jax.set_mesh(mesh)`` where jax has it: code traced inside sees the mesh, so the Pallas
    kernels wrap themselves in ``shard_map`` over it (Mosaic calls cannot be auto-partitioned)."""
    set_mesh = getattr(jax, "set_mesh", None)
    return set_mesh(mesh) if set_mesh is not None else contextlib.nullcontext()


def under_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """``fn`` called (and so traced) inside ``mesh_context(mesh)``."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with mesh_context(mesh):
            return fn(*args, **kwargs)

    return call


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are [microbatches, batch, tokens]; the batch axis follows the "batch" rule."""
    batch_axes = tuple(a for a in dict(RULES)["batch"] if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(None, batch_axes or None, None))


def like_params(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer state: a leaf whose path ends with a parameter's path and
    whose shape equals that parameter's gets its sharding; anything else is replicated.

    This covers optax's states (mu/nu/trace ... mirror the params) without knowing
    each transform's state type.
    """
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_shardings = jax.tree.leaves(param_shardings)
    index = {tuple(path): (leaf.shape, sh)
             for (path, leaf), sh in zip(flat_params, flat_shardings, strict=True)}
    lengths = sorted({len(p) for p in index}, reverse=True)

    def one(path, leaf):
        shape = getattr(leaf, "shape", None)
        for n in lengths:
            hit = index.get(tuple(path[-n:])) if len(path) >= n else None
            if hit is not None and hit[0] == shape:
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, tree)
