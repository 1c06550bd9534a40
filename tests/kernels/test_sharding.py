"""The kernels run per shard inside shard_map (batch and heads split over a device mesh).

tests/conftest.py gives 8 CPU devices.  Mesh ("data", "fsdp", "tensor") = (2, 1, 4): batch
over data, heads over tensor.  Results and gradients equal the unsharded call, and the traced
program holds the pallas_call inside a shard_map (so GSPMD never has to partition it).
"""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nested_jax import memory as nm
from nested_jax.memory.pallas import _mesh_axes
from tests.kernels.helpers import all_grads, inputs, linear_memory, named_errs, rel_err

TOL = 1e-5  # float32: shards compute the same per-head programs; reductions differ in order


def _mesh():
    if jax.device_count() < 8:
        pytest.skip("needs the 8 simulated CPU devices of tests/conftest.py")
    return jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"))


def _place(mesh, args):
    st, q, k, v, g = args
    x, gs, s = P("data", None, "tensor", None), P("data", None, "tensor"), P("data", "tensor")
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    return (jax.tree.map(lambda a: put(a, s), st), put(q, x), put(k, x), put(v, x),
            jax.tree.map(lambda a: put(a, gs), g))


def test_sharded_equals_unsharded(seed):
    mesh = _mesh()
    level = nm.Level(nm.LinearMemory(16, 16), "l2", nm.DGD)
    args = inputs(level, seed, B=2, T=32, H=4)
    run = lambda mesh: (lambda *a: linear_memory(level, *a, chunk_size=16, impl="interpret",
                                                 kernel="triton", mesh=mesh))
    want = jax.jit(run(None))(*args)
    sharded = jax.jit(run(mesh))
    placed = _place(mesh, args)
    got = sharded(*placed)
    assert rel_err(got, want) < TOL, named_errs(got, want)
    assert tuple(got[0].sharding.spec)[:3] == ("data", None, "tensor")
    g_want = jax.jit(lambda *a: all_grads(run(None), a))(*args)
    g_got = jax.jit(lambda *a: all_grads(run(mesh), a))(*placed)
    assert rel_err(g_got, g_want) < TOL, named_errs(g_got, g_want)
    assert _kernels_only_inside_shard_map(jax.make_jaxpr(run(mesh))(*args).jaxpr)


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for x in v if isinstance(v, tuple | list) else (v,):
            inner = getattr(x, "jaxpr", x)
            if hasattr(inner, "eqns"):
                yield inner


def _contains(jaxpr, prim):
    return any(e.primitive.name == prim or any(_contains(j, prim) for j in _subjaxprs(e))
               for e in jaxpr.eqns)


def _bare_kernel(jaxpr):
    """Is a pallas_call reachable without going through a shard_map?"""
    return any(e.primitive.name == "pallas_call" or (
        e.primitive.name != "shard_map" and any(_bare_kernel(j) for j in _subjaxprs(e)))
        for e in jaxpr.eqns)


def _kernels_only_inside_shard_map(jaxpr):
    """Every pallas_call sits under a shard_map, and there is at least one."""
    inside = any(e.primitive.name == "shard_map" and
                 any(_contains(j, "pallas_call") for j in _subjaxprs(e)) for e in jaxpr.eqns)
    return inside and not _bare_kernel(jaxpr)


def test_context_mesh_is_used(seed):
    """With jax.set_mesh (the trainer's way), no mesh argument is needed.

    Both kernels are traced under the context mesh; the numbers run through the Triton one.
    The Mosaic interpreter is not executed across devices here: its cross-device barriers run
    jitted ops from inside io_callbacks, which can deadlock the CPU client's per-device
    execution slots (a hang seen in CI, jax 0.10.2). Its numerics are checked unsharded in
    tests/kernels/test_linear_memory.py, and its sharded TPU compile in tests/train/test_aot.py.
    """
    mesh = _mesh()
    if not hasattr(jax, "set_mesh"):
        pytest.skip("jax.set_mesh needs jax >= 0.7")
    level = nm.Level(nm.LinearMemory(16, 16), "dot", nm.TITANS)
    args = inputs(level, seed, B=2, T=16, H=4)
    run = {kernel: (lambda *a, kernel=kernel: linear_memory(level, *a, chunk_size=16,
                                                            impl="interpret", kernel=kernel))
           for kernel in ("mosaic", "triton")}
    with jax.set_mesh(mesh):
        for kernel, fn in run.items():
            assert _kernels_only_inside_shard_map(jax.make_jaxpr(fn)(*args).jaxpr), kernel
        got = jax.jit(run["triton"])(*_place(mesh, args))
    want = nm.apply(level, *args, chunk_size=16, path="dual")
    assert rel_err(got, want) < TOL, named_errs(got, want)


def test_inside_a_user_shard_map(seed):
    """Called from code that is already per-shard (a trainer's own shard_map), it runs as is."""
    mesh = _mesh()
    if not hasattr(jax, "set_mesh") or not hasattr(jax, "shard_map"):
        pytest.skip("needs jax.set_mesh and jax.shard_map")
    level = nm.Level(nm.LinearMemory(16, 16), "l2", nm.TITANS)
    args = inputs(level, seed, B=2, T=16, H=4)
    run = lambda *a: linear_memory(level, *a, chunk_size=16, impl="interpret", kernel="triton")
    x, gs, s = P("data", None, "tensor", None), P("data", None, "tensor"), P("data", "tensor")
    specs = (jax.tree.map(lambda _: s, args[0]), x, x, x, nm.Gates(gs, gs, gs))
    with jax.set_mesh(mesh):
        outer = jax.shard_map(run, in_specs=specs, out_specs=(x, specs[0]), check_vma=False)
        got = jax.jit(outer)(*_place(mesh, args))
    want = nm.apply(level, *args, chunk_size=16, path="dual")
    assert rel_err(got, want) < TOL, named_errs(got, want)


def test_mesh_axes_that_do_not_divide_are_dropped():
    mesh = _mesh()
    assert _mesh_axes(mesh, 2, 4, ("data", "fsdp"), "tensor") == (("data",), "tensor")
    assert _mesh_axes(mesh, 3, 6, ("data", "fsdp"), "tensor") == (None, None)
    assert _mesh_axes(mesh, 4, 8, ("data",), "absent") == (("data",), None)
    np.testing.assert_equal(mesh.devices.size, 8)
