"""Which implementation runs, and clear errors for what the kernels do not cover."""

import jax
import jax.numpy as jnp
import pytest

from nested_jax import memory as nm
from nested_jax.kernels import make_plan
from nested_jax.memory.pallas import level_unsupported
from tests.kernels.helpers import inputs, linear_memory

LIN = nm.Level(nm.LinearMemory(8, 8), "l2", nm.DGD)


def _same(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(bool(jnp.all(x == y)) for x, y in pairs)


def _args(level=LIN, T=16):
    return inputs(level, 0, T=T)


@pytest.mark.parametrize("kw,match", [
    (dict(impl="fast"), "impl="),
    (dict(impl="interpret", kernel="cuda"), "kernel="),
    (dict(impl="interpret", kernel="triton", block_dv=24), "block_dv=24"),
    (dict(impl="interpret", kernel="mosaic", block_dv=4), "block_dv=4"),
    (dict(impl="interpret", kernel="triton", num_warps=3), "num_warps=3"),
    (dict(impl="interpret", kernel="triton", num_stages=0), "num_stages=0"),
    (dict(impl="pallas"), "GPU or TPU"),
    (dict(chunk_size=0), "chunk_size=0"),
])
def test_bad_arguments_name_the_argument(kw, match):
    kw = {"chunk_size": 16, **kw}
    with pytest.raises(ValueError, match=match):
        linear_memory(LIN, *_args(), **kw)


@pytest.mark.parametrize("kernel,C", [("triton", 12), ("mosaic", 12)])
def test_any_chunk_size_runs_on_the_kernels(x64, kernel, C):
    """The kernels' loop sees only [dk, dk] and [bv, dk] tiles: a chunk size that is neither a
    power of two nor a multiple of 8 runs, and equals the dual form (ragged tail included)."""
    args = inputs(LIN, 0, T=30, dtype=jnp.float64)
    got = linear_memory(LIN, *args, chunk_size=C, impl="interpret", kernel=kernel)
    want = nm.apply(LIN, *args, chunk_size=C, path="dual")
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert float(jnp.max(jnp.abs(x - y))) < 1e-12 * float(jnp.max(jnp.abs(y)))


def test_float64_kernels_are_interpret_only(x64):
    with pytest.raises(ValueError, match="float64"):
        make_plan(8, 8, 16, jnp.float64, "pallas", "triton")


@pytest.mark.parametrize("level,match", [
    (nm.Level(nm.MLPMemory(8, 8, hidden=16), "l2", nm.DGD), "LinearMemory only"),
    (nm.Level(nm.LinearMemory(8, 8), "l2", nm.GD, read="boundary"), "online reads only"),
])
def test_unsupported_levels(level, match):
    """impl='pallas'/'interpret' refuse with the reason; impl='auto' falls back to XLA."""
    args = _args(level)
    with pytest.raises(ValueError, match=match):
        linear_memory(level, *args, chunk_size=16, impl="interpret")
    assert make_plan(8, 8, 16, jnp.float32, "auto", "triton",
                     level_unsupported=level_unsupported(level)).kernel == "xla"
    if isinstance(level.memory, nm.LinearMemory):  # (the MLP's XLA compile is slow on CPU)
        got = linear_memory(level, *args, chunk_size=16, impl="auto")
        want = nm.apply(level, *args, chunk_size=16, path="dual")
        assert _same(got, want)


@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_xla_paths_are_the_dual_form(impl):
    """impl='xla' always, and impl='auto' on CPU, call memory.apply(path='dual') itself."""
    if impl == "auto" and jax.default_backend() != "cpu":
        pytest.skip("auto picks a kernel on accelerators")
    assert make_plan(8, 8, 16, jnp.float32, impl).kernel == "xla"
    args = _args()
    got = linear_memory(LIN, *args, chunk_size=16, impl=impl)
    want = nm.apply(LIN, *args, chunk_size=16, path="dual")
    assert _same(got, want)


def test_bad_shapes_are_caught_before_any_work():
    st, q, k, v, g = _args()
    with pytest.raises(ValueError, match="q must have shape"):
        linear_memory(LIN, st, q[0], k, v, g, chunk_size=16, impl="interpret")


@pytest.mark.parametrize("kernel,dk,dv,want", [
    ("triton", 5, 3, (16, 16, 16)),  # padded to Triton's minimum dot size
    ("triton", 64, 64, (64, 64, 64)),  # the whole W per (batch, head)
    ("triton", 128, 128, (128, 128, 32)),  # four 32-row tiles of W per (batch, head)
    ("triton", 128, 100, (128, 128, 32)),
    ("mosaic", 5, 3, (5, 3, 3)),  # full-dim blocks: no padding on TPU
    ("mosaic", 128, 128, (128, 128, 128)),
])
def test_plan_tiles(kernel, dk, dv, want):
    p = make_plan(dk, dv, 64, jnp.bfloat16, "pallas", kernel)
    assert (p.dk, p.dv, p.bv) == want


def test_second_order_names_the_xla_path():
    """The kernels are differentiable once; grad-of-grad names the XLA dual path."""
    level = nm.Level(nm.LinearMemory(16, 16), "l2", nm.DGD)
    st, q, k, v, g = inputs(level, 0, T=32)
    # Through k (q reaches only the readout, which is XLA: its second derivative exists).
    f = lambda k: jnp.sum(linear_memory(level, st, q, k, v, g, chunk_size=16, impl="interpret",
                                        kernel="triton")[0] ** 2)
    with pytest.raises(ValueError, match="path='dual'"):
        jax.grad(lambda k: jnp.sum(jax.grad(f)(k) ** 2))(k)


@pytest.mark.parametrize("kw,match", [
    (dict(path="dual", impl="interpret"), r"\['impl'\] only apply to path='pallas' or 'auto'"),
    (dict(path="pallas", impls="interpret"), r"unknown keyword argument\(s\) \['impls'\]"),
    (dict(path="pallas", level=nm.Level(nm.MLPMemory(8, 8, hidden=16, depth=3), "l2", nm.GD)),
     "path='pallas' does not support"),
])
def test_kernel_options_are_checked_by_the_front_door(kw, match):
    level = kw.pop("level", LIN)
    with pytest.raises(ValueError, match=match):
        nm.apply(level, *_args(level), chunk_size=16, **kw)


@pytest.mark.parametrize("level,want", [
    (LIN, "pallas"),
    (nm.Level(nm.MLPMemory(8, 8, hidden=16), "l2", nm.DGD), "dual"),
    (nm.Level(nm.MLPMemory(8, 8, hidden=16, depth=3), "l2", nm.DGD), "chunked"),
])
def test_auto_picks_the_fastest_path_that_covers_the_level(level, want):
    assert nm.resolve_path(level, "auto") == want


def test_auto_equals_dual_for_a_linear_memory_on_cpu():
    """On CPU no kernel runs, so "auto" is the XLA dual form, bit for bit."""
    args = _args(LIN, T=24)
    assert _same(nm.apply(LIN, *args, chunk_size=16, path="auto"),
                 nm.apply(LIN, *args, chunk_size=16, path="dual"))
