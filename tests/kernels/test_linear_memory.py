"""linear_memory (prep + kernel + custom_vjp + ragged tail) equals the memory engine.

References, all from nested_jax.memory: the XLA dual form (``apply(path="dual")``), the
generic chunked path, and the per-token definition of chunked semantics (``stream_step``
with the same chunk size: token by token, gradients at the chunk boundary).  Compared:
outputs, final W and S, and the gradients of a scalar of all three w.r.t. every input
(q, k, v, the three gates, initial W and S).  float64 in interpret mode: exact up to
rounding; float32 and bfloat16 tolerances are documented at their tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nested_jax import memory as nm
from tests.kernels.helpers import all_grads, inputs, linear_memory, named_errs, rel_err

TOL64 = 1e-10  # float64: ~1e-14 observed; margin for the ill-conditioned end of random draws
RULES = {"gd": nm.GD, "titans": nm.TITANS, "dgd": nm.DGD, "dgd_all": nm.Rule(True, True, True),
         "nlms": nm.Rule(momentum=True, normalized=True)}


def stream_oracle(level, chunk_size):
    """Per-token reference: one ``stream_step`` per token (the engine's decode path)."""

    def run(state, q, k, v, gates):
        st = nm.stream_init(state)
        tok = lambda x: jnp.moveaxis(x, 1, 0)

        def body(st, xs):
            q_t, k_t, v_t, e, a, b = xs
            o, st = nm.stream_step(level, st, q_t, k_t, v_t, nm.Gates(e, a, b),
                                   chunk_size=chunk_size)
            return st, o

        st, o = jax.lax.scan(body, st, tuple(map(tok, (q, k, v, *gates))))
        return jnp.moveaxis(o, 0, 1), nm.MemoryState(st.params, st.mom)

    return run


def check(level, args, C, kernel, tol, oracle=True, grads=True, impl="interpret", **kw):
    run = jax.jit(lambda *a: linear_memory(level, *a, chunk_size=C, impl=impl,
                                           kernel=kernel, **kw))
    dual = jax.jit(lambda *a: nm.apply(level, *a, chunk_size=C, path="dual"))
    got, want = run(*args), dual(*args)
    assert rel_err(got, want) < tol, named_errs(got, want)
    if oracle:
        ref = jax.jit(stream_oracle(level, C))(*args)
        assert rel_err(got, ref) < tol, named_errs(got, ref)
    if grads:
        g_got = jax.jit(lambda *a: all_grads(run, a))(*args)
        g_want = jax.jit(lambda *a: all_grads(dual, a))(*args)
        assert rel_err(g_got, g_want) < tol, named_errs(g_got, g_want)
        return g_got


@pytest.mark.parametrize("kernel,rule,obj,self_target", [
    ("mosaic", "dgd", "l2", False),
    ("triton", "titans", "dot", False),
    ("mosaic", "gd", "l2", True),
    ("mosaic", "nlms", "l2", False),  # TitansLM's linear memory: chunk-normalised steps
    pytest.param("triton", "dgd_all", "l2", False, marks=pytest.mark.slow),
    pytest.param("mosaic", "titans", "l2", False, marks=pytest.mark.slow),
    pytest.param("triton", "dgd", "l2", True, marks=pytest.mark.slow),
    pytest.param("mosaic", "dgd", "dot", False, marks=pytest.mark.slow),
    pytest.param("triton", "gd", "dot", False, marks=pytest.mark.slow),
])
def test_matches_engine_float64(x64, seed, kernel, rule, obj, self_target):
    """T = 40, C = 16: two kernel chunks and a ragged 8-token tail in the XLA dual form."""
    D = 8
    level = nm.Level(nm.LinearMemory(D, D), obj, RULES[rule], self_target=self_target)
    check(level, inputs(level, seed, T=40, dtype=jnp.float64), 16, kernel, TOL64)


@pytest.mark.parametrize("rule,obj,self_target", [
    ("dgd", "l2", False), ("titans", "dot", False), ("gd", "l2", True), ("dgd_all", "l2", False),
])
def test_scan_impl_matches_engine_float64(x64, seed, rule, obj, self_target):
    """impl="scan" (the kernels' algorithm in XLA: boundary states saved, hand-written reverse
    scan for the backward) == dual form and per-token reference: values and every gradient."""
    level = nm.Level(nm.LinearMemory(8, 8), obj, RULES[rule], self_target=self_target)
    check(level, inputs(level, seed, T=40, dtype=jnp.float64), 16, "auto", TOL64, impl="scan")


def test_prior_read_matches_engine_float64(x64, seed):
    """read="prior" (o_t = M_{t-1}(q_t)): the kernel path shifts the queries like the engine;
    the stream oracle reads its carried state directly (an independent implementation)."""
    level = nm.Level(nm.LinearMemory(8, 8), "l2", nm.DELTA, "prior")
    check(level, inputs(level, seed, T=40, dtype=jnp.float64), 16, "mosaic", TOL64)


def test_scan_impl_any_chunk_and_head_dims(x64, seed):
    """impl="scan" has no tiling rules: C = 6, dk = 5, dv = 3, T = 23 (ragged tail)."""
    level = nm.Level(nm.LinearMemory(5, 3), "l2", nm.DGD)
    check(level, inputs(level, seed, T=23, H=1, dtype=jnp.float64), 6, "auto", TOL64,
          impl="scan")


@pytest.mark.parametrize("kernel", ["triton", pytest.param("mosaic", marks=pytest.mark.slow)])
def test_untiled_shapes_float64(x64, seed, kernel):
    """Small, odd head dims (dk=5, dv=3: Triton zero-pads to 16) and T < 2C with a tail."""
    level = nm.Level(nm.LinearMemory(5, 3), "l2", nm.DGD)
    check(level, inputs(level, seed, T=21, H=1, dtype=jnp.float64), 16, kernel, TOL64,
          oracle=False)


def test_short_sequence_runs_in_xla(x64, seed):
    """T < C: no full chunk, the whole call is the XLA dual form (still the same function)."""
    level = nm.Level(nm.LinearMemory(8, 8), "l2", nm.DGD)
    check(level, inputs(level, seed, T=5, dtype=jnp.float64), 16, "mosaic", TOL64,
          oracle=False, grads=False)


def test_stop_grad_ablation(x64, seed):
    """stop_grad: outer gradients reach q and the initial state only, as in the engine."""
    level = nm.Level(nm.LinearMemory(8, 8), "l2", nm.TITANS, stop_grad=True)
    g = check(level, inputs(level, seed, T=32, dtype=jnp.float64), 16, "triton", TOL64,
              oracle=False)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves((g[2], g[3], g[4])))


def test_float32(seed):
    """float32 (f32 operands, HIGHEST precision): relative error 2e-5.

    Both sides round at u = 6e-8 through O(C + dk) accumulations per chunk and a recurrence
    over T/C chunks; observed ~1e-6 on outputs and gradients, so 2e-5 (~300 u) leaves margin
    for random draws without hiding a real error (any algebra slip shows up at >= 1e-3).
    """
    level = nm.Level(nm.LinearMemory(16, 16), "l2", nm.DGD)
    check(level, inputs(level, seed, T=32), 16, "triton", 2e-5, oracle=False)


def test_bfloat16(seed):
    """bfloat16 q, k, v (bf16 matmul operands, f32 state and accumulation).

    Reference: the dual form in float32 on the same bf16-rounded inputs.  bf16 has unit
    roundoff 2^-9 = 2e-3 and the kernel rounds its matmul operands (prep matrices, X, m, the
    boundary state) to bf16 once per chunk, so per-chunk relative errors are ~u and add up
    over the T/C = 4 chunks: 2e-2 (10 u) on outputs and final state.  The XLA dual form run
    directly in bf16 is held to the same bound, so the kernel is no worse than XLA.
    """
    level = nm.Level(nm.LinearMemory(16, 16), "l2", nm.DGD)
    st, q, k, v, g = inputs(level, seed, T=64)
    bf = lambda x: x.astype(jnp.bfloat16)
    args16 = (st, bf(q), bf(k), bf(v), g)
    args32 = (st, *(x.astype(jnp.float32) for x in args16[1:4]), g)
    want = nm.apply(level, *args32, chunk_size=16, path="dual")
    got = jax.jit(lambda *a: linear_memory(level, *a, chunk_size=16, impl="interpret",
                                           kernel="triton"))(*args16)
    xla16 = nm.apply(level, *args16, chunk_size=16, path="dual")
    assert rel_err(got, want) < 2e-2, named_errs(got, want)
    assert rel_err(xla16, want) < 2e-2, named_errs(xla16, want)


def test_nonfinite_input_stays_causal(x64, seed):
    """A NaN key at token 20 (inside the second kernel chunk): the kernel path leaves tokens
    0-19 exactly as in the clean run and returns non-finite outputs from token 20 on, like the
    per-token definition (memory.causal_nonfinite; tests/memory/test_nonfinite.py)."""
    level = nm.Level(nm.LinearMemory(8, 8), "l2", nm.DGD)
    st, q, k, v, g = inputs(level, seed, T=40, dtype=jnp.float64)
    run = jax.jit(lambda *a: linear_memory(level, *a, chunk_size=16, impl="interpret",
                                           kernel="mosaic"))
    clean, _ = run(st, q, k, v, g)
    o, final = run(st, q, k.at[0, 20, 1, 3].set(jnp.nan), v, g)
    o, clean = np.asarray(o), np.asarray(clean)
    np.testing.assert_array_equal(o[:, :20], clean[:, :20])
    np.testing.assert_array_equal(o[:, 20:, 0], clean[:, 20:, 0])  # the other head
    assert np.all(~np.isfinite(o[:, 20:, 1]))
    assert np.all(~np.isfinite(np.asarray(final.params["W"])[:, 1]))
